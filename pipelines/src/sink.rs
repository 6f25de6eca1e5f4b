//! The sink loop: consume records into batches (by count and linger time), write each batch
//! into the sink's open write (which may span batches), and store the offsets only after the
//! write they joined has ended.
//!
//! Sinks make their writes idempotent (keyed by event id or source coordinates), so the
//! redelivery that follows a crash between the write and the offset commit changes nothing.
//! A store outage is retried with backoff for as long as it lasts (never dropped): a batch in
//! hand from memory, the batches of a write that spanned them by reading them again from the
//! topic. A batch the store refuses as invalid is sent record by record to the DLQ.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rdkafka::{
    consumer::Consumer,
    message::{Message, OwnedMessage},
    Offset, TopicPartitionList,
};
use sluice_schemas::Record;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Wiring,
    kafka::{self, ProducerProfile},
    runtime::{backoff, DeadLetters, Guarantee, StageDeps},
    source::{Decoded, SourceTuning, StageSource},
    ProcessError, Result,
};

/// A look at the store that writing a batch needs first: for instance, which of its records
/// are already stored. The sink loop runs it on the next batch while the batch before is still
/// being written, so it may not see that write's effects: [`BatchSink::write`] accounts for
/// them (it knows what its open write holds, and what the write that ended last held).
#[async_trait]
pub trait BatchCheck<T>: Send + Sync + 'static {
    /// What the look found.
    type Checked: Send + 'static;

    /// Looks at the store for `batch`. Reads only: it may run beside a write.
    async fn check(&self, batch: &[T]) -> Result<Self::Checked, ProcessError>;
}

/// For sinks whose writes need no look at the store first.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCheck;

#[async_trait]
impl<T: Sync> BatchCheck<T> for NoCheck {
    type Checked = ();

    async fn check(&self, _batch: &[T]) -> Result<(), ProcessError> {
        Ok(())
    }
}

/// What `S`'s check found about a batch.
pub type Checked<S> = <<S as BatchSink>::Check as BatchCheck<<S as BatchSink>::Input>>::Checked;

/// A store that accepts batches of records.
#[async_trait]
pub trait BatchSink: Send + 'static {
    /// The record type the sink stores.
    type Input: Record;

    /// What a write guarantees when a batch is delivered again after a crash:
    /// [`EffectivelyOnce`](crate::runtime::EffectivelyOnce) for writes keyed by event id or
    /// source coordinates, [`AtLeastOnce`](crate::runtime::AtLeastOnce) otherwise.
    type Delivery: Guarantee;

    /// The look at the store a write needs first ([`NoCheck`] for none).
    type Check: BatchCheck<Self::Input>;

    /// The sink's check, to run on a batch before it is written.
    fn check(&self) -> Self::Check;

    /// Writes `batch` (which may contain records already written before a crash: the write
    /// must be idempotent) into the sink's open write, opening one if none is, given what the
    /// check found about it while the write before this one may still have been under way
    /// (`None`: the write looks itself, as on a retry). What it wrote is stored once
    /// [`BatchSink::end`] returns (a sink whose writes are stored at once keeps the default
    /// `end`). Returns the number of records that were new.
    ///
    /// A [`ProcessError::Retriable`] gives up the whole open write, earlier batches included
    /// (the sink loop reads them again); a [`ProcessError::Poison`] refuses this batch alone
    /// and leaves the open write as it was.
    async fn write(
        &mut self,
        batch: &[Self::Input],
        checked: Option<Checked<Self>>,
    ) -> Result<usize, ProcessError>;

    /// Ends the open write: once this returns, every batch written since the last end is
    /// stored. An error gives the open write up (none of it need be stored): the sink loop
    /// writes those batches again.
    async fn end(&mut self) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Gives up the open write, storing none of it: the sink loop reads its batches again. The
    /// loop calls it after a failed write or end, and instead of `end` when a rebalance came
    /// while the write was open (even a write of one batch: its partitions may have moved).
    fn abandon(&mut self) {}

    /// Looks after the store between batches, every [`SinkSpec::upkeep_every`] while the stage
    /// runs in its consumer group (never in a replay): for instance compacting what no longer
    /// changes. It runs between writes, so long work belongs on a task of its own.
    async fn upkeep(&mut self) {}
}

