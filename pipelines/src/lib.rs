//! The runtime every Sluice stage stands on. It knows records, topics and stores' failure
//! modes, never tenants or prices.
//!
//! - [`kafka`]: client settings (latency path vs throughput path), topic creation, a producer
//!   that hands back delivery acknowledgements, backpressure by pausing partitions.
//! - [`runtime`]: the batch [`Operator`] trait (and the per-record [`RecordOperator`]) and the
//!   loop that runs it — consume, decode, process in batches, produce, and store offsets only
//!   once every output was acknowledged, in partition order; records that cannot be decoded or
//!   processed go to the DLQ with their source coordinates.
//! - [`sink`]: the same for sinks that write batches to a store.
//! - [`stage`]: a stage as a value ([`Runnable`]) that runs live or replays a time range.
//! - [`replay`] and [`dlq`]: re-reading a topic's time range through a stage; reading and
//!   replaying dead letters.
//! - [`trace`]: W3C trace context carried in Kafka headers.
//! - [`metrics`] and [`ops`]: Prometheus metrics (names in one place) and the
//!   `/metrics`, `/healthz`, `/readyz` endpoints every long-running service serves.
//! - [`bench`]: the harness every benchmark uses (fresh topics, the raw limit, rounds, ratio).
//! - [`config`]: the broker settings and topic names these pieces share.

pub mod bench;
pub mod config;
pub mod dlq;
pub mod egress;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod replay;
pub mod runtime;
pub mod sink;
pub mod stage;
pub mod trace;

mod error;
mod source;

pub use config::{KafkaConfig, Topics};
pub use error::{Error, ProcessError, Result};
pub use runtime::{BatchError, Emitter, Input, Operator, PerRecord, RecordContext, RecordOperator};
pub use sink::{BatchCheck, BatchSink, Checked, NoCheck};
pub use stage::{ReplayRange, Runnable};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
