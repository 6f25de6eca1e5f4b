//! The operator runtime: consume → decode → process in batches → produce → store offsets.
//!
//! # Delivery
//! At-least-once transport with ordered offset storage: a record's offset is stored for commit
//! only after every record the operator emitted for it was acknowledged by the broker (or the
//! record went to the DLQ), once every earlier record of its partition is done too, and never
//! past what the operator still retains in its state ([`Operator::retained`]). A crash
//! therefore redelivers, never loses; effects are made idempotent downstream (deterministic
//! event ids, `seq` numbers on reply chunks, window rows versioned by their record count), which
//! is what [`EffectivelyOnce`] names.
//!
//! # Concurrency, order and backpressure
//! Records are spread over `lanes` by key (or by partition, for operators whose state is per
//! partition); each lane owns one operator instance and hands it batches of the records that
//! are ready (up to `max_batch`, waiting at most `linger` for more), so one key's records stay
//! in order while different keys proceed in parallel. Lane queues are bounded: when a lane is
//! full the consumer waits for room (counted in `sluice_lane_full_waits_total`), so a slow
//! downstream stops consumption; nothing buffers without limit. A wait longer than
//! [`kafka::PAUSE_AFTER`] pauses the stage's partitions (`sluice_consumer_pauses_total`):
//! librdkafka drops what it fetched ahead and the consumer stays in its group however long the
//! stall, resuming where it stopped. (Every partition pauses, not only those feeding the full
//! lane: with lanes by key, one partition feeds every lane.)
//!
//! # Failures
//! A record that does not decode, or that the operator rejects as poison, goes to the DLQ with
//! the reason and its source topic/partition/offset. Retriable failures are retried with
//! exponential backoff and jitter, and the record goes to the DLQ after `max_attempts`.
//!
//! # Time
//! Stages with [`WatermarkSpec`] get per-partition event-time watermarks (the highest event
//! time seen minus the allowed out-of-orderness, advanced with the wall clock when a partition
//! goes idle) through [`Operator::on_watermark`], and ticks through [`Operator::on_tick`].

mod emit;
mod offsets;
mod operator;

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use rdkafka::{
    consumer::{CommitMode, Consumer},
    message::{Message, OwnedMessage},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};
use sluice_schemas::Codec;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use emit::{DeadLetters, Emitter, Rejected};
pub use operator::{
    AtLeastOnce, BatchError, EffectivelyOnce, Guarantee, Input, Operator, PerRecord, RecordContext,
    RecordOperator,
};

use crate::{
    config::KafkaConfig,
    kafka::{self, KafkaConsumer, ProducerProfile},
    metrics::Metrics,
    now_ms,
    ops::Readiness,
    trace::TraceContext,
    ProcessError, Result,
};
use offsets::OffsetTracker;

/// How records are spread over a stage's lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneBy {
    /// By record key: one key's records go through one lane, in order.
    Key,
    /// By partition: one partition's records go through one lane, in offset order (for
    /// operators with per-partition state, such as event-time windows).
    Partition,
}

/// Event-time settings of a stage.
#[derive(Debug, Clone, Copy)]
pub struct WatermarkSpec {
    /// How far out of order records may arrive: the watermark trails the highest event time
    /// seen on a partition by this much.
    pub max_out_of_orderness: Duration,
    /// After this long without records on a partition its watermark follows the wall clock
    /// (minus the out-of-orderness), so windows of a quiet partition still close.
    pub idle_after: Duration,
}

/// How one stage runs: what it reads, in which group, with how much parallelism.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Stage name for metrics, logs and DLQ records (`router`, `orchestrator`, ...).
    pub name: String,
    /// Consumer group; instances of a stage share it and split the partitions.
    pub group: String,
    /// Topic to consume.
    pub input_topic: String,
    /// DLQ topic.
    pub dlq_topic: String,
    /// Lanes, each with its own operator instance, processing concurrently.
    pub lanes: usize,
    /// How records are spread over the lanes.
    pub lane_by: LaneBy,
    /// Records queued per lane before the consumer waits for room.
    pub lane_capacity: usize,
    /// Most records handed to the operator at once.
    pub max_batch: usize,
    /// Longest a lane waits for more records before processing a batch that is not full
    /// (zero: process what is ready, the latency path).
    pub linger: Duration,
    /// Attempts on retriable failures before a record goes to the DLQ.
    pub max_attempts: u32,
    /// Processed batches per lane whose outputs may await the broker's acknowledgement at once.
    pub max_unacked: usize,
    /// Broker fetch wait; small on the interactive path.
    pub fetch_wait_ms: u32,
    /// How often [`Operator::on_tick`] runs, if at all.
    pub tick: Option<Duration>,
    /// Event-time watermarks, if the operator uses them.
    pub watermarks: Option<WatermarkSpec>,
}