/// How a sink runs.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// Its name, group, input and DLQ.
    pub wiring: Wiring,
    /// Largest batch written at once, in records.
    pub max_batch: usize,
    /// Largest batch written at once, in bytes of the records as they came (keys and
    /// payloads): with the prefetch, this bounds the sink's memory whatever the records' size.
    pub max_batch_bytes: usize,
    /// Longest a record waits for its batch to fill.
    pub linger: Duration,
    /// Most the consumer fetches ahead of the sink (KiB), so a stalled store bounds memory.
    pub max_prefetch_kib: u32,
    /// How often [`BatchSink::upkeep`] runs, the first time one period after the stage starts
    /// (`None`: never).
    pub upkeep_every: Option<Duration>,
    /// Most records one write spans: batches join the sink's open write until this many
    /// records have joined it (0: each batch is a write of its own; a write may pass it by
    /// less than a batch). A write also ends with the first batch that joins it once it is
    /// `max_write_age` old, when no record is ready after a write, at shutdown, and, after a
    /// write was lost, with the first batch written again. Only ids and
    /// offsets of a write's batches are kept until it ends, not their records: if it fails,
    /// they are read again from the topic.
    pub max_write_records: usize,
    /// Longest a write stays open (and its batches' records wait to be stored).
    pub max_write_age: Duration,
}

impl SinkSpec {
    /// A spec with the defaults: batches of up to 1000 records, 2 MiB or 200 ms, each written
    /// on its own.
    pub fn new(wiring: Wiring) -> Self {
        Self {
            wiring,
            max_batch: 1000,
            max_batch_bytes: 2 << 20,
            linger: Duration::from_millis(200),
            max_prefetch_kib: kafka::PREFETCH_KIB,
            upkeep_every: None,
            max_write_records: 0,
            max_write_age: Duration::from_secs(1),
        }
    }
}

