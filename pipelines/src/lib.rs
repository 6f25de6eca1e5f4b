//! The runtime every Sluice stage stands on.
//!
//! - [`kafka`]: client settings (latency path vs throughput path), topic creation, a producer
//!   that hands back delivery acknowledgements.
//! - [`runtime`]: the batch [`Operator`] trait (and the per-record [`RecordOperator`]) and the
//!   loop that runs it — consume, decode, process in batches, produce, and store offsets only once every output was acknowledged, in partition order;
//!   records that cannot be decoded or processed go to the DLQ with their source coordinates.
//! - [`sink`]: the same for sinks that write batches to a store.
//! - [`trace`]: W3C trace context carried in Kafka headers.
//! - [`metrics`] and [`ops`]: Prometheus metrics (names in one place) and the
//!   `/metrics`, `/healthz`, `/readyz` endpoints every long-running service serves.
//! - [`control`]: the PostgreSQL control plane — migrations, tenants, hashed API keys and the
//!   model catalogue, with row-level security on tenant-owned tables.
//! - [`config`]: the configuration types these pieces share.

pub mod bench;
pub mod config;
pub mod control;
pub mod dlq;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod replay;
pub mod runtime;
pub mod sink;
pub mod tokens;
pub mod trace;

mod error;

pub use config::{KafkaConfig, Topics};
pub use error::{Error, ProcessError, Result};
pub use runtime::{BatchError, Emitter, Input, Operator, PerRecord, RecordContext, RecordOperator};
pub use sink::BatchSink;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
