//! Streaming SQL: a pipeline is a SQL query over a topic, grouped by an event-time window
//! (`tumble(...)` or `hop(...)`), run by [`SqlOperator`] on the operator runtime and written to
//! ClickHouse or to a topic.
//!
//! Records are decoded from Avro into Arrow batches per source partition and window, and folded
//! into the partial state of the query's aggregates as they come ([`plan`]), so a window holds
//! a few values per group rather than its records; when a partition's watermark passes a
//! window's end, DataFusion's final stage and the rest of the query run over the states. Records up to `allowed_lateness` behind the watermark
//! still join their window, which is then emitted again; later ones are counted in
//! `sluice_late_records_total` and left out.
//!
//! # Exactness through restarts
//! Offsets of records still held in windows are not committed ([`Operator::retained`]), so a
//! crash re-reads them and rebuilds the windows. Every result row carries `records`, the number
//! of input records it aggregates: a window re-emitted after a restart or a late record has at
//! least as many, and the ClickHouse tables are `ReplacingMergeTree(records)` read with `FINAL`,
//! so the most complete row wins and nothing is counted twice. Rows are computed per source
//! partition (`source_partition`): sums add up across partitions; `sluice.usage` is keyed by
//! tenant, so per-tenant rows are complete in one partition.
//!
//! # Where things are
//! [`pipeline`] (a pipeline's definition, compiled and checked), [`plan`] (the query in
//! partial, merge and final stages), [`window`] (the window
//! clause), [`table`] (records as rows and Arrow batches), [`operator`] (windows, watermarks and
//! lateness on the runtime), `output` (ClickHouse or a topic), [`builtin`] (the pipelines that
//! run by default), [`bench`] (`sluice bench window`).

pub mod bench;
pub mod builtin;
pub mod operator;
pub mod pipeline;
pub mod plan;
pub mod table;
pub mod window;

mod error;
mod output;

pub use error::{Error, Result};
pub use operator::{stage_spec, SqlOperator, DEFAULT_MAX_HELD_ROWS, MAX_FUTURE_SKEW_MS, TICK};
pub use output::Output;
pub use pipeline::{OutputConfig, Pipeline, PipelineConfig};