/// Runs `sink` until `cancel` fires; the batch in hand is written before returning. (Billing
/// sinks are run through [`Runnable::effectively_once_sink`](crate::Runnable), which refuses a
/// sink whose writes are not idempotent.)
///
/// While one batch is being written, the next is consumed and decoded: writes stay one at a
/// time and in order, and a batch's offsets are stored only after the write it joined ended
/// (and every write before it). At most two batches are in hand; once the next is full and the
/// write still runs, the partitions pause as in [`kafka::HoldBack::hold`]. A write that spans
/// batches ([`SinkSpec::max_write_records`]) and fails is not retried from memory: its
/// partitions are rewound to its first record and read again.
pub async fn run_sink<S: BatchSink>(
    sink: S,
    spec: SinkSpec,
    deps: StageDeps,
    cancel: CancellationToken,
) -> Result<()> {
    let tuning = SourceTuning {
        fetch: kafka::Fetch::BULK,
        max_prefetch_kib: spec.max_prefetch_kib,
        producer: ProducerProfile::Throughput,
    };
    let source = StageSource::open(&spec.wiring, tuning, &deps)?;
    // Until shutdown the DLQ and store retries wait on `cancel`; the final flush must finish,
    // so it waits on a token that never fires.
    let never = CancellationToken::new();
    source.set_ready(true);
    tracing::info!(
        sink = %spec.wiring.name, topic = %spec.wiring.input_topic, group = %spec.wiring.group,
        delivery = S::Delivery::NAME, "sink started"
    );

    let mut hold_back = kafka::HoldBack::new(&deps.metrics, &spec.wiring.name);
    // The first upkeep comes one period after start, not at it: a restart (or many replicas
    // starting at once) adds no work to start-up.
    let mut upkeep = spec.upkeep_every.map(|every| {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    let checker = Arc::new(sink.check());
    let mut writer = Writer::new(sink, &spec, &deps, &source);
    let consumer = &source.consumer;
    let mut upkeep_due = false;
    let mut stopping = false;
    'batches: while !stopping {
        let mut messages: Vec<OwnedMessage> = Vec::with_capacity(spec.max_batch.min(4096));
        let mut bytes = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        while messages.len() < spec.max_batch && bytes < spec.max_batch_bytes {
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let stalls_at = writer.stalls_at();
            let stalled = async {
                match stalls_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let upkeep_tick = async {
                match upkeep.as_mut() {
                    Some(ticks) => ticks.tick().await,
                    None => std::future::pending().await,
                }
            };
            // In this order when several are ready: shutdown, a finished write (so a write
            // that ends as it stalls never pauses anything), the batch's time, a stall.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => { stopping = true; break; }
                done = writer.finished() => match writer.settle(done, consumer)? {
                    Settled::Done => {
                        // Nothing came while the write ran and nothing is ready: the records
                        // stopped, so the open write ends rather than waiting for more.
                        if messages.is_empty() {
                            hold_back.take_ready(consumer, spec.max_batch.min(READY_AT_ONCE), &mut messages);
                            if messages.is_empty() {
                                writer.end_open(consumer, &cancel)?;
                            } else {
                                bytes += messages.iter().map(message_bytes).sum::<usize>();
                                deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.linger);
                            }
                        }
                    }
                    Settled::Interrupted => break 'batches,
                    Settled::Lost(mut unstored) => {
                        unstored.add(&messages);
                        read_again(unstored, &mut hold_back, consumer)?;
                        messages.clear();
                        bytes = 0;
                        deadline = None;
                    }
                },
                _ = wait => break,
                // The store is slow: stop fetching ahead (below) whatever is in hand.
                _ = stalled => break,
                _ = upkeep_tick => upkeep_due = true,
                received = hold_back.recv(consumer) => match received {
                    Ok(m) => {
                        bytes += message_bytes(&m);
                        messages.push(m);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.linger);
                        // Whatever else is ready joins without a round of the select each.
                        while messages.len() < spec.max_batch && bytes < spec.max_batch_bytes {
                            let before = messages.len();
                            let max = spec.max_batch.min(before + READY_AT_ONCE);
                            hold_back.take_ready(consumer, max, &mut messages);
                            if messages.len() == before {
                                break;
                            }
                            bytes += messages[before..].iter().map(message_bytes).sum::<usize>();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(sink = %spec.wiring.name, error = %e, "consume failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
            writer.upkeep_if_idle(&mut upkeep_due).await;
        }
        if messages.is_empty() {
            if !stopping {
                match writer.wait(&mut hold_back, consumer).await? {
                    Settled::Done => writer.end_open(consumer, &cancel)?,
                    Settled::Interrupted => break,
                    Settled::Lost(unstored) => read_again(unstored, &mut hold_back, consumer)?,
                }
            }
            continue;
        }
        deps.metrics
            .records_in
            .with_label_values(&[&spec.wiring.name])
            .inc_by(messages.len() as u64);
        stopping |= cancel.is_cancelled();
        let wait_token = if stopping { &never } else { &cancel };
        // A registry or DLQ that keeps the decoding waiting pauses the partitions too, and the
        // consumer is polled meanwhile, so the stage stays in its group.
        let decoding = decode_batch::<S::Input>(&source, messages, wait_token);
        let Some(batch) = hold_back.hold(consumer, decoding).await else {
            // Shutdown interrupted a wait: nothing of this batch is stored; it is redelivered.
            break;
        };
        // The batch's look at the store runs while the write before it finishes.
        let checked_from = (
            tokio::time::Instant::now(),
            consumer.context().rebalances_seen(),
        );
        let check_cancel = wait_token.child_token();
        let checking = tokio::spawn(check_batch(checker.clone(), batch, check_cancel.clone()));
        // The write before must be done (and its offsets stored) before this one starts. A
        // store that stays down holds it in retries: the partitions pause meanwhile.
        match writer.wait(&mut hold_back, consumer).await? {
            Settled::Done => {}
            Settled::Interrupted => {
                checking.abort();
                break;
            }
            Settled::Lost(mut unstored) => {
                // The batch in hand comes after the lost write: it is read again too (its
                // check, interrupted, hands it back at once).
                check_cancel.cancel();
                match hold_back.hold(consumer, checking).await {
                    Ok((batch, _)) => unstored.add(&batch.messages),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => {
                        return Err(crate::Error::Stalled(format!("a batch's check ended: {e}")))
                    }
                }
                read_again(unstored, &mut hold_back, consumer)?;
                continue;
            }
        }
        writer.upkeep_if_idle(&mut upkeep_due).await;
        let (batch, mut checked) = match hold_back.hold(consumer, checking).await {
            Ok(checked) => checked,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(crate::Error::Stalled(format!("a batch's check ended: {e}"))),
        };
        // The check could miss only the writes beside it, which the sink accounts for; not
        // what another owner wrote if a rebalance moved partitions meanwhile (and gave them
        // back), nor much else if the write took long: then the write looks again itself.
        if consumer.context().rebalances_seen() != checked_from.1
            || checked_from.0.elapsed() > kafka::PAUSE_AFTER
        {
            checked = None;
        }
        // Records of partitions a rebalance took away while they waited are the new owner's
        // to write: writing them too would race its stored-id check.
        let batch = batch.of_assigned(consumer);
        let end = writer.ends_with(batch.records.len(), &spec) || stopping;
        writer.start(Some(batch), checked, end, consumer, wait_token.clone())?;
        // A task spawned from a worker waits in that worker's next-task slot, which no other
        // worker takes from, until the spawning task yields; consuming and decoding the next
        // batch yields to nothing while records are ready, so without this the write would
        // wait for them (a third of each batch's time).
        tokio::task::yield_now().await;
    }
    // The write under way finishes (or shutdown interrupts its retries) and the open write
    // ends before the offsets are committed.
    if let Settled::Done = writer.wait(&mut hold_back, consumer).await? {
        writer.end_open(consumer, &never)?;
        writer.wait(&mut hold_back, consumer).await?;
    }
    source.close().await;
    tracing::info!(sink = %spec.wiring.name, "sink stopped");
    Ok(())
}

/// How many ready records are taken at a time between checks of the batch's byte bound.
const READY_AT_ONCE: usize = 64;

/// A record's size as the batch bound counts it: its key and payload.
fn message_bytes(m: &OwnedMessage) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len)
}

/// Rewinds the partitions of `unstored` (records taken from the consumer and not stored:
/// a lost write's batches, and those in hand after them) to their first record, so they are
/// consumed again; what waited in `hold_back` is dropped with them (it comes again too).
fn read_again(
    mut unstored: Span,
    hold_back: &mut kafka::HoldBack,
    consumer: &kafka::KafkaConsumer,
) -> Result<()> {
    unstored.add(&hold_back.take_arrived());
    let rewound = unstored.rewind(consumer)?;
    tracing::info!(partitions = rewound, "records of a lost write read again");
    Ok(())
}

/// A batch decoded: the records to write, where each came from, and every message of the
/// batch (whose offsets are stored once it is written).
struct DecodedBatch<T> {
    records: Vec<T>,
    /// Per record, its message's index in `messages`.
    sources: Vec<usize>,
    messages: Vec<OwnedMessage>,
}

impl<T> DecodedBatch<T> {
    /// The batch without the records of partitions `consumer` no longer holds. (If the
    /// assignment cannot be read, the batch as it is: the stored-id check still guards it.)
    fn of_assigned(self, consumer: &kafka::KafkaConsumer) -> Self {
        let Ok(assignment) = consumer.assignment() else {
            return self;
        };
        let held = |m: &OwnedMessage| {
            assignment
                .find_partition(m.topic(), m.partition())
                .is_some()
        };
        let dropped = self.messages.iter().filter(|m| !held(m)).count();
        if dropped > 0 {
            tracing::info!(
                records = dropped,
                "records of partitions revoked meanwhile left to their new owner"
            );
        }
        self.retain(held)
    }

    /// The batch with only the messages `keep` says yes to, and their records.
    fn retain(self, keep: impl Fn(&OwnedMessage) -> bool) -> Self {
        if self.messages.iter().all(&keep) {
            return self;
        }
        let mut kept = Self {
            records: Vec::with_capacity(self.records.len()),
            sources: Vec::with_capacity(self.sources.len()),
            messages: Vec::with_capacity(self.messages.len()),
        };
        let mut records = self.records.into_iter().zip(self.sources).peekable();
        for (i, message) in self.messages.into_iter().enumerate() {
            let record = records.next_if(|(_, source)| *source == i).map(|(r, _)| r);
            if !keep(&message) {
                continue;
            }
            if let Some(record) = record {
                kept.records.push(record);
                kept.sources.push(kept.messages.len());
            }
            kept.messages.push(message);
        }
        kept
    }
}

/// Runs `checker` on `batch`'s records and hands both back; `None` if it failed (the write then
/// looks itself, retrying as writes do) or `cancel` interrupted it.
async fn check_batch<T, C: BatchCheck<T>>(
    checker: Arc<C>,
    batch: DecodedBatch<T>,
    cancel: CancellationToken,
) -> (DecodedBatch<T>, Option<C::Checked>) {
    if batch.records.is_empty() {
        return (batch, None);
    }
    let checked = tokio::select! {
        _ = cancel.cancelled() => None,
        checked = checker.check(&batch.records) => match checked {
            Ok(checked) => Some(checked),
            Err(e) => {
                tracing::debug!(error = %e, "a batch's check failed; its write looks again");
                None
            }
        },
    };
    (batch, checked)
}

/// Decodes `messages` (undecodable ones go to the DLQ); `None` if `cancel` interrupted it.
async fn decode_batch<T: Record>(
    source: &StageSource,
    messages: Vec<OwnedMessage>,
    cancel: &CancellationToken,
) -> Option<DecodedBatch<T>> {
    let mut records = Vec::with_capacity(messages.len());
    let mut sources = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        match source.decoder.decode::<T>(message, cancel).await {
            Decoded::Ok(record) => {
                records.push(record);
                sources.push(i);
            }
            Decoded::DeadLettered => {}
            Decoded::Interrupted => return None,
        }
    }
    Some(DecodedBatch {
        records,
        sources,
        messages,
    })
}

/// How a write job ended, with the sink back and where its batch (if it had one) lay in its
/// partitions.
struct JobDone<S> {
    sink: S,
    outcome: Outcome,
    span: Span,
}

/// What a write job did.
enum Outcome {
    /// Its batch joined the open write, not stored yet.
    Written(Counts),
    /// The open write ended (with its batch, if it had one): all of it is stored.
    Ended(Counts),
    /// The open write failed, with batches the loop no longer holds: none of it is stored.
    Lost,
    /// Shutdown interrupted it: nothing of its batch is stored.
    Interrupted,
}

/// Records of a job's batch, and how many of them were new.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    records: usize,
    new: usize,
}

