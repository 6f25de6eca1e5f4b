//! The workflow stage: `sluice.workflow-events` → the next event of each run, with its tool
//! calls (`sluice.tool-calls`, `sluice.tool-results`), usage (`sluice.usage`) and, when a run
//! ends, its reply (`sluice.replies`); keyed by run: one run's steps in order, different runs'
//! steps concurrently.

use std::sync::Arc;

use anyhow::Context;
use sluice_orchestrator::{
    tools::Resilience,
    workflow::{engine::ModelSteps, Definitions, WorkflowEngine},
    Orchestrator,
};
use sluice_pipelines::{runtime::StageSpec, Runnable};

use crate::{config::Config, process::Process};

/// Why `sluice replay workflows` is refused.
pub const NOT_REPLAYED: &str =
    "workflow runs go on from their latest event: replaying the topic would run their steps again";

pub async fn build(config: &Config, process: &mut Process) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let catalog = process.catalog(config).await?;
    let app = sluice_stores::postgres::connect_lazy(
        &config.postgres.url,
        config.postgres.max_connections,
        std::time::Duration::from_millis(500),
    )?;
    // The model steps' calls go through the orchestrator's providers.
    let models = Orchestrator::new(config.orchestrator.clone(), topics.clone())
        .context("building the model providers of workflow runs")?;
    let tools = &config.orchestrator.tools;
    let app_for_sweep = app.clone();
    let engine = WorkflowEngine::new(
        Arc::new(Definitions::new(app.clone())),
        app,
        (
            Resilience::new(tools.resilience.clone(), process.metrics.clone()),
            tools.reach(),
        ),
        ModelSteps {
            providers: Arc::new(models),
            catalog,
            flags: process.flags(config).await?,
            router: config.router.clone(),
        },
        topics.clone(),
        process.metrics.clone(),
    );
    // Waits whose deadline passed are resumed through a record on the events topic.
    let (producer, codec) = (
        process
            .producers(config)?
            .get(sluice_pipelines::kafka::ProducerProfile::Latency)
            .clone(),
        crate::process::codec(config)?,
    );
    let (sweep_app, sweep_topic) = (app_for_sweep, topics.workflow_events.clone());
    process.spawn_beside("workflow timeouts", move |cancel| {
        sluice_orchestrator::workflow::engine::sweep_due_waits(
            sweep_app,
            (producer, codec),
            sweep_topic,
            cancel,
        )
    });
    let mut spec = StageSpec::new(config.kafka.wiring("workflows", &topics.workflow_events));
    spec.max_in_flight = config.stages.workflows_max_in_flight;
    Ok(Runnable::record_operator(Arc::new(engine), spec))
}
