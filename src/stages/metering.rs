//! The metering stage: `sluice.usage` → ClickHouse `usage_events`, batched, effectively once.

use std::time::Duration;

use sluice_clickhouse_sink::UsageSink;
use sluice_pipelines::{sink::SinkSpec, Runnable};
use sluice_stores::ClickHouse;

use crate::config::Config;

pub fn build(config: &Config) -> Runnable {
    let topics = config.kafka.topics();
    let mut sink = UsageSink::new(ClickHouse::new(&config.clickhouse));
    let compact_after_s = config.stages.metering_compact_after_s;
    if compact_after_s > 0 {
        sink = sink.compacting_closed_months(compact_after_s);
    }
    let mut spec = SinkSpec::new(config.kafka.wiring("metering", &topics.usage));
    spec.max_batch = config.stages.metering_max_batch;
    spec.max_batch_bytes = config.stages.metering_max_batch_bytes;
    spec.linger = Duration::from_millis(config.stages.metering_linger_ms);
    spec.max_write_records = config.stages.metering_max_insert_events;
    spec.max_write_age = Duration::from_millis(config.stages.metering_max_insert_ms);
    spec.upkeep_every = (compact_after_s > 0)
        .then(|| Duration::from_secs(u64::from(config.stages.metering_compact_every_s)));
    // Billing: the type refuses a sink whose writes are not idempotent.
    Runnable::effectively_once_sink(sink, spec)
}