/// What the loop learns when a job is settled.
enum Settled {
    /// Nothing went wrong (the batch joined the open write, or the write ended and its offsets
    /// are stored).
    Done,
    /// Shutdown interrupted the job.
    Interrupted,
    /// The open write was lost: its records are to be read again.
    Lost(Span),
}

/// A finished write task.
type Finished<S> = std::result::Result<JobDone<S>, tokio::task::JoinError>;

/// Batches written into the sink's open write, whose offsets are stored once it ends.
struct OpenWrite {
    span: Span,
    counts: Counts,
    opened: tokio::time::Instant,
    /// The consumer's rebalance count when its first batch was handed over.
    rebalances: u64,
}

/// The sink, either at hand or on a task of its own running a write job, and the write it has
/// open.
struct Writer<S: BatchSink> {
    state: WriterState<S>,
    open: Option<OpenWrite>,
    /// The last write was lost: the next batch is written on its own (and retried from
    /// memory if that fails too), so a store that refuses large writes still gets data.
    lost: bool,
    name: String,
    metrics: Arc<crate::metrics::Metrics>,
    dead_letters: DeadLetters,
}

enum WriterState<S> {
    Idle(S),
    Busy {
        task: tokio::task::JoinHandle<JobDone<S>>,
        started: tokio::time::Instant,
        rebalances: u64,
    },
    /// Only while changing from one to the other.
    Moving,
}

