//! `sluice replay`: re-read a topic between two timestamps and feed the records through a
//! stage — for backfills (metering a time range into ClickHouse again is safe: the sink is
//! idempotent) and offline evaluation. Replay reads by assignment, outside the stage's
//! consumer group, so the live stage's offsets are untouched.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{consumer::Consumer, message::OwnedMessage, Message, Offset, TopicPartitionList};
use sluice_schemas::Codec;
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaConfig,
    kafka::{self, KafkaConsumer, ProducerProfile},
    metrics::Metrics,
    runtime::{DeadLetters, RecordContext},
    BatchSink, Emitter, Error, Input, Operator, ProcessError, Result,
};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records read in the range.
    pub read: u64,
    /// Records processed (operators) or written as new rows (sinks).
    pub processed: u64,
    /// Records that went to the DLQ.
    pub dead_lettered: u64,
}

/// The records of `topic` with timestamps in `[from_ms, to_ms)`, per partition in order.
///
/// The broker's offset-for-timestamp lookup only chooses where to start reading; every record
/// is still checked against the range, and each partition is read up to its high watermark at
/// the start. (The local broker answers timestamp lookups with the earliest offset, so the
/// check is what makes the range exact there.)
struct RangeReader {
    consumer: KafkaConsumer,
    from_ms: i64,
    to_ms: i64,
    /// Offset to stop before, per partition still being read.
    ends: HashMap<i32, i64>,
    total: i64,
}

impl RangeReader {
    async fn open(config: &KafkaConfig, topic: &str, from_ms: i64, to_ms: i64) -> Result<Self> {
        let consumer = kafka::assigned_consumer(config, 100)?;
        let partitions = kafka::partition_count(&consumer, topic)?;
        let timeout = Duration::from_secs(10);
        let mut starts = TopicPartitionList::new();
        for p in 0..partitions {
            starts.add_partition_offset(topic, p, Offset::Offset(from_ms))?;
        }
        let starts = consumer.offsets_for_times(starts, timeout)?;
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        let mut total = 0;
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            let start = match starts.find_partition(topic, p).map(|e| e.offset()) {
                _ if from_ms <= 0 => low,
                Some(Offset::Offset(o)) => o.clamp(low, high),
                _ => high,
            };
            tracing::debug!(topic, partition = p, start, high, "replay range");
            if high > start {
                assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
                ends.insert(p, high);
                total += high - start;
            }
        }
        if !ends.is_empty() {
            consumer.assign(&assignment)?;
        }
        Ok(Self {
            consumer,
            from_ms,
            to_ms,
            ends,
            total,
        })
    }

    /// The next record in range, or `None` when every partition reached its end.
    async fn next(&mut self) -> Result<Option<OwnedMessage>> {
        loop {
            if self.ends.is_empty() {
                return Ok(None);
            }
            let message =
                match tokio::time::timeout(Duration::from_secs(30), self.consumer.recv()).await {
                    Ok(Ok(m)) => m.detach(),
                    Ok(Err(e)) => return Err(Error::Kafka(e)),
                    Err(_) => {
                        return Err(Error::Stalled(
                            "no record for 30 s in the middle of a replay".into(),
                        ))
                    }
                };
            let partition = message.partition();
            let Some(end) = self.ends.get(&partition).copied() else {
                continue;
            };
            if message.offset() + 1 >= end {
                self.ends.remove(&partition);
                if let Err(e) = self.consumer.incremental_unassign(&{
                    let mut done = TopicPartitionList::new();
                    done.add_partition(message.topic(), partition);
                    done
                }) {
                    tracing::debug!(error = %e, "cannot unassign a finished partition");
                }
            }
            let in_range = message
                .timestamp()
                .to_millis()
                .is_some_and(|t| t >= self.from_ms && t < self.to_ms);
            if message.offset() < end && in_range {
                return Ok(Some(message));
            }
        }
    }
}

/// Reads every record of `topic` with a timestamp in `[from_ms, to_ms)`, each partition up to
/// its end when the scan began, and hands each one's payload to `each` — for audits such as
/// `sluice invoices reconcile`. Shows progress on stderr once a second; returns how many records it read.
pub async fn scan<F, Fut>(
    config: &KafkaConfig,
    topic: &str,
    from_ms: i64,
    to_ms: i64,
    mut each: F,
) -> Result<u64>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut reader = RangeReader::open(config, topic, from_ms, to_ms).await?;
    let (started, mut last_progress) = (Instant::now(), Instant::now());
    let mut read = 0u64;
    while let Some(message) = reader.next().await? {
        each(message.payload().map(<[u8]>::to_vec).unwrap_or_default()).await;
        read += 1;
        if last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "scanned {read} records of at most {} ({:.0}/s)",
                reader.total,
                read as f64 / started.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
    }
    Ok(read)
}

/// One replay's reader, DLQ writer and counts.
struct Session {
    reader: RangeReader,
    producer: crate::kafka::Producer,
    dead_letters: DeadLetters,
    report: ReplayReport,
    started: Instant,
    last_progress: Instant,
}

