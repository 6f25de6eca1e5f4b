//! The orchestrator stage: `sluice.routed` → `sluice.replies`, `sluice.usage`, keyed by session:
//! one session's turns in order, different sessions' model calls concurrently.

use std::sync::Arc;

use anyhow::Context;
use sluice_orchestrator::{workflow::Definitions, Orchestrator};
use sluice_pipelines::{runtime::StageSpec, Runnable};

use crate::config::Config;

pub fn build(config: &Config) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    // Sessions' memory is written where their turns are answered; the stage answers while
    // PostgreSQL is down (those turns are left out of the memory).
    let app = sluice_stores::postgres::connect_lazy(
        &config.postgres.url,
        config.postgres.max_connections,
        std::time::Duration::from_millis(500),
    )?;
    let orchestrator = Orchestrator::new(config.orchestrator.clone(), topics.clone())
        .context("building the orchestrator's model providers")?
        .with_memory(app.clone())
        .with_workflows(Arc::new(Definitions::new(app)));
    let orchestrator = Arc::new(orchestrator);
    let mut spec = StageSpec::new(config.kafka.wiring("orchestrator", &topics.routed));
    spec.max_in_flight = config.stages.orchestrator_max_in_flight;
    Ok(Runnable::record_operator(orchestrator, spec))
}