impl StageSpec {
    /// A spec with the runtime's defaults (the latency path: 32 lanes by key, no linger).
    pub fn new(name: &str, group: &str, input_topic: &str, dlq_topic: &str) -> Self {
        Self {
            name: name.to_owned(),
            group: group.to_owned(),
            input_topic: input_topic.to_owned(),
            dlq_topic: dlq_topic.to_owned(),
            lanes: 32,
            lane_by: LaneBy::Key,
            lane_capacity: 16,
            max_batch: 64,
            linger: Duration::ZERO,
            max_attempts: 6,
            max_unacked: 256,
            fetch_wait_ms: 5,
            tick: None,
            watermarks: None,
        }
    }
}

/// What a stage needs from its process.
#[derive(Clone)]
pub struct StageDeps {
    pub kafka: KafkaConfig,
    pub codec: Arc<Codec>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
}

/// How often a saturated operator without ticks is given one.
const SATURATED_RETRY: Duration = Duration::from_secs(1);

/// How often consumer lag is measured.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// Exponential backoff with full jitter: attempt 1 waits up to 100 ms, doubling to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

/// Runs the stage described by `spec` until `cancel` fires, with one operator per lane made by
/// `make_operator(lane)`; then drains the lanes, closes the operators, stores the final
/// offsets and commits them.
pub async fn run_operator<O: Operator>(
    mut make_operator: impl FnMut(usize) -> O,
    spec: StageSpec,
    deps: StageDeps,
    cancel: CancellationToken,
) -> Result<()> {
    let consumer = Arc::new(kafka::consumer(
        &deps.kafka,
        &spec.group,
        spec.fetch_wait_ms,
        None,
        Some(&deps.metrics),
    )?);
    consumer.subscribe(&[&spec.input_topic])?;
    let producer = kafka::producer(&deps.kafka, ProducerProfile::Latency)?;
    let dead_letters = DeadLetters::new(
        producer.clone(),
        deps.codec.clone(),
        &spec.dlq_topic,
        &spec.name,
        deps.metrics.clone(),
    );
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let consumer_waiting = Arc::new(AtomicBool::new(false));
    let (commits, _) = watch::channel(Vec::<(i32, i64)>::new());
    let commits = Arc::new(commits);
    let lanes_count = spec.lanes.max(1);
    let mut lanes = Vec::with_capacity(lanes_count);
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..lanes_count {
        let (tx, rx) = mpsc::channel::<OwnedMessage>(spec.lane_capacity.max(1));
        lanes.push(tx);
        let lane = Lane {
            operator: make_operator(index),
            spec: spec.clone(),
            deps: deps.clone(),
            producer: producer.clone(),
            dead_letters: dead_letters.clone(),
            cancel: cancel.clone(),
            time: EventTime::default(),
            meters: LaneMeters::new(&deps.metrics, &spec.name),
            consumer_waiting: consumer_waiting.clone(),
            held_back: false,
        };
        let acks = Acknowledger {
            lane: index,
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            producer: producer.clone(),
            metrics: deps.metrics.clone(),
            stage: spec.name.clone(),
            cancel: cancel.clone(),
            commits: commits.clone(),
        };
        let commit_feed = O::WANTS_COMMITS.then(|| commits.subscribe());
        workers.spawn(lane.run(rx, acks, commit_feed));
    }
    let lag = kafka::LagReporter::start(
        consumer.clone(),
        &spec.group,
        deps.metrics.clone(),
        LAG_EVERY,
    );
    deps.readiness.set(&spec.name, true);
    tracing::info!(
        stage = %spec.name, topic = %spec.input_topic, group = %spec.group,
        lanes = lanes_count, max_batch = spec.max_batch, "stage started"
    );

    consume(
        &consumer,
        &lanes,
        &tracker,
        &consumer_waiting,
        &spec,
        &deps,
        &cancel,
    )
    .await;

    deps.readiness.set(&spec.name, false);
    lag.stop().await;
    drop(lanes);
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            tracing::error!(stage = %spec.name, error = %e, "lane task failed");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(stage = %spec.name, error = %e, "final commit had nothing to do");
    }
    tracing::info!(stage = %spec.name, "stage stopped");
    Ok(())
}

