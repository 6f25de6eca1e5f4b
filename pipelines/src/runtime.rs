//! The operator runtime: consume → decode → process → produce → store offsets.
//!
//! # Delivery
//! At-least-once transport with ordered offset storage: a record's offset is stored for commit
//! only after every record the operator emitted for it was acknowledged by the broker (or the
//! record went to the DLQ), and only once every earlier record of its partition is done too.
//! A crash therefore redelivers, never loses; effects are made idempotent downstream
//! (deterministic event ids, `seq` numbers on reply chunks).
//!
//! # Concurrency and order
//! Records are spread over `lanes` by key, each lane processing its records one at a time, so
//! one key's records stay in order while different keys proceed in parallel. Lanes have bounded
//! queues: when they are full the consumer stops pulling (backpressure), it never buffers
//! without limit.
//!
//! # Failures
//! A record that does not decode, or that the operator calls poison, goes to the DLQ with the
//! reason and its source topic/partition/offset. Retriable failures are retried with
//! exponential backoff and jitter, and go to the DLQ after `max_attempts`.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rand::Rng;
use rdkafka::{
    consumer::{CommitMode, Consumer},
    error::KafkaError,
    message::{Header, Headers, Message, OwnedHeaders, OwnedMessage},
    producer::{future_producer::Delivery, DeliveryFuture, FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
    Offset, TopicPartitionList,
};
use sluice_schemas::{Codec, DeadLetter, Record};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::KafkaConfig,
    kafka::{self, KafkaConsumer, ProducerProfile},
    metrics::Metrics,
    now_ms,
    ops::Readiness,
    trace::{TraceContext, TRACEPARENT},
    ProcessError, Result,
};

/// A stream operator: turns one input record into any number of output records.
///
/// Implementations hold their configuration and shared state; the runtime calls `process`
/// concurrently for records with different keys and sequentially for records with the same key.
#[async_trait]
pub trait Operator: Send + Sync + 'static {
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

/// Where a record came from, and the trace it belongs to.
#[derive(Debug, Clone)]
pub struct RecordContext {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
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
            trace: parent
                .map(|p| p.child())
                .unwrap_or_else(TraceContext::new_root),
        }
    }
}

/// Produces an operator's outputs, carrying the trace context, and remembers their delivery
/// acknowledgements so the runtime can wait for them before storing the input's offset.
pub struct Emitter {
    producer: FutureProducer,
    codec: Arc<Codec>,
    /// The `traceparent` every output carries, formatted once.
    traceparent: String,
    pending: Vec<(String, DeliveryFuture)>,
}

impl Emitter {
    /// An emitter whose outputs carry `trace`.
    pub fn new(producer: FutureProducer, codec: Arc<Codec>, trace: TraceContext) -> Self {
        Self {
            producer,
            codec,
            traceparent: trace.to_header(),
            pending: Vec::new(),
        }
    }

    /// Encodes and sends `record` to `topic` (to `partition` if given, else by key). The send
    /// is queued at once; [`Emitter::flush`] waits for the broker's acknowledgements.
    pub async fn emit<T: Record>(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        record: &T,
    ) -> Result<(), ProcessError> {
        let payload = self.codec.encode(record)?;
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: TRACEPARENT,
                value: Some(self.traceparent.as_bytes()),
            });
            let mut future = FutureRecord::to(topic)
                .key(key)
                .payload(&payload)
                .headers(headers);
            if let Some(partition) = partition {
                future = future.partition(partition);
            }
            match self.producer.send_result(future) {
                Ok(delivery) => {
                    self.pending.push((topic.to_owned(), delivery));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(ProcessError::Retriable(format!("produce to {topic}: {e}")))
                }
            }
        }
    }

    /// The queued sends and their acknowledgements, for the caller to await.
    pub fn into_pending(self) -> Vec<(String, DeliveryFuture)> {
        self.pending
    }

    /// Waits for every queued send; returns the topics written, one entry per record.
    pub async fn flush(&mut self) -> Result<Vec<String>, ProcessError> {
        let mut written = Vec::with_capacity(self.pending.len());
        let mut failure = None;
        for (topic, delivery) in self.pending.drain(..) {
            match delivery.await {
                Ok(Ok(Delivery { .. })) => written.push(topic),
                Ok(Err((e, _))) => failure = Some(format!("delivery to {topic} failed: {e}")),
                Err(_) => failure = Some(format!("delivery to {topic} was cancelled")),
            }
        }
        match failure {
            Some(reason) => Err(ProcessError::Retriable(reason)),
            None => Ok(written),
        }
    }
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
    /// Records processed concurrently (records with one key always go through one lane).
    pub lanes: usize,
    /// Records queued per lane before the consumer pauses.
    pub lane_capacity: usize,
    /// Attempts on retriable failures before a record goes to the DLQ.
    pub max_attempts: u32,
    /// Processed records per lane whose outputs may await the broker's acknowledgement at once.
    pub max_unacked: usize,
    /// Broker fetch wait; small on the interactive path.
    pub fetch_wait_ms: u32,
}

