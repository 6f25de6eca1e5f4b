//! A lane: one operator instance taking its share of a stage's records in batches (records of
//! one key, or of one partition, always reach the same lane, in order). It decodes, processes
//! with retries, dead-letters what the operator rejects, keeps per-partition event time, runs
//! the operator's hooks, and hands each batch's outputs to its acknowledger.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    acknowledger::{Acknowledger, Unacked},
    backoff,
    queue::LaneReceiver,
    watermarks::EventTime,
    BatchError, Emitter, Input, Operator, RecordContext, StageDeps, StageSpec,
};
use crate::{
    metrics::Metrics,
    now_ms,
    source::{Decoded, Decoder},
    trace::TraceContext,
    ProcessError,
};

/// How often a saturated operator without ticks is given one.
const SATURATED_RETRY: Duration = Duration::from_secs(1);

/// A lane's metric handles, looked up once rather than per batch.
pub(super) struct LaneMeters {
    in_flight: prometheus::IntGauge,
    batch_records: prometheus::Histogram,
    retries: prometheus::IntCounter,
}

impl LaneMeters {
    pub fn new(metrics: &Metrics, stage: &str) -> Self {
        Self {
            in_flight: metrics.in_flight.with_label_values(&[stage]),
            batch_records: metrics.batch_records.with_label_values(&[stage]),
            retries: metrics.retries.with_label_values(&[stage]),
        }
    }
}

/// One lane of a stage.
pub(super) struct Lane<O: Operator> {
    pub operator: O,
    pub spec: StageSpec,
    pub deps: StageDeps,
    pub producer: crate::kafka::Producer,
    /// Where outputs nobody waits on go ([`Emitter::emit_batched`]).
    pub batched: crate::kafka::Producer,
    pub decoder: Decoder,
    pub cancel: CancellationToken,
    pub time: EventTime,
    pub meters: LaneMeters,
    /// Set while the consumer waits for room in a full lane.
    pub consumer_waiting: Arc<AtomicBool>,
    /// Whether the operator held offsets back the last time it was asked.
    pub held_back: bool,
}