/// The consume loop: hands each record to its lane, waiting while the lane is full (so a
/// slow lane stops consumption instead of filling memory) and pausing the partitions if the
/// wait is long (see [`kafka::HoldBack`]).
async fn consume(
    consumer: &KafkaConsumer,
    lanes: &[mpsc::Sender<OwnedMessage>],
    tracker: &Mutex<OffsetTracker>,
    consumer_waiting: &AtomicBool,
    spec: &StageSpec,
    deps: &StageDeps,
    cancel: &CancellationToken,
) {
    let records_in = deps.metrics.records_in.with_label_values(&[&spec.name]);
    let waiting = deps
        .metrics
        .lane_full_waits
        .with_label_values(&[&spec.name]);
    let mut hold_back = kafka::HoldBack::new(&deps.metrics, &spec.name);
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => break,
            received = hold_back.recv(consumer) => received,
        };
        let message = match received {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(stage = %spec.name, error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        records_in.inc();
        if let Ok(mut t) = tracker.lock() {
            t.begin(message.partition(), message.offset());
        }
        let lane = match spec.lane_by {
            LaneBy::Key => lane_of(message.key(), message.partition(), lanes.len()),
            LaneBy::Partition => lane_of(None, message.partition(), lanes.len()),
        };
        let message = match lanes[lane].try_send(message) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        waiting.inc();
        consumer_waiting.store(true, Ordering::Relaxed);
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            sent = hold_back.hold(consumer, lanes[lane].send(message)) => sent.is_err(),
        };
        consumer_waiting.store(false, Ordering::Relaxed);
        if stop {
            break;
        }
    }
}

