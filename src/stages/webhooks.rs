//! The webhook delivery stage: `sluice.notifications` → tenants' endpoints, keyed by tenant
//! (one tenant's events in order, different tenants' at once); retries run beside it.

use std::sync::Arc;

use sluice_pipelines::{runtime::StageSpec, Runnable};
use sluice_webhooks::WebhookSender;

use crate::{config::Config, process::Process};

/// Why `sluice replay webhooks` is refused.
pub const NOT_REPLAYED: &str =
    "webhooks are delivered once per event and endpoint from the delivery log: replaying the topic would find every event already recorded";

pub async fn build(config: &Config, process: &mut Process) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let app =
        sluice_stores::postgres::connect(&config.postgres.url, config.postgres.max_connections)
            .await?;
    let sender = WebhookSender::new(
        app,
        &topics.notifications,
        config.webhooks.clone(),
        process.metrics.clone(),
    );
    let spec = StageSpec::new(config.kafka.wiring("webhooks", &topics.notifications));
    Ok(Runnable::record_operator(Arc::new(sender), spec))
}
