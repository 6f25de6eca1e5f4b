//! What an operator is: the batch [`Operator`] trait the runtime drives, its hooks, the
//! per-record [`RecordOperator`] most stages are written as, and delivery guarantees as types.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::message::{Headers, Message, OwnedMessage};
use sluice_schemas::Record;

use super::Emitter;
use crate::{
    trace::{TraceContext, TRACEPARENT},
    ProcessError,
};

/// Where a record came from, and the trace it belongs to.
#[derive(Debug, Clone)]
pub struct RecordContext {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The record's Kafka timestamp (ms since the epoch), if it carries one.
    pub timestamp_ms: Option<i64>,
    /// This stage's span in the record's trace (a new trace if the record carried none).
    pub trace: TraceContext,
}

impl RecordContext {
    pub fn of(message: &OwnedMessage) -> Self {
        let parent = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == TRACEPARENT)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(TraceContext::parse)
        });
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
            trace: parent
                .map(|p| p.child())
                .unwrap_or_else(TraceContext::new_root),
        }
    }
}

/// One decoded input record and where it came from.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub record: T,
    pub ctx: RecordContext,
}

/// How processing a batch failed: the first `completed` records are done (their outputs stand),
/// `error` concerns the record right after them.
///
/// On [`ProcessError::Retriable`] the runtime retries the rest of the batch with backoff, and
/// after the stage's `max_attempts` sends that record to the DLQ and goes on. On
/// [`ProcessError::Poison`] that record goes to the DLQ at once. Record-level problems found
/// while the batch goes on are better reported with [`Emitter::reject`].
#[derive(Debug)]
pub struct BatchError {
    pub completed: usize,
    pub error: ProcessError,
}

impl From<ProcessError> for BatchError {
    fn from(error: ProcessError) -> Self {
        Self {
            completed: 0,
            error,
        }
    }
}

impl From<crate::Error> for BatchError {
    fn from(error: crate::Error) -> Self {
        ProcessError::from(error).into()
    }
}

impl From<sluice_schemas::Error> for BatchError {
    fn from(error: sluice_schemas::Error) -> Self {
        ProcessError::from(error).into()
    }
}

/// A stream operator driven by the runtime one batch at a time.
///
/// Each lane of a stage owns one instance (`&mut self`), so state kept in the operator is
/// keyed state: the stage's [`LaneBy`](super::LaneBy) decides which keys (or partitions) a lane
/// sees. Within a lane, batches arrive in partition order.
///
/// The runtime stores an input record's offset for commit only once every output emitted for
/// it was acknowledged by the broker, and never past [`Operator::retained`]: an operator that
/// keeps records in state (a window not yet emitted) holds their offsets back, so a crash
/// re-reads them rather than losing them.
#[async_trait]
pub trait Operator: Send + Sync + 'static {
    /// The record type the operator consumes.
    type Input: Record;

    /// Processes `batch`, emitting outputs through `out`. A failure must leave the operator's
    /// state as if the failed records had not been seen (see [`BatchError`]).
    async fn process(
        &mut self,
        batch: &[Input<Self::Input>],
        out: &mut Emitter,
    ) -> Result<(), BatchError>;

    /// The record's event time (ms since the epoch); by default its Kafka timestamp.
    /// Watermarks are computed from it.
    fn event_time_ms(&self, input: &Input<Self::Input>) -> Option<i64> {
        input.ctx.timestamp_ms
    }

    /// Event time on `partition` has advanced to `watermark_ms`: no record older than it is
    /// expected any more (those that still come are late). Only called on stages with
    /// watermarks enabled.
    async fn on_watermark(
        &mut self,
        _partition: i32,
        _watermark_ms: i64,
        _out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Called every `tick` of the stage (when it has one), records or not.
    async fn on_tick(&mut self, _out: &mut Emitter) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Whether the runtime should call [`Operator::on_commit`].
    const WANTS_COMMITS: bool = false;

    /// The positions (next offset to read, per partition) stored for commit so far, each time
    /// they move: everything before them is done for good. Called only if
    /// [`Operator::WANTS_COMMITS`].
    fn on_commit(&mut self, _positions: &[(i32, i64)]) {}

    /// The stage is stopping: last outputs (their acknowledgement is awaited before the final
    /// commit).
    async fn on_close(&mut self, _out: &mut Emitter) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Per partition, the first offset whose effect lives only in this operator's state; the
    /// runtime never commits past it. Partitions not listed hold nothing back.
    fn retained(&self) -> Vec<(i32, i64)> {
        Vec::new()
    }

    /// Whether the operator can take no more records for now (its state is over budget and
    /// cannot be flushed). The lane then stops taking records, which fills its queue and stops
    /// the consumer, and runs ticks until this clears.
    fn saturated(&self) -> bool {
        false
    }
}

/// An operator written one record at a time, run through [`PerRecord`]; most stages are.
/// Implementations are shared by every lane of a stage, so they hold only configuration and
/// shared state.
#[async_trait]
pub trait RecordOperator: Send + Sync + 'static {
    /// The record type the operator consumes.
    type Input: Record + Clone;

    /// Processes one record, emitting outputs through `out`. Return
    /// [`ProcessError::Poison`] for a record that can never be processed (it goes to the DLQ)
    /// and [`ProcessError::Retriable`] for a failure that may pass.
    async fn process(
        &self,
        input: Self::Input,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError>;
}

/// Runs a [`RecordOperator`] as a batch [`Operator`]: each record in turn, each output carrying
/// that record's trace.
pub struct PerRecord<R>(pub Arc<R>);

impl<R> Clone for PerRecord<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

#[async_trait]
impl<R: RecordOperator> Operator for PerRecord<R> {
    type Input = R::Input;

    async fn process(
        &mut self,
        batch: &[Input<R::Input>],
        out: &mut Emitter,
    ) -> Result<(), BatchError> {
        for (completed, input) in batch.iter().enumerate() {
            out.set_trace(input.ctx.trace);
            let span = tracing::debug_span!(
                "record", trace_id = %input.ctx.trace.trace_id_hex(),
                partition = input.ctx.partition, offset = input.ctx.offset
            );
            let result = tracing::Instrument::instrument(
                self.0.process(input.record.clone(), &input.ctx, out),
                span,
            )
            .await;
            match result {
                Ok(()) => {}
                Err(ProcessError::Poison(reason)) => out.reject(&input.ctx, reason),
                Err(error) => return Err(BatchError { completed, error }),
            }
        }
        Ok(())
    }
}

/// A delivery guarantee, as a type: stages and sinks declare theirs, and code that needs a
/// particular one (billing needs [`EffectivelyOnce`]) says so in its bounds.
pub trait Guarantee: Send + 'static {
    /// How logs and docs name it.
    const NAME: &'static str;
}

/// Every input's effect happens at least once: offsets are stored only after the outputs were
/// acknowledged, in partition order, so a crash redelivers and never loses. Downstream must
/// tolerate repeats.
pub struct AtLeastOnce;

/// At-least-once delivery into an idempotent effect (writes keyed by event id or source
/// coordinates), so a redelivery changes nothing: each input's effect is observed once.
pub struct EffectivelyOnce;

impl Guarantee for AtLeastOnce {
    const NAME: &'static str = "at-least-once";
}

impl Guarantee for EffectivelyOnce {
    const NAME: &'static str = "effectively-once";
}