impl<O: Operator> Lane<O> {
    /// Processes the lane's batches one after another. Waiting for the broker's
    /// acknowledgements is left to a companion task, so the lane moves on to its next batch
    /// while earlier outputs are in flight; the acknowledger completes offsets in order.
    pub async fn run(
        mut self,
        mut rx: LaneReceiver,
        acks: Acknowledger,
        mut commits: Option<watch::Receiver<Vec<(i32, i64)>>>,
    ) {
        let stage = self.spec.wiring.name.clone();
        let (unacked_tx, unacked_rx) = mpsc::channel::<Unacked>(self.spec.max_unacked.max(1));
        let acknowledger = tokio::spawn(acks.run(unacked_rx));
        let mut tick = self.spec.tick.map(|every| {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut was_saturated = false;
        loop {
            let saturated = self.operator.saturated();
            if saturated != was_saturated {
                was_saturated = saturated;
                if saturated {
                    tracing::warn!(
                        stage,
                        "operator saturated: not taking records until it can flush"
                    );
                } else {
                    tracing::info!(stage, "operator can take records again");
                }
            }
            let unacked = tokio::select! {
                first = rx.recv(), if !saturated => match first {
                    Some(first) => {
                        let batch = self.collect(first, &mut rx).await;
                        if self.cancel.is_cancelled() {
                            // Not done: redelivered to whoever owns the partitions next.
                            continue;
                        }
                        self.handle(batch).await
                    }
                    None => break,
                },
                _ = next_tick(&mut tick) => {
                    // A partition is quiet only if nothing of it waits: not while this lane
                    // is not taking records, nor while the consumer waits on a full lane.
                    let quiet = !saturated
                        && rx.is_empty()
                        && !self.consumer_waiting.load(Ordering::Relaxed);
                    self.tick(quiet).await
                }
                _ = tokio::time::sleep(SATURATED_RETRY), if saturated && tick.is_none() => {
                    self.tick(false).await
                }
                _ = self.cancel.cancelled(), if saturated => break,
                positions = next_commit(&mut commits) => {
                    self.operator.on_commit(&positions);
                    None
                }
            };
            if let Some(unacked) = unacked {
                if unacked_tx.send(unacked).await.is_err() {
                    break;
                }
            }
        }
        let started = Instant::now();
        let mut out = self.emitter(TraceContext::new_root());
        if let Err(e) = self.operator.on_close(&mut out).await {
            tracing::error!(stage, error = %e, "operator failed to close");
        }
        let last = self.unacked(Vec::new(), started, &mut out);
        if unacked_tx.send(last).await.is_err() {
            tracing::error!(stage, "acknowledger gone before the last outputs");
        }
        drop(unacked_tx);
        if let Err(e) = acknowledger.await {
            tracing::error!(stage, error = %e, "acknowledger failed");
        }
    }

    /// An emitter for outputs carrying `trace`.
    fn emitter(&self, trace: TraceContext) -> Emitter {
        Emitter::new(self.producer.clone(), self.deps.codec.clone(), trace)
            .with_batched(self.batched.clone())
    }

    /// The batch that starts with `first`: whatever else is ready, up to `max_batch`, waiting
    /// up to `linger` for more.
    async fn collect(&self, first: OwnedMessage, rx: &mut LaneReceiver) -> Vec<OwnedMessage> {
        let max = self.spec.max_batch.max(1);
        let mut batch = Vec::with_capacity(max.min(256));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.spec.linger;
        while batch.len() < max {
            match rx.try_recv() {
                Ok(Some(message)) => batch.push(message),
                Err(_) => break,
                Ok(None) => {
                    if self.spec.linger.is_zero() {
                        break;
                    }
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(message) => batch.push(message),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = self.cancel.cancelled() => break,
                    }
                }
            }
        }
        batch
    }

    /// Decodes and processes one batch; its outputs are queued, not yet acknowledged.
    async fn handle(&mut self, messages: Vec<OwnedMessage>) -> Option<Unacked> {
        let started = Instant::now();
        self.meters.in_flight.add(messages.len() as i64);
        self.meters.batch_records.observe(messages.len() as f64);
        let contexts: Vec<RecordContext> = messages.iter().map(RecordContext::of).collect();
        let trace = match contexts.as_slice() {
            [only] => only.trace,
            _ => TraceContext::new_root(),
        };
        let span = tracing::debug_span!(
            "batch", stage = %self.spec.wiring.name, records = messages.len(),
            trace_id = %trace.trace_id_hex()
        );
        let unacked = self
            .handle_traced(&messages, contexts, trace, started)
            .instrument(span)
            .await;
        self.meters.in_flight.sub(messages.len() as i64);
        Some(unacked)
    }

    async fn handle_traced(
        &mut self,
        messages: &[OwnedMessage],
        contexts: Vec<RecordContext>,
        trace: TraceContext,
        started: Instant,
    ) -> Unacked {
        let mut done: Vec<(i32, i64)> = Vec::with_capacity(messages.len());
        let mut inputs: Vec<Input<O::Input>> = Vec::with_capacity(messages.len());
        for (message, ctx) in messages.iter().zip(contexts) {
            match self.decoder.decode::<O::Input>(message, &self.cancel).await {
                Decoded::Ok(record) => inputs.push(Input { record, ctx }),
                Decoded::DeadLettered => done.push((message.partition(), message.offset())),
                Decoded::Interrupted => {}
            }
        }
        let mut out = self.emitter(trace);
        let processed = self.process(&inputs, messages, &mut out).await;
        done.extend(processed);
        for rejected in out.take_rejected() {
            let reason = rejected.reason;
            let Some(message) = messages
                .iter()
                .find(|m| m.partition() == rejected.partition && m.offset() == rejected.offset)
            else {
                continue;
            };
            if !self
                .decoder
                .dead_letters()
                .send(message, &reason, &self.cancel)
                .await
            {
                // Neither processed nor dead-lettered: not done, redelivered later.
                done.retain(|d| *d != (rejected.partition, rejected.offset));
            }
        }
        if self.spec.watermarks.is_some() {
            for input in &inputs {
                let at = self.operator.event_time_ms(input);
                self.time.observe(input.ctx.partition, at);
            }
            self.advance_watermarks(false, &mut out).await;
        }
        self.unacked(done, started, &mut out)
    }

    /// Processes `inputs` (decoded from `messages`) with retries; returns the inputs done.
    async fn process(
        &mut self,
        inputs: &[Input<O::Input>],
        messages: &[OwnedMessage],
        out: &mut Emitter,
    ) -> Vec<(i32, i64)> {
        let stage = self.spec.wiring.name.clone();
        let mut done = Vec::with_capacity(inputs.len());
        let mut rest = inputs;
        let mut attempt = 0u32;
        while !rest.is_empty() {
            // Outputs queued before a failure still leave; downstream dedups them on retry.
            let (completed, error) = match self.operator.process(rest, out).await {
                Ok(()) => (rest.len(), None),
                Err(BatchError { completed, error }) => (completed.min(rest.len()), Some(error)),
            };
            done.extend(
                rest[..completed]
                    .iter()
                    .map(|i| (i.ctx.partition, i.ctx.offset)),
            );
            rest = &rest[completed..];
            let (Some(error), Some(head)) = (error, rest.first()) else {
                break;
            };
            let give_up = match error {
                ProcessError::Poison(reason) => Some(reason),
                ProcessError::Retriable(reason) => {
                    attempt += 1;
                    if attempt >= self.spec.max_attempts {
                        Some(format!("gave up after {attempt} attempts: {reason}"))
                    } else {
                        self.meters.retries.inc();
                        tracing::warn!(
                            stage, reason, attempt, trace_id = %head.ctx.trace.trace_id_hex(),
                            "processing failed; retrying"
                        );
                        if !self.pause(attempt).await {
                            break;
                        }
                        None
                    }
                }
            };
            if let Some(reason) = give_up {
                attempt = 0;
                let source = messages
                    .iter()
                    .find(|m| m.partition() == head.ctx.partition && m.offset() == head.ctx.offset);
                if let Some(message) = source {
                    if !self
                        .decoder
                        .dead_letters()
                        .send(message, &reason, &self.cancel)
                        .await
                    {
                        break;
                    }
                }
                done.push((head.ctx.partition, head.ctx.offset));
                rest = &rest[1..];
            }
        }
        done
    }

    /// Runs the operator's tick hook, and (when `quiet`) moves the watermarks of idle
    /// partitions.
    async fn tick(&mut self, quiet: bool) -> Option<Unacked> {
        let started = Instant::now();
        let mut out = self.emitter(TraceContext::new_root());
        if let Err(e) = self.operator.on_tick(&mut out).await {
            tracing::warn!(stage = %self.spec.wiring.name, error = %e, "tick failed");
        }
        if self.spec.watermarks.is_some() {
            self.advance_watermarks(quiet, &mut out).await;
        }
        Some(self.unacked(Vec::new(), started, &mut out))
    }

    /// Tells the operator about every partition whose watermark moved (idle partitions follow
    /// the wall clock when `idle` is set).
    async fn advance_watermarks(&mut self, idle: bool, out: &mut Emitter) {
        let Some(spec) = self.spec.watermarks else {
            return;
        };
        for (partition, watermark) in self.time.advance(&spec, idle, now_ms()) {
            self.deps
                .metrics
                .watermark_ms
                .with_label_values(&[&self.spec.wiring.name, &partition.to_string()])
                .set(watermark);
            if let Err(e) = self.operator.on_watermark(partition, watermark, out).await {
                tracing::warn!(stage = %self.spec.wiring.name, partition, error = %e, "watermark hook failed");
            }
        }
    }

    /// Packs what a batch or hook produced for the acknowledger.
    fn unacked(
        &mut self,
        records: Vec<(i32, i64)>,
        started: Instant,
        out: &mut Emitter,
    ) -> Unacked {
        let retained = self.operator.retained();
        let holds = !retained.is_empty();
        let retained = (holds || self.held_back).then_some(retained);
        self.held_back = holds;
        Unacked {
            topic: self.spec.wiring.input_topic.clone(),
            records,
            started,
            deliveries: out.take_pending(),
            retained,
        }
    }

    /// Sleeps before a retry; false if shutdown interrupted it.
    async fn pause(&self, attempt: u32) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(backoff(attempt)) => true,
        }
    }
}

/// The positions stored so far, once they change; never, for operators that do not ask.
async fn next_commit(commits: &mut Option<watch::Receiver<Vec<(i32, i64)>>>) -> Vec<(i32, i64)> {
    if let Some(receiver) = commits {
        if receiver.changed().await.is_ok() {
            return receiver.borrow_and_update().clone();
        }
        *commits = None;
    }
    std::future::pending().await
}

async fn next_tick(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
