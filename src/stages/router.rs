//! The router stage: `sluice.requests` → `sluice.routed`, keyed by session.

use std::sync::Arc;

use sluice_pipelines::{runtime::StageSpec, Runnable};
use sluice_router::Router;

use crate::{config::Config, process::Process};

pub async fn build(config: &Config, process: &mut Process) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let catalog = process.catalog(config).await?;
    let flags = process.flags(config).await?;
    let router = Arc::new(Router::new(
        catalog,
        flags,
        config.router.clone(),
        topics.clone(),
    ));
    let mut spec = StageSpec::new(config.kafka.wiring("router", &topics.requests));
    spec.max_in_flight = config.stages.router_max_in_flight;
    Ok(Runnable::record_operator(router, spec))
}
