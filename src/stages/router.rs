//! The router stage: `sluice.requests` → `sluice.routed`, one lane per key.

use std::sync::Arc;

use sluice_pipelines::{runtime::StageSpec, PerRecord, Runnable};
use sluice_router::Router;

use crate::{config::Config, process::Process};

pub async fn build(config: &Config, process: &mut Process) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let catalog = process.catalog(config).await?;
    let router = Arc::new(Router::new(catalog, config.router.clone(), topics.clone()));
    let mut spec = StageSpec::new(config.kafka.wiring("router", &topics.requests));
    spec.lanes = config.stages.router_lanes;
    Ok(Runnable::operator(move |_| PerRecord(router.clone()), spec))
}