impl StageSpec {
    /// A spec with the runtime's defaults.
    pub fn new(name: &str, group: &str, input_topic: &str, dlq_topic: &str) -> Self {
        Self {
            name: name.to_owned(),
            group: group.to_owned(),
            input_topic: input_topic.to_owned(),
            dlq_topic: dlq_topic.to_owned(),
            lanes: 32,
            lane_capacity: 16,
            max_attempts: 6,
            max_unacked: 256,
            fetch_wait_ms: 5,
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

/// How often consumer lag is measured.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// Exponential backoff with full jitter: attempt 1 waits up to 100 ms, doubling to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

/// Per-partition bookkeeping of records in flight, to store offsets in partition order.
#[derive(Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

#[derive(Default)]
struct PartitionOffsets {
    pending: BTreeSet<i64>,
    highest_seen: Option<i64>,
    stored: Option<i64>,
}

impl OffsetTracker {
    pub(crate) fn begin(&mut self, partition: i32, offset: i64) {
        let p = self.partitions.entry(partition).or_default();
        p.pending.insert(offset);
        p.highest_seen = Some(p.highest_seen.map_or(offset, |h| h.max(offset)));
    }

    /// Marks `offset` done; returns the new commit position (next offset to read) if it moved.
    pub(crate) fn complete(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        p.pending.remove(&offset);
        let position = match p.pending.first() {
            Some(first) => *first,
            None => p.highest_seen? + 1,
        };
        if p.stored.is_some_and(|s| s >= position) {
            return None;
        }
        p.stored = Some(position);
        Some(position)
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

/// Writes records that cannot be processed to the DLQ.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    codec: Arc<Codec>,
    topic: String,
    stage: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// A DLQ writer for `stage`.
    pub fn new(
        producer: FutureProducer,
        codec: Arc<Codec>,
        topic: &str,
        stage: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            producer,
            codec,
            topic: topic.to_owned(),
            stage: stage.to_owned(),
            metrics,
        }
    }

    /// Sends `message` to the DLQ with `reason`, retrying until the broker acknowledges or
    /// `cancel` fires (then the record is not marked done and will be redelivered).
    pub async fn send(
        &self,
        message: &OwnedMessage,
        reason: &str,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::warn!(
            stage = %self.stage, topic = message.topic(), partition = message.partition(),
            offset = message.offset(), reason, "record sent to the DLQ"
        );
        let letter = DeadLetter {
            source_topic: message.topic().to_owned(),
            source_partition: message.partition(),
            source_offset: message.offset(),
            stage: self.stage.clone(),
            reason: reason.to_owned(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            failed_at_ms: now_ms(),
        };
        let ctx = RecordContext::of(message);
        let mut attempt = 0;
        loop {
            let mut out = Emitter::new(self.producer.clone(), self.codec.clone(), ctx.trace);
            let result = match out
                .emit(&self.topic, None, message.topic().as_bytes(), &letter)
                .await
            {
                Ok(()) => out.flush().await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.metrics
                        .dlq_records
                        .with_label_values(&[&self.stage])
                        .inc();
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "cannot write to the DLQ; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                }
            }
        }
    }
}

/// Runs `operator` as the stage described by `spec` until `cancel` fires, then drains the
/// lanes, stores the final offsets and commits them.
pub async fn run_operator<O: Operator>(
    operator: Arc<O>,
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
    let lanes_count = spec.lanes.max(1);
    let mut lanes = Vec::with_capacity(lanes_count);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..lanes_count {
        let (tx, rx) = mpsc::channel::<OwnedMessage>(spec.lane_capacity.max(1));
        lanes.push(tx);
        let lane = Lane {
            operator: operator.clone(),
            spec: spec.clone(),
            deps: deps.clone(),
            producer: producer.clone(),
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            dead_letters: dead_letters.clone(),
            cancel: cancel.clone(),
        };
        workers.spawn(lane.run(rx));
    }
    let lag = kafka::LagReporter::start(
        consumer.clone(),
        &spec.group,
        deps.metrics.clone(),
        LAG_EVERY,
    );
    deps.readiness.set(&spec.name, true);
    tracing::info!(stage = %spec.name, topic = %spec.input_topic, group = %spec.group, lanes = lanes_count, "stage started");

    let records_in = deps.metrics.records_in.with_label_values(&[&spec.name]);
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(m) => m.detach(),
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
        let lane = lane_of(message.key(), message.partition(), lanes_count);
        let send = lanes[lane].send(message);
        tokio::select! {
            _ = cancel.cancelled() => break,
            sent = send => if sent.is_err() { break },
        }
    }

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

fn lane_of(key: Option<&[u8]>, partition: i32, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match key {
        Some(k) => k.hash(&mut hasher),
        None => partition.hash(&mut hasher),
    }
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

struct Lane<O: Operator> {
    operator: Arc<O>,
    spec: StageSpec,
    deps: StageDeps,
    producer: FutureProducer,
    consumer: Arc<KafkaConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    dead_letters: DeadLetters,
    cancel: CancellationToken,
}

/// How handling one record ended.
enum Handled {
    /// Processed (or dead-lettered); its outputs are on their way to the broker.
    Sent(Vec<(String, DeliveryFuture)>),
    /// Interrupted by shutdown: not done, to be redelivered.
    Redeliver,
}

/// A processed record whose outputs await the broker's acknowledgement.
struct Unacked {
    topic: String,
    partition: i32,
    offset: i64,
    started: Instant,
    deliveries: Vec<(String, DeliveryFuture)>,
}

impl<O: Operator> Lane<O> {
    /// Processes the lane's records one after another. Waiting for the broker's
    /// acknowledgements is left to a companion task, so the lane moves on to its next record
    /// while earlier outputs are in flight; the acknowledger completes offsets in order.
    async fn run(self, mut rx: mpsc::Receiver<OwnedMessage>) {
        let stage = self.spec.name.clone();
        let (unacked_tx, unacked_rx) = mpsc::channel::<Unacked>(self.spec.max_unacked.max(1));
        let acknowledger = tokio::spawn(acknowledge(
            unacked_rx,
            self.consumer.clone(),
            self.tracker.clone(),
            self.producer.clone(),
            self.deps.metrics.clone(),
            stage.clone(),
            self.cancel.clone(),
        ));
        let in_flight = self.deps.metrics.in_flight.with_label_values(&[&stage]);
        while let Some(message) = rx.recv().await {
            if self.cancel.is_cancelled() {
                // Not done: it will be redelivered to whoever owns the partition next.
                continue;
            }
            let started = Instant::now();
            in_flight.inc();
            let handled = self.handle(&message).await;
            in_flight.dec();
            let Handled::Sent(deliveries) = handled else {
                continue;
            };
            let unacked = Unacked {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                started,
                deliveries,
            };
            if unacked_tx.send(unacked).await.is_err() {
                break;
            }
        }
        drop(unacked_tx);
        if let Err(e) = acknowledger.await {
            tracing::error!(stage, error = %e, "acknowledger failed");
        }
    }

    /// Processes one record; its outputs are queued, not yet acknowledged.
    async fn handle(&self, message: &OwnedMessage) -> Handled {
        let stage = self.spec.name.as_str();
        let ctx = RecordContext::of(message);
        let span = tracing::debug_span!(
            "record", stage, trace_id = %ctx.trace.trace_id_hex(),
            partition = ctx.partition, offset = ctx.offset
        );
        self.handle_traced(message, &ctx).instrument(span).await
    }

    async fn dead_letter(&self, message: &OwnedMessage, reason: &str) -> Handled {
        if self.dead_letters.send(message, reason, &self.cancel).await {
            Handled::Sent(Vec::new())
        } else {
            Handled::Redeliver
        }
    }

    async fn handle_traced(&self, message: &OwnedMessage, ctx: &RecordContext) -> Handled {
        let stage = self.spec.name.as_str();
        let payload = message.payload().unwrap_or_default();
        let mut attempt = 0u32;
        let input = loop {
            match self.deps.codec.decode::<O::Input>(payload).await {
                Ok(input) => break input,
                Err(e) if e.is_retriable() => {
                    attempt += 1;
                    self.deps.metrics.retries.with_label_values(&[stage]).inc();
                    tracing::warn!(stage, error = %e, attempt, "cannot decode yet; retrying");
                    if !self.pause(attempt).await {
                        return Handled::Redeliver;
                    }
                }
                Err(e) => {
                    return self
                        .dead_letter(message, &format!("undecodable: {e}"))
                        .await
                }
            }
        };
        let mut attempt = 0u32;
        loop {
            let mut out = Emitter::new(self.producer.clone(), self.deps.codec.clone(), ctx.trace);
            // Outputs queued before a failure still leave; downstream dedups them on retry.
            match self.operator.process(input.clone(), ctx, &mut out).await {
                Ok(()) => return Handled::Sent(out.into_pending()),
                Err(ProcessError::Poison(reason)) => {
                    return self.dead_letter(message, &reason).await
                }
                Err(ProcessError::Retriable(reason)) => {
                    attempt += 1;
                    if attempt >= self.spec.max_attempts {
                        let reason = format!("gave up after {attempt} attempts: {reason}");
                        return self.dead_letter(message, &reason).await;
                    }
                    self.deps.metrics.retries.with_label_values(&[stage]).inc();
                    tracing::warn!(stage, reason, attempt, trace_id = %ctx.trace.trace_id_hex(), "processing failed; retrying");
                    if !self.pause(attempt).await {
                        return Handled::Redeliver;
                    }
                }
            }
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

/// Waits, record by record in lane order, for the broker to acknowledge each record's outputs,
/// then marks the record done so its offset can be committed. An output the broker refused
/// after the producer's own retries is sent again until it is acknowledged (or shutdown
/// leaves the record to be redelivered).
async fn acknowledge(
    mut unacked: mpsc::Receiver<Unacked>,
    consumer: Arc<KafkaConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    stage: String,
    cancel: CancellationToken,
) {
    let process_seconds = metrics.process_seconds.with_label_values(&[&stage]);
    let mut records_out: HashMap<String, prometheus::IntCounter> = HashMap::new();
    // Positions to store, per (topic, partition); stored once the channel has nothing ready,
    // so a burst of records costs one store per partition rather than one per record.
    let mut to_store: HashMap<(String, i32), i64> = HashMap::new();
    'records: loop {
        let record = match unacked.try_recv() {
            Ok(record) => record,
            Err(mpsc::error::TryRecvError::Empty) => {
                for ((topic, partition), position) in to_store.drain() {
                    store_position(&consumer, &topic, partition, position);
                }
                match unacked.recv().await {
                    Some(record) => record,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        for (topic, delivery) in record.deliveries {
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
                            "delivery report lost; leaving the record for redelivery"
                        );
                        continue 'records;
                    }
                };
                attempt += 1;
                tokio::select! {
                    _ = cancel.cancelled() => continue 'records,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
                outcome = resend(&producer, &failed).await;
            }
            records_out
                .entry(topic)
                .or_insert_with_key(|topic| metrics.records_out.with_label_values(&[&stage, topic]))
                .inc();
        }
        process_seconds.observe(record.started.elapsed().as_secs_f64());
        let position = tracker
            .lock()
            .ok()
            .and_then(|mut t| t.complete(record.partition, record.offset));
        if let Some(position) = position {
            to_store.insert((record.topic, record.partition), position);
        }
    }
    for ((topic, partition), position) in to_store {
        store_position(&consumer, &topic, partition, position);
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
    fn offsets_are_stored_in_partition_order() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.begin(0, o);
        }
        t.begin(1, 5);
        assert_eq!(
            t.complete(0, 11),
            Some(10),
            "10 still pending: position stays at 10"
        );
        assert_eq!(t.complete(0, 10), Some(12));
        assert_eq!(
            t.complete(0, 13),
            None,
            "12 pending: position does not move"
        );
        assert_eq!(t.complete(0, 12), Some(14));
        assert_eq!(t.complete(1, 5), Some(6));
        assert_eq!(t.complete(7, 1), None, "unknown partition");
    }

    #[test]
    fn a_redelivered_lower_offset_never_moves_the_position_back() {
        let mut t = OffsetTracker::default();
        t.begin(0, 20);
        assert_eq!(t.complete(0, 20), Some(21));
        t.begin(0, 15);
        assert_eq!(t.complete(0, 15), None);
    }

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