impl<S: BatchSink> Writer<S> {
    fn new(sink: S, spec: &SinkSpec, deps: &StageDeps, source: &StageSource) -> Self {
        Self {
            state: WriterState::Idle(sink),
            open: None,
            lost: false,
            name: spec.wiring.name.clone(),
            metrics: deps.metrics.clone(),
            dead_letters: source.dead_letters().clone(),
        }
    }

    /// When the job under way will have taken [`kafka::PAUSE_AFTER`] (`None`: there is
    /// none): from then the store is slow, and the partitions should pause rather than fetch
    /// ahead.
    fn stalls_at(&self) -> Option<tokio::time::Instant> {
        match &self.state {
            WriterState::Busy { started, .. } => Some(*started + kafka::PAUSE_AFTER),
            WriterState::Idle(_) | WriterState::Moving => None,
        }
    }

    /// Whether a batch of `records` should end the open write it joins.
    fn ends_with(&self, records: usize, spec: &SinkSpec) -> bool {
        if self.lost {
            return true;
        }
        match &self.open {
            None => records >= spec.max_write_records,
            Some(open) => {
                open.counts.records + records >= spec.max_write_records
                    || open.opened.elapsed() >= spec.max_write_age
            }
        }
    }

    /// Waits for the job under way, if any, and settles it (see [`Writer::settle`]); the
    /// partitions pause once the job has taken [`kafka::PAUSE_AFTER`].
    async fn wait(
        &mut self,
        hold_back: &mut kafka::HoldBack,
        consumer: &kafka::KafkaConsumer,
    ) -> Result<Settled> {
        let Some(stalls_at) = self.stalls_at() else {
            return Ok(Settled::Done);
        };
        let pause_in = stalls_at.saturating_duration_since(tokio::time::Instant::now());
        let done = hold_back
            .hold_after(consumer, self.finished(), pause_in)
            .await;
        self.settle(done, consumer)
    }

    /// Runs the sink's upkeep if it is due and the sink is at hand.
    async fn upkeep_if_idle(&mut self, due: &mut bool) {
        if let (true, WriterState::Idle(sink)) = (*due, &mut self.state) {
            sink.upkeep().await;
            *due = false;
        }
    }

