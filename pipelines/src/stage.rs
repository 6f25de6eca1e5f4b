//! A stage as a value. The binary's stage configurations each build [`Runnable`]s; a runnable
//! runs live in its consumer group ([`Runnable::run`], for `sluice up` and `sluice run
//! <stage>`) or over a past time range outside the group ([`Runnable::replay`], for `sluice
//! replay <stage>`), whatever kind of loop it is underneath: an operator's or a sink's.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Wiring,
    replay::{self, ReplayDeps, ReplayJob, ReplayReport},
    runtime::{self, EffectivelyOnce, Operator, PerRecord, RecordOperator, StageDeps, StageSpec},
    sink::{self, BatchSink, SinkSpec},
    Result,
};

/// A stage ready to run: its name, its input topic, and the loop that runs it.
pub struct Runnable {
    wiring: Wiring,
    task: Box<dyn Task>,
}

/// The time range a replay reads.
#[derive(Debug, Clone)]
pub struct ReplayRange {
    /// The topic to read (default: the stage's input topic).
    pub topic: Option<String>,
    /// Start, Unix milliseconds (inclusive).
    pub from_ms: i64,
    /// End, Unix milliseconds (exclusive).
    pub to_ms: i64,
}

impl Runnable {
    /// An operator stage: `make(lane)` makes each lane's operator.
    pub fn operator<O, F>(make: F, spec: StageSpec) -> Self
    where
        O: Operator,
        F: FnMut(usize) -> O + Send + 'static,
    {
        Self {
            wiring: spec.wiring.clone(),
            task: Box::new(OperatorTask { make, spec }),
        }
    }

    /// A stage of a [`RecordOperator`] run by the keyed loop ([`runtime::run_keyed`]): one
    /// key's records in order, different keys concurrently, up to `spec.max_in_flight`.
    pub fn record_operator<R: RecordOperator>(operator: Arc<R>, spec: StageSpec) -> Self {
        Self {
            wiring: spec.wiring.clone(),
            task: Box::new(RecordOperatorTask { operator, spec }),
        }
    }

    /// A sink stage whose writes are idempotent, as billing requires: the type refuses any
    /// other sink.
    pub fn effectively_once_sink<S: BatchSink<Delivery = EffectivelyOnce>>(
        sink: S,
        spec: SinkSpec,
    ) -> Self {
        Self::sink(sink, spec)
    }

    /// A sink stage.
    pub fn sink<S: BatchSink>(sink: S, spec: SinkSpec) -> Self {
        Self {
            wiring: spec.wiring.clone(),
            task: Box::new(SinkTask { sink, spec }),
        }
    }

    /// The stage's name (metrics, logs, dead letters, readiness).
    pub fn name(&self) -> &str {
        &self.wiring.name
    }

    /// Runs the stage in its consumer group until `cancel` fires.
    pub async fn run(self, deps: StageDeps, cancel: CancellationToken) -> Result<()> {
        self.task.run(deps, cancel).await
    }

    /// Feeds the records in `range` through the stage, outside its consumer group.
    pub async fn replay(self, range: ReplayRange, deps: &ReplayDeps) -> Result<ReplayReport> {
        let job = ReplayJob {
            stage: self.wiring.name,
            topic: range.topic.unwrap_or(self.wiring.input_topic),
            from_ms: range.from_ms,
            to_ms: range.to_ms,
        };
        self.task.replay(&job, deps).await
    }
}

#[async_trait]
trait Task: Send {
    async fn run(self: Box<Self>, deps: StageDeps, cancel: CancellationToken) -> Result<()>;
    async fn replay(self: Box<Self>, job: &ReplayJob, deps: &ReplayDeps) -> Result<ReplayReport>;
}

struct OperatorTask<F> {
    make: F,
    spec: StageSpec,
}

#[async_trait]
impl<O, F> Task for OperatorTask<F>
where
    O: Operator,
    F: FnMut(usize) -> O + Send + 'static,
{
    async fn run(self: Box<Self>, deps: StageDeps, cancel: CancellationToken) -> Result<()> {
        runtime::run_operator(self.make, self.spec, deps, cancel).await
    }

    async fn replay(
        mut self: Box<Self>,
        job: &ReplayJob,
        deps: &ReplayDeps,
    ) -> Result<ReplayReport> {
        replay::replay_operator(&mut (self.make)(0), job, deps).await
    }
}

struct RecordOperatorTask<R> {
    operator: Arc<R>,
    spec: StageSpec,
}

#[async_trait]
impl<R: RecordOperator> Task for RecordOperatorTask<R> {
    async fn run(self: Box<Self>, deps: StageDeps, cancel: CancellationToken) -> Result<()> {
        runtime::run_keyed(self.operator, self.spec, deps, cancel).await
    }

    async fn replay(self: Box<Self>, job: &ReplayJob, deps: &ReplayDeps) -> Result<ReplayReport> {
        replay::replay_operator(&mut PerRecord(self.operator), job, deps).await
    }
}

struct SinkTask<S> {
    sink: S,
    spec: SinkSpec,
}

#[async_trait]
impl<S: BatchSink> Task for SinkTask<S> {
    async fn run(self: Box<Self>, deps: StageDeps, cancel: CancellationToken) -> Result<()> {
        sink::run_sink(self.sink, self.spec, deps, cancel).await
    }

    async fn replay(
        mut self: Box<Self>,
        job: &ReplayJob,
        deps: &ReplayDeps,
    ) -> Result<ReplayReport> {
        replay::replay_sink(&mut self.sink, self.spec.max_batch, job, deps).await
    }
}
