//! The sink loop: consume records into batches (by count and linger time), write each batch to
//! a store, and store the offsets only after the store accepted the batch.
//!
//! Sinks make their writes idempotent (keyed by event id or source coordinates), so the
//! redelivery that follows a crash between the write and the offset commit changes nothing.
//! A store outage is retried with backoff for as long as it lasts (never dropped); a batch the
//! store refuses as invalid is sent record by record to the DLQ.

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
/// them (it knows what it wrote last).
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
    /// must be idempotent), given what the check found about it while the write before this
    /// one may still have been under way (`None`: the write looks itself, as on a retry).
    /// Returns the number of records that were new.
    async fn write(
        &mut self,
        batch: &[Self::Input],
        checked: Option<Checked<Self>>,
    ) -> Result<usize, ProcessError>;

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
}

impl SinkSpec {
    /// A spec with the defaults: batches of up to 1000 records, 2 MiB or 200 ms.
    pub fn new(wiring: Wiring) -> Self {
        Self {
            wiring,
            max_batch: 1000,
            max_batch_bytes: 2 << 20,
            linger: Duration::from_millis(200),
            max_prefetch_kib: kafka::PREFETCH_KIB,
            upkeep_every: None,
        }
    }
}

/// Runs `sink` until `cancel` fires; the batch in hand is written before returning. (Billing
/// sinks are run through [`Runnable::effectively_once_sink`](crate::Runnable), which refuses a
/// sink whose writes are not idempotent.)
///
/// While one batch is being written, the next is consumed and decoded: writes stay one at a
/// time and in order, and a batch's offsets are stored only after its write (and every write
/// before it) succeeded. At most two batches are in hand; once the next is full and the write
/// still runs, the partitions pause as in [`kafka::HoldBack::hold`].
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
    let mut writer = Writer::Idle(sink);
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
                done = writer.finished() => {
                    if !writer.settle(done, &source.consumer)? {
                        break 'batches;
                    }
                }
                _ = wait => break,
                // The store is slow: stop fetching ahead (below) whatever is in hand.
                _ = stalled => break,
                _ = upkeep_tick => upkeep_due = true,
                received = hold_back.recv(&source.consumer) => match received {
                    Ok(m) => {
                        bytes += message_bytes(&m);
                        messages.push(m);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.linger);
                        // Whatever else is ready joins without a round of the select each.
                        while messages.len() < spec.max_batch && bytes < spec.max_batch_bytes {
                            let before = messages.len();
                            let max = spec.max_batch.min(before + READY_AT_ONCE);
                            hold_back.take_ready(&source.consumer, max, &mut messages);
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
            if !stopping && !writer.wait(&mut hold_back, &source.consumer).await? {
                break;
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
        let Some(batch) = hold_back.hold(&source.consumer, decoding).await else {
            // Shutdown interrupted a wait: nothing of this batch is stored; it is redelivered.
            break;
        };
        // The batch's look at the store runs while the write before it finishes.
        let checked_from = (
            tokio::time::Instant::now(),
            source.consumer.context().rebalances_seen(),
        );
        let checking = tokio::spawn(check_batch(checker.clone(), batch, wait_token.clone()));
        // The write before must be done (and its offsets stored) before this one starts. A
        // store that stays down holds it in retries: the partitions pause meanwhile.
        if !writer.wait(&mut hold_back, &source.consumer).await? {
            checking.abort();
            break;
        }
        writer.upkeep_if_idle(&mut upkeep_due).await;
        let (batch, mut checked) = match hold_back.hold(&source.consumer, checking).await {
            Ok(checked) => checked,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(crate::Error::Stalled(format!("a batch's check ended: {e}"))),
        };
        // The check could miss only the write beside it, which the sink accounts for; not
        // what another owner wrote if a rebalance moved partitions meanwhile (and gave them
        // back), nor much else if the write took long: then the write looks again itself.
        if source.consumer.context().rebalances_seen() != checked_from.1
            || checked_from.0.elapsed() > kafka::PAUSE_AFTER
        {
            checked = None;
        }
        // Records of partitions a rebalance took away while they waited are the new owner's
        // to write: writing them too would race its stored-id check.
        let batch = batch.of_assigned(&source.consumer);
        writer.start(batch, checked, &spec, &deps, &source, wait_token.clone())?;
        // A task spawned from a worker waits in that worker's next-task slot, which no other
        // worker takes from, until the spawning task yields; consuming and decoding the next
        // batch yields to nothing while records are ready, so without this the write would
        // wait for them (a third of each batch's time).
        tokio::task::yield_now().await;
    }
    // The write under way finishes (or shutdown interrupts its retries) before the offsets
    // are committed.
    writer.wait(&mut hold_back, &source.consumer).await?;
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

/// How a write task ended: the sink back, whether the batch was written, and its messages.
type Finished<S> = std::result::Result<(S, bool, Vec<OwnedMessage>), tokio::task::JoinError>;

/// The sink, either at hand or writing a batch on a task of its own.
enum Writer<S: BatchSink> {
    Idle(S),
    /// Gives back the sink, whether the batch was written, and its messages.
    Busy {
        task: tokio::task::JoinHandle<(S, bool, Vec<OwnedMessage>)>,
        started: tokio::time::Instant,
    },
    /// Only while changing from one to the other.
    Moving,
}

impl<S: BatchSink> Writer<S> {
    /// When the write under way will have taken [`kafka::PAUSE_AFTER`] (`None`: there is
    /// none): from then the store is slow, and the partitions should pause rather than fetch
    /// ahead.
    fn stalls_at(&self) -> Option<tokio::time::Instant> {
        match self {
            Self::Busy { started, .. } => Some(*started + kafka::PAUSE_AFTER),
            Self::Idle(_) | Self::Moving => None,
        }
    }

    /// Waits for the write under way, if any, and settles it (see [`Writer::settle`]); the
    /// partitions pause once the write has taken [`kafka::PAUSE_AFTER`].
    async fn wait(
        &mut self,
        hold_back: &mut kafka::HoldBack,
        consumer: &kafka::KafkaConsumer,
    ) -> Result<bool> {
        let Some(stalls_at) = self.stalls_at() else {
            return Ok(true);
        };
        let pause_in = stalls_at.saturating_duration_since(tokio::time::Instant::now());
        let done = hold_back
            .hold_after(consumer, self.finished(), pause_in)
            .await;
        self.settle(done, consumer)
    }

    /// Runs the sink's upkeep if it is due and the sink is at hand.
    async fn upkeep_if_idle(&mut self, due: &mut bool) {
        if let (true, Self::Idle(sink)) = (*due, self) {
            sink.upkeep().await;
            *due = false;
        }
    }

    /// Starts writing `batch`. The writer must be idle (a write under way is waited for
    /// first): otherwise nothing starts and the stage stops with an error.
    fn start(
        &mut self,
        batch: DecodedBatch<S::Input>,
        checked: Option<Checked<S>>,
        spec: &SinkSpec,
        deps: &StageDeps,
        source: &StageSource,
        cancel: CancellationToken,
    ) -> Result<()> {
        let Self::Idle(mut sink) = std::mem::replace(self, Self::Moving) else {
            return Err(crate::Error::Stalled(
                "a batch was handed to a sink still writing the one before".into(),
            ));
        };
        let name = spec.wiring.name.clone();
        let metrics = deps.metrics.clone();
        let dead_letters = source.dead_letters().clone();
        let task = tokio::spawn(async move {
            let written = write_batch(
                &mut sink,
                &name,
                &metrics,
                &dead_letters,
                &batch,
                checked,
                &cancel,
            )
            .await;
            (sink, written, batch.messages)
        });
        *self = Self::Busy {
            task,
            started: tokio::time::Instant::now(),
        };
        Ok(())
    }

    /// The write under way, once it ends (never, when there is none). Cancel-safe.
    async fn finished(&mut self) -> Finished<S> {
        match self {
            Self::Busy { task, .. } => task.await,
            Self::Idle(_) | Self::Moving => std::future::pending().await,
        }
    }

    /// Takes the sink back from a finished write and stores the batch's offsets if it was
    /// written; false if shutdown interrupted it (nothing stored, the batch is redelivered).
    fn settle(&mut self, done: Finished<S>, consumer: &kafka::KafkaConsumer) -> Result<bool> {
        let (sink, written, messages) = match done {
            Ok(done) => done,
            // As if the write had run here.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(crate::Error::Stalled(format!("a sink write ended: {e}"))),
        };
        *self = Self::Idle(sink);
        if written {
            store_batch_offsets(consumer, &messages);
        }
        Ok(written)
    }
}

/// Writes one decoded batch, given what its check found; false if `cancel` interrupted it
/// before it was done.
async fn write_batch<S: BatchSink>(
    sink: &mut S,
    name: &str,
    metrics: &crate::metrics::Metrics,
    dead_letters: &DeadLetters,
    batch: &DecodedBatch<S::Input>,
    mut checked: Option<Checked<S>>,
    cancel: &CancellationToken,
) -> bool {
    let records = &batch.records;
    if records.is_empty() {
        return true;
    }
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        // What the check found holds for the first attempt only: a failed write may have
        // stored some of the batch.
        match sink.write(records, checked.take()).await {
            Ok(new_rows) => {
                metrics
                    .sink_batch_seconds
                    .with_label_values(&[name])
                    .observe(started.elapsed().as_secs_f64());
                metrics
                    .sink_rows
                    .with_label_values(&[name])
                    .inc_by(new_rows as u64);
                metrics
                    .sink_duplicates
                    .with_label_values(&[name])
                    .inc_by(records.len().saturating_sub(new_rows) as u64);
                return true;
            }
            Err(ProcessError::Poison(reason)) => {
                for &i in &batch.sources {
                    if !dead_letters.send(&batch.messages[i], &reason, cancel).await {
                        return false;
                    }
                }
                return true;
            }
            Err(ProcessError::Retriable(reason)) => {
                attempt += 1;
                metrics.retries.with_label_values(&[name]).inc();
                tracing::warn!(sink = %name, reason, attempt, "batch write failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        }
    }
}

/// Stores, per partition, the offset after the last record of the batch.
fn store_batch_offsets(consumer: &kafka::KafkaConsumer, messages: &[OwnedMessage]) {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in messages {
        let entry = next.entry((m.topic(), m.partition())).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if list
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_err()
        {
            continue;
        }
    }
    if let Err(e) = consumer.store_offsets(&list) {
        tracing::debug!(error = %e, "offsets not stored (partition moved in a rebalance)");
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