    /// Starts a job: writing `batch` into the open write (if there is a batch), then ending
    /// the open write if `end`. The sink must be at hand (a job under way is waited for
    /// first): otherwise nothing starts and the stage stops with an error.
    fn start(
        &mut self,
        batch: Option<DecodedBatch<S::Input>>,
        checked: Option<Checked<S>>,
        end: bool,
        consumer: &kafka::KafkaConsumer,
        cancel: CancellationToken,
    ) -> Result<()> {
        let WriterState::Idle(mut sink) = std::mem::replace(&mut self.state, WriterState::Moving)
        else {
            return Err(crate::Error::Stalled(
                "a batch was handed to a sink still writing the one before".into(),
            ));
        };
        let rebalances = self.open.as_ref().map_or_else(
            || consumer.context().rebalances_seen(),
            |open| open.rebalances,
        );
        let job = Job {
            name: self.name.clone(),
            metrics: self.metrics.clone(),
            dead_letters: self.dead_letters.clone(),
            // Earlier batches the loop no longer holds ride on the open write.
            joins_open: self.open.is_some(),
            end,
            rebalances_seen: consumer.context().rebalance_counter(),
            rebalances,
            cancel,
        };
        let task = tokio::spawn(async move {
            // The batch's span is worked out here, off the loop that consumes the next.
            let (outcome, span) = match batch {
                Some(batch) => (
                    job.run(&mut sink, &batch, checked).await,
                    Span::of(&batch.messages),
                ),
                None => (job.end_only(&mut sink).await, Span::default()),
            };
            JobDone {
                sink,
                outcome,
                span,
            }
        });
        self.state = WriterState::Busy {
            task,
            started: tokio::time::Instant::now(),
            rebalances,
        };
        Ok(())
    }

    /// Ends the open write, if there is one and the sink is at hand (else nothing): a job
    /// without a batch.
    fn end_open(
        &mut self,
        consumer: &kafka::KafkaConsumer,
        cancel: &CancellationToken,
    ) -> Result<()> {
        if self.open.is_none() || !matches!(self.state, WriterState::Idle(_)) {
            return Ok(());
        }
        self.start(None, None, true, consumer, cancel.clone())
    }

    /// The job under way, once it ends (never, when there is none). Cancel-safe.
    async fn finished(&mut self) -> Finished<S> {
        match &mut self.state {
            WriterState::Busy { task, .. } => task.await,
            WriterState::Idle(_) | WriterState::Moving => std::future::pending().await,
        }
    }

    /// Takes the sink back from a finished job: its batch joins the open write, or the open
    /// write's offsets are stored now that it ended.
    fn settle(&mut self, done: Finished<S>, consumer: &kafka::KafkaConsumer) -> Result<Settled> {
        let rebalances = match &self.state {
            WriterState::Busy { rebalances, .. } => *rebalances,
            WriterState::Idle(_) | WriterState::Moving => 0,
        };
        let JobDone {
            sink,
            outcome,
            span,
        } = match done {
            Ok(done) => done,
            // As if the write had run here.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(crate::Error::Stalled(format!("a sink write ended: {e}"))),
        };
        self.state = WriterState::Idle(sink);
        let joined = |open: &mut Option<OpenWrite>, counts: Counts, span: Span| {
            let open = open.get_or_insert_with(|| OpenWrite {
                span: Span::default(),
                counts: Counts::default(),
                opened: tokio::time::Instant::now(),
                rebalances,
            });
            open.span.join(span);
            open.counts.records += counts.records;
            open.counts.new += counts.new;
        };
        Ok(match outcome {
            Outcome::Written(counts) => {
                joined(&mut self.open, counts, span);
                Settled::Done
            }
            Outcome::Ended(counts) => {
                self.lost = false;
                joined(&mut self.open, counts, span);
                if let Some(open) = self.open.take() {
                    open.span.store(consumer);
                    let counts = open.counts;
                    self.metrics
                        .sink_rows
                        .with_label_values(&[&self.name])
                        .inc_by(counts.new as u64);
                    self.metrics
                        .sink_duplicates
                        .with_label_values(&[&self.name])
                        .inc_by(counts.records.saturating_sub(counts.new) as u64);
                }
                Settled::Done
            }
            Outcome::Lost => {
                self.lost = true;
                let mut unstored = self.open.take().map(|open| open.span).unwrap_or_default();
                unstored.join(span);
                Settled::Lost(unstored)
            }
            Outcome::Interrupted => Settled::Interrupted,
        })
    }
}

/// One write job's settings, moved onto its task.
struct Job {
    name: String,
    metrics: Arc<crate::metrics::Metrics>,
    dead_letters: DeadLetters,
    /// The sink's open write holds batches before this one.
    joins_open: bool,
    /// End the open write after the batch.
    end: bool,
    /// The consumer's rebalance count, and what it was when the open write began.
    rebalances_seen: Arc<std::sync::atomic::AtomicU64>,
    rebalances: u64,
    cancel: CancellationToken,
}

