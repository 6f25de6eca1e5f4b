//! The keyed loop, for [`RecordOperator`]s: one key's records are processed one after another,
//! in partition order, while records of different keys run concurrently — up to the stage's
//! `max_in_flight` at once, all driven by one task.
//!
//! Lanes ([`super::lane`]) give an operator per lane and hand it batches, which suits operators
//! with state. A record operator holds no state and mostly waits (on a model, a tool, a store):
//! with lanes, a stage could wait on no more calls than it had lanes, a slow call held up every
//! key behind it in its lane, and each record cost hand-offs between three tasks (consumer,
//! lane, acknowledger). Here one task takes records from the consumer, starts each as soon as
//! its key is free, and polls every record's processing and every output's acknowledgement
//! itself, so a burst of records costs a few wake-ups, not a few per record.
//!
//! Offsets are stored as in the lane loop: a record is done once every output it emitted was
//! acknowledged (or it went to the DLQ), and the commit position moves past it only once every
//! earlier record of its partition is done.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use futures::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    acknowledger::{await_deliveries, store_position},
    backoff,
    offsets::OffsetTracker,
    Emitter, RecordContext, RecordOperator, StageDeps, StageSpec,
};
use crate::{
    kafka::{self, DeliveryFuture, Producer},
    metrics::Metrics,
    source::{Decoded, Decoder, SourceTuning, StageSource},
    ProcessError, Result,
};

/// What orders records: the record's key, or its partition for a record without one.
#[derive(Clone, PartialEq, Eq, Hash)]
enum OrderKey {
    Key(Vec<u8>),
    Partition(i32),
}

impl OrderKey {
    fn of(message: &OwnedMessage) -> Self {
        match message.key() {
            Some(key) => Self::Key(key.to_vec()),
            None => Self::Partition(message.partition()),
        }
    }
}

/// What every record's processing needs, shared.
struct Shared<R> {
    operator: Arc<R>,
    producer: Producer,
    batched: Producer,
    decoder: Decoder,
    codec: Arc<sluice_schemas::Codec>,
    stage: String,
    max_attempts: u32,
    retries: prometheus::IntCounter,
    cancel: CancellationToken,
}

/// How one record's processing ended.
enum Outcome {
    /// Processed, or sent to the DLQ; its outputs await acknowledgement.
    Done(Vec<(String, DeliveryFuture)>),
    /// Shutdown came first: not done, redelivered to whoever reads the partition next.
    Interrupted,
}

struct Processed {
    key: OrderKey,
    partition: i32,
    offset: i64,
    started: Instant,
    outcome: Outcome,
}

struct Acknowledged {
    partition: i32,
    offset: i64,
    started: Instant,
    /// The topic of each output, or `None` if they were not all acknowledged.
    delivered: Option<Vec<String>>,
}

/// Decodes and processes one record, retrying retriable failures with backoff and sending it to
/// the DLQ when it is poison or out of attempts.
async fn process<R: RecordOperator>(
    shared: Arc<Shared<R>>,
    key: OrderKey,
    message: OwnedMessage,
) -> Processed {
    let started = Instant::now();
    let (partition, offset) = (message.partition(), message.offset());
    let outcome = process_record(&shared, &message).await;
    Processed {
        key,
        partition,
        offset,
        started,
        outcome,
    }
}