fn lane_of(key: Option<&[u8]>, partition: i32, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match key {
        Some(k) => k.hash(&mut hasher),
        None => partition.hash(&mut hasher),
    }
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

/// A lane's metric handles, looked up once rather than per batch.
struct LaneMeters {
    in_flight: prometheus::IntGauge,
    batch_records: prometheus::Histogram,
    retries: prometheus::IntCounter,
}

impl LaneMeters {
    fn new(metrics: &Metrics, stage: &str) -> Self {
        Self {
            in_flight: metrics.in_flight.with_label_values(&[stage]),
            batch_records: metrics.batch_records.with_label_values(&[stage]),
            retries: metrics.retries.with_label_values(&[stage]),
        }
    }
}

/// Per-partition event time seen by one lane.
#[derive(Default)]
struct EventTime {
    highest: HashMap<i32, i64>,
    last_record: HashMap<i32, Instant>,
    watermark: HashMap<i32, i64>,
}

struct Lane<O: Operator> {
    operator: O,
    spec: StageSpec,
    deps: StageDeps,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    cancel: CancellationToken,
    time: EventTime,
    meters: LaneMeters,
    /// Set while the consumer waits for room in a full lane.
    consumer_waiting: Arc<AtomicBool>,
    /// Whether the operator held offsets back the last time it was asked.
    held_back: bool,
}

/// A processed batch (or hook call) whose outputs await the broker's acknowledgement.
struct Unacked {
    topic: String,
    /// (partition, offset) of the inputs done with this batch.
    records: Vec<(i32, i64)>,
    started: Instant,
    deliveries: Vec<(String, DeliveryFuture)>,
    /// What the operator retains after this batch, when it changed or may have.
    retained: Option<Vec<(i32, i64)>>,
}

impl<O: Operator> Lane<O> {
    /// Processes the lane's batches one after another. Waiting for the broker's
    /// acknowledgements is left to a companion task, so the lane moves on to its next batch
    /// while earlier outputs are in flight; the acknowledger completes offsets in order.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<OwnedMessage>,
        acks: Acknowledger,
        mut commits: Option<watch::Receiver<Vec<(i32, i64)>>>,
    ) {
        let stage = self.spec.name.clone();
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
        let mut out = Emitter::new(
            self.producer.clone(),
            self.deps.codec.clone(),
            TraceContext::new_root(),
        );
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

    /// The batch that starts with `first`: whatever else is ready, up to `max_batch`, waiting
    /// up to `linger` for more.
    async fn collect(
        &self,
        first: OwnedMessage,
        rx: &mut mpsc::Receiver<OwnedMessage>,
    ) -> Vec<OwnedMessage> {
        let max = self.spec.max_batch.max(1);
        let mut batch = Vec::with_capacity(max.min(256));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.spec.linger;
        while batch.len() < max {
            match rx.try_recv() {
                Ok(message) => batch.push(message),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
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
            "batch", stage = %self.spec.name, records = messages.len(),
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
            match self.decode(message).await {
                Decoded::Ok(record) => inputs.push(Input { record, ctx }),
                Decoded::DeadLettered => done.push((message.partition(), message.offset())),
                Decoded::Interrupted => {}
            }
        }
        let mut out = Emitter::new(self.producer.clone(), self.deps.codec.clone(), trace);
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
            if !self.dead_letters.send(message, &reason, &self.cancel).await {
                // Neither processed nor dead-lettered: not done, redelivered later.
                done.retain(|d| *d != (rejected.partition, rejected.offset));
            }
        }
        if self.spec.watermarks.is_some() {
            for input in &inputs {
                if let Some(at) = self.operator.event_time_ms(input) {
                    let highest = self.time.highest.entry(input.ctx.partition).or_insert(at);
                    *highest = (*highest).max(at);
                }
                self.time
                    .last_record
                    .insert(input.ctx.partition, Instant::now());
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
        let stage = self.spec.name.clone();
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
                    if !self.dead_letters.send(message, &reason, &self.cancel).await {
                        break;
                    }
                }
                done.push((head.ctx.partition, head.ctx.offset));
                rest = &rest[1..];
            }
        }
        done
    }

    async fn decode(&self, message: &OwnedMessage) -> Decoded<O::Input> {
        let stage = self.spec.name.as_str();
        let payload = message.payload().unwrap_or_default();
        let mut attempt = 0u32;
        loop {
            match self.deps.codec.decode::<O::Input>(payload).await {
                Ok(input) => return Decoded::Ok(input),
                Err(e) if e.is_retriable() => {
                    attempt += 1;
                    self.meters.retries.inc();
                    tracing::warn!(stage, error = %e, attempt, "cannot decode yet; retrying");
                    if !self.pause(attempt).await {
                        return Decoded::Interrupted;
                    }
                }
                Err(e) => {
                    let reason = format!("undecodable: {e}");
                    return if self.dead_letters.send(message, &reason, &self.cancel).await {
                        Decoded::DeadLettered
                    } else {
                        Decoded::Interrupted
                    };
                }
            }
        }
    }

    /// Runs the operator's tick hook, and (when `quiet`) moves the watermarks of idle
    /// partitions.
    async fn tick(&mut self, quiet: bool) -> Option<Unacked> {
        let started = Instant::now();
        let mut out = Emitter::new(
            self.producer.clone(),
            self.deps.codec.clone(),
            TraceContext::new_root(),
        );
        if let Err(e) = self.operator.on_tick(&mut out).await {
            tracing::warn!(stage = %self.spec.name, error = %e, "tick failed");
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
        let delay = i64::try_from(spec.max_out_of_orderness.as_millis()).unwrap_or(i64::MAX);
        let mut moved = Vec::new();
        for (partition, highest) in &self.time.highest {
            let mut watermark = highest.saturating_sub(delay);
            let quiet = self
                .time
                .last_record
                .get(partition)
                .is_some_and(|at| at.elapsed() >= spec.idle_after);
            if idle && quiet {
                watermark = watermark.max(now_ms().saturating_sub(delay));
            }
            let previous = self.time.watermark.get(partition).copied();
            if previous.is_none_or(|p| watermark > p) {
                moved.push((*partition, watermark));
            }
        }
        moved.sort_unstable();
        for (partition, watermark) in moved {
            self.time.watermark.insert(partition, watermark);
            self.deps
                .metrics
                .watermark_ms
                .with_label_values(&[&self.spec.name, &partition.to_string()])
                .set(watermark);
            if let Err(e) = self.operator.on_watermark(partition, watermark, out).await {
                tracing::warn!(stage = %self.spec.name, partition, error = %e, "watermark hook failed");
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
            topic: self.spec.input_topic.clone(),
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

enum Decoded<T> {
    Ok(T),
    /// Undecodable; sent to the DLQ (done).
    DeadLettered,
    /// Shutdown came first; not done, to be redelivered.
    Interrupted,
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

/// Waits, batch by batch in lane order, for the broker to acknowledge each batch's outputs,
/// then marks its records done so their offsets can be committed. An output the broker refused
/// after the producer's own retries is sent again until it is acknowledged (or shutdown leaves
/// the records to be redelivered).
struct Acknowledger {
    lane: usize,
    consumer: Arc<KafkaConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    stage: String,
    cancel: CancellationToken,
    commits: Arc<watch::Sender<Vec<(i32, i64)>>>,
}

impl Acknowledger {
    async fn run(self, mut unacked: mpsc::Receiver<Unacked>) {
        let stage = self.stage.as_str();
        let process_seconds = self.metrics.process_seconds.with_label_values(&[stage]);
        let mut records_out: HashMap<String, prometheus::IntCounter> = HashMap::new();
        // Positions to store, per (topic, partition); stored once the channel has nothing
        // ready, so a burst of batches costs one store per partition.
        let mut to_store: HashMap<(String, i32), i64> = HashMap::new();
        // Once a batch is left unacknowledged, nothing after it in this lane may complete
        // (its offsets and its operator's releases would skip past the gap).
        let mut blocked = false;
        'batches: loop {
            let batch = match unacked.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.store(&mut to_store);
                    match unacked.recv().await {
                        Some(batch) => batch,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            for (topic, delivery) in batch.deliveries {
                let mut outcome = delivery.await;
                let mut attempt = 0;
                loop {
                    let failed = match outcome {
                        Ok(Ok(_)) => break,
                        Ok(Err((e, message))) => {
                            tracing::error!(stage, topic, error = %e, "output not acknowledged; sending again");
                            message
                        }
                        Err(_) => {
                            tracing::error!(
                                stage,
                                topic,
                                "delivery report lost; leaving the batch for redelivery"
                            );
                            blocked = true;
                            continue 'batches;
                        }
                    };
                    attempt += 1;
                    tokio::select! {
                        _ = self.cancel.cancelled() => {
                            blocked = true;
                            continue 'batches;
                        }
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                    outcome = resend(&self.producer, &failed).await;
                }
                records_out
                    .entry(topic)
                    .or_insert_with_key(|topic| {
                        self.metrics.records_out.with_label_values(&[stage, topic])
                    })
                    .inc();
            }
            if !batch.records.is_empty() {
                process_seconds.observe(batch.started.elapsed().as_secs_f64());
            }
            if blocked {
                continue;
            }
            let moved = self
                .tracker
                .lock()
                .map(|mut t| t.finish(self.lane, &batch.records, batch.retained.as_deref()))
                .unwrap_or_default();
            for (partition, position) in moved {
                to_store.insert((batch.topic.clone(), partition), position);
            }
        }
        self.store(&mut to_store);
    }

    fn store(&self, to_store: &mut HashMap<(String, i32), i64>) {
        if to_store.is_empty() {
            return;
        }
        let mut stored = Vec::with_capacity(to_store.len());
        for ((topic, partition), position) in to_store.drain() {
            store_position(&self.consumer, &topic, partition, position);
            stored.push((partition, position));
        }
        if self.commits.receiver_count() > 0 {
            self.commits.send_modify(|positions| {
                for (partition, position) in stored {
                    match positions.iter_mut().find(|(p, _)| *p == partition) {
                        Some(entry) => entry.1 = entry.1.max(position),
                        None => positions.push((partition, position)),
                    }
                }
            });
        }
    }
}

/// Stores `position` as the commit offset of `topic`/`partition`.
fn store_position(consumer: &KafkaConsumer, topic: &str, partition: i32, position: i64) {
    let mut list = TopicPartitionList::new();
    if list
        .add_partition_offset(topic, partition, Offset::Offset(position))
        .is_ok()
    {
        if let Err(e) = consumer.store_offsets(&list) {
            // After a rebalance took the partition away; the new owner re-reads from the last
            // commit, which is what at-least-once means.
            tracing::debug!(error = %e, topic, partition, position, "offset not stored");
        }
    }
}

/// Produces `message` again, to the same partition, and waits for the outcome.
async fn resend(
    producer: &FutureProducer,
    message: &OwnedMessage,
) -> Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
> {
    let mut record = FutureRecord::to(message.topic())
        .payload(message.payload().unwrap_or_default())
        .partition(message.partition());
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(headers) = message.headers() {
        record = record.headers(headers.clone());
    }
    match producer.send_result(record) {
        Ok(delivery) => delivery.await,
        Err((e, _)) => Ok(Err((e, message.clone()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_maps_to_one_lane() {
        let a = lane_of(Some(b"session-1"), 0, 8);
        for _ in 0..10 {
            assert_eq!(lane_of(Some(b"session-1"), 3, 8), a);
        }
        assert!(lane_of(None, 5, 8) < 8);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(200));
        assert!(backoff(30) <= Duration::from_secs(5));
        assert!(backoff(30) >= Duration::from_millis(2500));
    }
}