impl Job {
    /// Writes one decoded batch into the open write, given what its check found, and ends the
    /// open write if asked. A failure is retried while the open write holds nothing else (the
    /// batch is at hand); otherwise the write is lost and its batches are read again.
    async fn run<S: BatchSink>(
        &self,
        sink: &mut S,
        batch: &DecodedBatch<S::Input>,
        mut checked: Option<Checked<S>>,
    ) -> Outcome {
        let records = &batch.records;
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            // What the check found holds for the first attempt only: a failed write may have
            // stored some of the batch.
            let written = if records.is_empty() {
                Ok(0)
            } else {
                sink.write(records, checked.take()).await
            };
            let failure = match written {
                Ok(new) => {
                    self.metrics
                        .sink_batch_seconds
                        .with_label_values(&[&self.name])
                        .observe(started.elapsed().as_secs_f64());
                    let counts = Counts {
                        records: records.len(),
                        new,
                    };
                    if !self.end {
                        return Outcome::Written(counts);
                    }
                    match self.end(sink).await {
                        Ok(()) => return Outcome::Ended(counts),
                        Err(None) => return Outcome::Lost,
                        Err(Some(e)) => e,
                    }
                }
                Err(ProcessError::Poison(reason)) => {
                    for &i in &batch.sources {
                        if !self
                            .dead_letters
                            .send(&batch.messages[i], &reason, &self.cancel)
                            .await
                        {
                            return Outcome::Interrupted;
                        }
                    }
                    if !self.end {
                        return Outcome::Written(Counts::default());
                    }
                    // What the open write held before the refused batch ends as it would alone.
                    return self.end_only(sink).await;
                }
                Err(e) => e,
            };
            // The sink gave its open write up (a failed write or end does).
            sink.abandon();
            if self.joins_open {
                self.failed(&failure, "a write was lost; its records are read again");
                return Outcome::Lost;
            }
            attempt += 1;
            self.failed(&failure, "batch write failed; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => return Outcome::Interrupted,
                _ = tokio::time::sleep(backoff(attempt)) => {}
            }
        }
    }

    /// Ends the open write, unless a rebalance came since it began: then it is given up
    /// (`Err(None)`), since partitions it holds may have moved to an owner that reads them
    /// from the committed offset, and storing them too would race its stored-id check.
    async fn end<S: BatchSink>(
        &self,
        sink: &mut S,
    ) -> std::result::Result<(), Option<ProcessError>> {
        if self
            .rebalances_seen
            .load(std::sync::atomic::Ordering::SeqCst)
            != self.rebalances
        {
            sink.abandon();
            tracing::info!(sink = %self.name, "a rebalance came while a write was open; it is given up");
            return Err(None);
        }
        sink.end().await.map_err(Some)
    }

    /// Ends the open write (a job without a batch, or after a refused one). If that fails, the
    /// write is lost.
    async fn end_only<S: BatchSink>(&self, sink: &mut S) -> Outcome {
        match self.end(sink).await {
            Ok(()) => Outcome::Ended(Counts::default()),
            Err(e) => {
                sink.abandon();
                if let Some(e) = e {
                    self.failed(&e, "a write was lost; its records are read again");
                }
                Outcome::Lost
            }
        }
    }

    fn failed(&self, error: &ProcessError, what: &str) {
        self.metrics.retries.with_label_values(&[&self.name]).inc();
        tracing::warn!(sink = %self.name, reason = %error, "{what}");
    }
}

/// Where records taken from the consumer lie in their partitions: per partition, the first
/// offset and the one after the last.
#[derive(Debug, Default)]
struct Span(HashMap<String, HashMap<i32, (i64, i64)>>);

impl Span {
    fn of(messages: &[OwnedMessage]) -> Self {
        let mut span = Self::default();
        span.add(messages);
        span
    }

    fn add(&mut self, messages: &[OwnedMessage]) {
        // Records come in runs of one partition: look its entry up once a run.
        let mut messages = messages.iter().peekable();
        while let Some(m) = messages.next() {
            let partitions = match self.0.get_mut(m.topic()) {
                Some(partitions) => partitions,
                None => self.0.entry(m.topic().to_owned()).or_default(),
            };
            let (mut first, mut next) = (m.offset(), m.offset() + 1);
            while let Some(same) =
                messages.next_if(|n| n.partition() == m.partition() && n.topic() == m.topic())
            {
                first = first.min(same.offset());
                next = next.max(same.offset() + 1);
            }
            partitions
                .entry(m.partition())
                .and_modify(|(f, n)| {
                    *f = (*f).min(first);
                    *n = (*n).max(next);
                })
                .or_insert((first, next));
        }
    }

