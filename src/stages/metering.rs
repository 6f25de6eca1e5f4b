//! The metering stage: `sluice.usage` → ClickHouse `usage_events`, batched, effectively once.

use std::time::Duration;

use sluice_clickhouse_sink::UsageSink;
use sluice_pipelines::{sink::SinkSpec, Runnable};
use sluice_stores::ClickHouse;

use crate::config::Config;

pub fn build(config: &Config) -> Runnable {
    let topics = config.kafka.topics();
    let sink = UsageSink::new(ClickHouse::new(&config.clickhouse));
    let mut spec = SinkSpec::new(config.kafka.wiring("metering", &topics.usage));
    spec.max_batch = config.stages.metering_max_batch;
    spec.max_batch_bytes = config.stages.metering_max_batch_bytes;
    spec.linger = Duration::from_millis(config.stages.metering_linger_ms);
    // Billing: the type refuses a sink whose writes are not idempotent.
    Runnable::effectively_once_sink(sink, spec)
}
