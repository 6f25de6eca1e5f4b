//! The orchestrator stage: `sluice.routed` → `sluice.replies`, `sluice.usage`, one lane per key.

use std::sync::Arc;

use anyhow::Context;
use sluice_orchestrator::Orchestrator;
use sluice_pipelines::{runtime::StageSpec, PerRecord, Runnable};

use crate::config::Config;

pub fn build(config: &Config) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let orchestrator = Orchestrator::new(config.orchestrator.clone(), topics.clone())
        .context("building the orchestrator's model providers")?;
    let orchestrator = Arc::new(orchestrator);
    let mut spec = StageSpec::new(config.kafka.wiring("orchestrator", &topics.routed));
    spec.lanes = config.stages.orchestrator_lanes;
    Ok(Runnable::operator(
        move |_| PerRecord(orchestrator.clone()),
        spec,
    ))
}