    fn join(&mut self, other: Span) {
        for (topic, partitions) in other.0 {
            let mine = self.0.entry(topic).or_default();
            for (partition, (first, next)) in partitions {
                mine.entry(partition)
                    .and_modify(|(f, n)| {
                        *f = (*f).min(first);
                        *n = (*n).max(next);
                    })
                    .or_insert((first, next));
            }
        }
    }

    /// The partitions, each with one of its offsets.
    fn offsets(&self, pick: impl Fn((i64, i64)) -> i64) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (topic, partitions) in &self.0 {
            for (&partition, &range) in partitions {
                if list
                    .add_partition_offset(topic, partition, Offset::Offset(pick(range)))
                    .is_err()
                {
                    continue;
                }
            }
        }
        list
    }

    /// Stores, per partition, the offset after the last record.
    fn store(&self, consumer: &kafka::KafkaConsumer) {
        if let Err(e) = consumer.store_offsets(&self.offsets(|(_, next)| next)) {
            tracing::debug!(error = %e, "offsets not stored (partition moved in a rebalance)");
        }
    }

    /// Moves each partition's fetch position back to its first record; returns how many
    /// partitions were rewound. A partition a rebalance took away is not (its new owner reads
    /// it from the committed offset), nor one just assigned and not fetching yet (it starts from
    /// the committed offset, which is at or before its first record here: offsets are stored
    /// only for what was written). A partition held and fetching that cannot be rewound stops
    /// the stage rather than skip its records: it restarts from the committed offsets.
    fn rewind(&self, consumer: &kafka::KafkaConsumer) -> Result<usize> {
        use rdkafka::types::RDKafkaErrorCode;
        let list = self.offsets(|(first, _)| first);
        if list.count() == 0 {
            return Ok(0);
        }
        let sought = consumer
            .seek_partitions(list, Duration::from_secs(5))
            .map_err(|e| crate::Error::Stalled(format!("records could not be read again: {e}")))?;
        let assignment = consumer.assignment()?;
        let mut rewound = 0;
        for element in sought.elements() {
            let Err(e) = element.error() else {
                rewound += 1;
                continue;
            };
            let starting = matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::State | RDKafkaErrorCode::PreviousInProgress)
            );
            let held = assignment
                .find_partition(element.topic(), element.partition())
                .is_some();
            if held && !starting {
                return Err(crate::Error::Stalled(format!(
                    "{}/{} could not be read again: {e}",
                    element.topic(),
                    element.partition()
                )));
            }
        }
        Ok(rewound)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;

    fn message(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(vec![1]),
            None,
            "usage".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn a_span_holds_each_partitions_first_offset_and_the_one_after_its_last() {
        let mut span = Span::of(&[message(0, 7), message(1, 3), message(0, 5)]);
        span.join(Span::of(&[message(1, 9), message(2, 4)]));
        span.add(&[message(0, 8)]);
        let offsets = |pick: fn((i64, i64)) -> i64| {
            let mut found: Vec<(i32, i64)> = span
                .offsets(pick)
                .elements()
                .iter()
                .filter_map(|e| e.offset().to_raw().map(|o| (e.partition(), o)))
                .collect();
            found.sort_unstable();
            found
        };
        // Read again from the first; stored as the one after the last.
        assert_eq!(offsets(|(first, _)| first), [(0, 5), (1, 3), (2, 4)]);
        assert_eq!(offsets(|(_, next)| next), [(0, 9), (1, 10), (2, 5)]);
        assert_eq!(Span::default().offsets(|(first, _)| first).count(), 0);
    }

    #[test]
    fn a_batch_keeps_only_the_messages_asked_for_with_their_records() {
        // Five messages; the one at index 2 did not decode (it went to the DLQ).
        let batch = DecodedBatch {
            records: vec!["a", "b", "d", "e"],
            sources: vec![0, 1, 3, 4],
            messages: (0..5).map(|i| message(i % 2, i64::from(i))).collect(),
        };
        // Partition 1 (messages 1 and 3) was revoked.
        let kept = batch.retain(|m| m.partition() == 0);
        assert_eq!(kept.records, ["a", "e"]);
        let offsets: Vec<i64> = kept.messages.iter().map(Message::offset).collect();
        assert_eq!(offsets, [0, 2, 4]);
        // Each record still points at its own message.
        assert_eq!(kept.sources, [0, 2]);
        let all = DecodedBatch {
            records: vec!["x"],
            sources: vec![0],
            messages: vec![message(0, 7)],
        }
        .retain(|_| true);
        assert_eq!((all.records, all.sources), (vec!["x"], vec![0]));
    }
}