impl Session {
    async fn open(deps: &ReplayDeps, job: &ReplayJob) -> Result<Self> {
        let reader = RangeReader::open(&deps.kafka, &job.topic, job.from_ms, job.to_ms).await?;
        let producer = kafka::producer(&deps.kafka, ProducerProfile::Throughput)?;
        let dead_letters = DeadLetters::new(
            producer.clone(),
            deps.codec.clone(),
            &deps.dlq_topic,
            &format!("replay-{}", job.stage),
            deps.metrics.clone(),
        );
        Ok(Self {
            reader,
            producer,
            dead_letters,
            report: ReplayReport::default(),
            started: Instant::now(),
            last_progress: Instant::now(),
        })
    }

    /// Sends `message` to the DLQ (retrying until the broker takes it) and counts it.
    async fn dead_letter(&mut self, message: &OwnedMessage, reason: &str) {
        self.dead_letters
            .send(message, reason, &CancellationToken::new())
            .await;
        self.report.dead_lettered += 1;
    }

    /// Prints progress at most once a second.
    fn progress(&mut self) {
        if self.last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "replayed {} records of at most {} scanned ({:.0}/s)",
                self.report.read,
                self.reader.total,
                self.report.read as f64 / self.started.elapsed().as_secs_f64()
            );
            self.last_progress = Instant::now();
        }
    }
}

/// What a replay reads, and for which stage.
#[derive(Debug, Clone)]
pub struct ReplayJob {
    /// The stage replayed (its dead letters say `replay-<stage>`).
    pub stage: String,
    /// The topic read.
    pub topic: String,
    /// Start, Unix milliseconds (inclusive).
    pub from_ms: i64,
    /// End, Unix milliseconds (exclusive).
    pub to_ms: i64,
}

/// Everything a replay needs besides the stage itself.
pub struct ReplayDeps {
    pub kafka: KafkaConfig,
    pub codec: Arc<Codec>,
    pub metrics: Arc<Metrics>,
    /// Where records that fail go.
    pub dlq_topic: String,
}

/// Feeds the job's records through `operator`; its outputs are produced as the live stage
/// would produce them.
pub async fn replay_operator<O: Operator>(
    operator: &mut O,
    job: &ReplayJob,
    deps: &ReplayDeps,
) -> Result<ReplayReport> {
    let mut session = Session::open(deps, job).await?;
    while let Some(message) = session.reader.next().await? {
        session.report.read += 1;
        let ctx = RecordContext::of(&message);
        let outcome = match deps
            .codec
            .decode::<O::Input>(message.payload().unwrap_or_default())
            .await
        {
            Err(e) => Err(ProcessError::Poison(format!("undecodable: {e}"))),
            Ok(record) => {
                let mut out = Emitter::new(session.producer.clone(), deps.codec.clone(), ctx.trace);
                let batch = [Input { record, ctx }];
                match operator.process(&batch, &mut out).await {
                    Ok(()) => match out.take_rejected().pop() {
                        Some(rejected) => Err(ProcessError::Poison(rejected.reason)),
                        None => out.flush().await.map(|_| ()),
                    },
                    Err(e) => Err(e.error),
                }
            }
        };
        match outcome {
            Ok(()) => session.report.processed += 1,
            Err(e) => {
                session.dead_letter(&message, &e.to_string()).await;
            }
        }
        session.progress();
    }
    Ok(session.report)
}

/// Writes the job's records to `sink` in batches of `batch`.
pub async fn replay_sink<S: BatchSink>(
    sink: &mut S,
    batch: usize,
    job: &ReplayJob,
    deps: &ReplayDeps,
) -> Result<ReplayReport> {
    let mut session = Session::open(deps, job).await?;
    let mut pending: Vec<S::Input> = Vec::with_capacity(batch);
    loop {
        let next = session.reader.next().await?;
        if let Some(message) = &next {
            session.report.read += 1;
            match deps
                .codec
                .decode::<S::Input>(message.payload().unwrap_or_default())
                .await
            {
                Ok(record) => pending.push(record),
                Err(e) => {
                    session
                        .dead_letter(message, &format!("undecodable: {e}"))
                        .await;
                }
            }
        }
        if pending.len() >= batch.max(1) || (next.is_none() && !pending.is_empty()) {
            let mut attempt = 0;
            loop {
                // Each batch is a write of its own: ended (stored) before the next is read.
                let written = match sink.write(&pending, None).await {
                    Ok(new) => sink.end().await.map(|()| new),
                    Err(e) => Err(e),
                };
                match written {
                    Ok(new) => {
                        session.report.processed += new as u64;
                        break;
                    }
                    Err(ProcessError::Retriable(reason)) if attempt < 10 => {
                        attempt += 1;
                        tracing::warn!(reason, attempt, "replay batch failed; retrying");
                        tokio::time::sleep(crate::runtime::backoff(attempt)).await;
                    }
                    Err(e) => return Err(Error::GaveUp(e)),
                }
            }
            pending.clear();
        }
        session.progress();
        if next.is_none() {
            return Ok(session.report);
        }
    }
}