async fn process_record<R: RecordOperator>(shared: &Shared<R>, message: &OwnedMessage) -> Outcome {
    let record = match shared
        .decoder
        .decode::<R::Input>(message, &shared.cancel)
        .await
    {
        Decoded::Ok(record) => record,
        Decoded::DeadLettered => return Outcome::Done(Vec::new()),
        Decoded::Interrupted => return Outcome::Interrupted,
    };
    let ctx = RecordContext::of(message);
    let mut out = Emitter::new(shared.producer.clone(), shared.codec.clone(), ctx.trace)
        .with_batched(shared.batched.clone());
    let mut attempt = 0u32;
    let failure = loop {
        let span = tracing::debug_span!(
            "record", stage = %shared.stage, trace_id = %ctx.trace.trace_id_hex(),
            partition = ctx.partition, offset = ctx.offset
        );
        let result = shared
            .operator
            .process(record.clone(), &ctx, &mut out)
            .instrument(span)
            .await;
        match result {
            Ok(()) => break out.take_rejected().pop().map(|r| r.reason),
            Err(ProcessError::Poison(reason)) => break Some(reason),
            Err(ProcessError::Retriable(reason)) => {
                attempt += 1;
                if attempt >= shared.max_attempts {
                    break Some(format!("gave up after {attempt} attempts: {reason}"));
                }
                shared.retries.inc();
                tracing::warn!(
                    stage = %shared.stage, reason, attempt, trace_id = %ctx.trace.trace_id_hex(),
                    "processing failed; retrying"
                );
                tokio::select! {
                    _ = shared.cancel.cancelled() => return Outcome::Interrupted,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        }
    };
    // Outputs queued before a failure still leave; downstream dedups them when the record
    // comes again.
    let deliveries = out.take_pending();
    if let Some(reason) = failure {
        if !shared
            .decoder
            .dead_letters()
            .send(message, &reason, &shared.cancel)
            .await
        {
            return Outcome::Interrupted;
        }
    }
    Outcome::Done(deliveries)
}

async fn acknowledge<R: RecordOperator>(
    shared: Arc<Shared<R>>,
    partition: i32,
    offset: i64,
    started: Instant,
    deliveries: Vec<(String, DeliveryFuture)>,
) -> Acknowledged {
    let delivered = if deliveries.is_empty() {
        Some(Vec::new())
    } else {
        await_deliveries(&shared.producer, &shared.stage, &shared.cancel, deliveries).await
    };
    Acknowledged {
        partition,
        offset,
        started,
        delivered,
    }
}

/// The loop's state: records by key, what is running, what awaits acknowledgement.
struct Keyed<R: RecordOperator> {
    shared: Arc<Shared<R>>,
    spec: StageSpec,
    /// Keys with a record running, each with the records queued behind it.
    busy: HashMap<OrderKey, VecDeque<OwnedMessage>>,
    processing: FuturesUnordered<BoxFuture<'static, Processed>>,
    acknowledging: FuturesUnordered<BoxFuture<'static, Acknowledged>>,
    /// Records taken from the consumer and not yet done.
    in_flight: usize,
    tracker: OffsetTracker,
    /// Commit positions to store once nothing else is ready.
    to_store: HashMap<i32, i64>,
    meters: Meters,
}

struct Meters {
    records_in: prometheus::IntCounter,
    in_flight: prometheus::IntGauge,
    full_waits: prometheus::IntCounter,
    process_seconds: prometheus::Histogram,
    metrics: Arc<Metrics>,
    records_out: HashMap<String, prometheus::IntCounter>,
}

enum Event {
    Processed(Processed),
    Acknowledged(Acknowledged),
}

/// Runs `operator` as a keyed stage until `cancel` fires, then finishes the records already
/// running, stores the final offsets and commits them.
pub async fn run_keyed<R: RecordOperator>(
    operator: Arc<R>,
    spec: StageSpec,
    deps: StageDeps,
    cancel: CancellationToken,
) -> Result<()> {
    let source = StageSource::open(&spec.wiring, SourceTuning::for_operator(&spec), &deps)?;
    let stage = spec.wiring.name.clone();
    let metrics = &deps.metrics;
    let shared = Arc::new(Shared {
        operator,
        producer: source.producer.clone(),
        batched: source.batched.clone(),
        decoder: source.decoder.clone(),
        codec: deps.codec.clone(),
        stage: stage.clone(),
        max_attempts: spec.max_attempts,
        retries: metrics.retries.with_label_values(&[&stage]),
        cancel: cancel.clone(),
    });
    let meters = Meters {
        records_in: metrics.records_in.with_label_values(&[&stage]),
        in_flight: metrics.in_flight.with_label_values(&[&stage]),
        full_waits: metrics.lane_full_waits.with_label_values(&[&stage]),
        process_seconds: metrics.process_seconds.with_label_values(&[&stage]),
        metrics: metrics.clone(),
        records_out: HashMap::new(),
    };
    let mut state = Keyed {
        shared,
        spec: spec.clone(),
        busy: HashMap::new(),
        processing: FuturesUnordered::new(),
        acknowledging: FuturesUnordered::new(),
        in_flight: 0,
        tracker: OffsetTracker::default(),
        to_store: HashMap::new(),
        meters,
    };
    let mut hold_back = kafka::HoldBack::new(metrics, &stage);
    source.set_ready(true);
    tracing::info!(
        stage, topic = %spec.wiring.input_topic, group = %spec.wiring.group,
        max_in_flight = spec.max_in_flight, "stage started"
    );
    loop {
        if !state.has_room() {
            // Full: wait for room, pausing the partitions if that takes long.
            state.meters.full_waits.inc();
            let room = hold_back.hold(&source.consumer, state.until_room());
            tokio::select! {
                _ = cancel.cancelled() => break,
                () = room => {}
            }
            state.store(&source);
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(event) = state.next_event() => state.handle(event),
            received = hold_back.recv(&source.consumer) => match received {
                Ok(message) => state.take(message),
                Err(e) => {
                    tracing::warn!(stage, error = %e, "consume failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            },
        }
        state.drain_ready();
        state.store(&source);
    }
    source.set_ready(false);
    // Records queued behind a busy key are left for redelivery; those running finish.
    state.busy.values_mut().for_each(VecDeque::clear);
    while let Some(event) = state.next_event().await {
        state.handle(event);
    }
    state.store(&source);
    source.close().await;
    tracing::info!(stage, "stage stopped");
    Ok(())
}

impl<R: RecordOperator> Keyed<R> {
    fn has_room(&self) -> bool {
        self.in_flight < self.spec.max_in_flight.max(1)
    }

    /// The next record processed or acknowledged; `None` once nothing is running.
    async fn next_event(&mut self) -> Option<Event> {
        if self.processing.is_empty() && self.acknowledging.is_empty() {
            return None;
        }
        tokio::select! {
            Some(done) = self.processing.next() => Some(Event::Processed(done)),
            Some(acked) = self.acknowledging.next() => Some(Event::Acknowledged(acked)),
        }
    }

    /// Handles events until there is room for another record.
    async fn until_room(&mut self) {
        while !self.has_room() {
            match self.next_event().await {
                Some(event) => self.handle(event),
                None => return,
            }
        }
    }

    /// Handles what has already finished, without waiting.
    fn drain_ready(&mut self) {
        use futures::FutureExt;
        while let Some(Some(event)) = self.next_event().now_or_never() {
            self.handle(event);
        }
    }
    /// A record from the consumer: started at once if its key is free, else queued behind it.
    fn take(&mut self, message: OwnedMessage) {
        self.meters.records_in.inc();
        self.meters.in_flight.inc();
        self.in_flight += 1;
        self.tracker.begin(message.partition(), message.offset());
        let key = OrderKey::of(&message);
        match self.busy.get_mut(&key) {
            Some(queue) => queue.push_back(message),
            None => {
                self.busy.insert(key.clone(), VecDeque::new());
                self.start(key, message);
            }
        }
    }

    fn start(&mut self, key: OrderKey, message: OwnedMessage) {
        self.processing
            .push(Box::pin(process(self.shared.clone(), key, message)));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Processed(done) => {
                // The key's next record may start: this one's outputs are queued ahead of it.
                match self.busy.get_mut(&done.key).map(VecDeque::pop_front) {
                    Some(Some(next)) => self.start(done.key, next),
                    Some(None) => {
                        self.busy.remove(&done.key);
                    }
                    None => {}
                }
                match done.outcome {
                    Outcome::Done(deliveries) => {
                        self.acknowledging.push(Box::pin(acknowledge(
                            self.shared.clone(),
                            done.partition,
                            done.offset,
                            done.started,
                            deliveries,
                        )));
                    }
                    Outcome::Interrupted => self.leave(),
                }
            }
            Event::Acknowledged(acked) => {
                self.leave();
                self.meters
                    .process_seconds
                    .observe(acked.started.elapsed().as_secs_f64());
                // Outputs not all acknowledged: the record stays pending, so the commit
                // position never passes it and it is read again after a restart.
                let Some(topics) = acked.delivered else {
                    return;
                };
                for topic in topics {
                    let stage = &self.shared.stage;
                    let metrics = &self.meters.metrics;
                    self.meters
                        .records_out
                        .entry(topic)
                        .or_insert_with_key(|topic| {
                            metrics.records_out.with_label_values(&[stage, topic])
                        })
                        .inc();
                }
                for (partition, position) in
                    self.tracker
                        .finish(0, &[(acked.partition, acked.offset)], None)
                {
                    self.to_store.insert(partition, position);
                }
            }
        }
    }

    /// A record is no longer in flight.
    fn leave(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.meters.in_flight.dec();
    }

    /// Stores the commit positions that moved.
    fn store(&mut self, source: &StageSource) {
        for (partition, position) in self.to_store.drain() {
            store_position(
                &source.consumer,
                &self.spec.wiring.input_topic,
                partition,
                position,
            );
        }
    }
}
