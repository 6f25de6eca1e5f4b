//! Kafka client settings and helpers, keeping to the plain Kafka protocol so the local broker
//! and Apache Kafka or Redpanda are interchangeable.
//!
//! Two producer profiles: the latency path (replies, requests: no linger, Nagle off) and the
//! throughput path (usage, DLQ, bulk stages: a few milliseconds of linger, large lz4 batches). Consumers store offsets
//! explicitly (`enable.auto.offset.store=false`) so the runtime decides what is done; the
//! background auto-commit then commits only what was stored.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::StreamConsumer,
    error::RDKafkaErrorCode,
};

mod producer;

pub use producer::{DeliveryFuture, Producer};

use crate::{config::KafkaConfig, Error, Result};

/// The context of Sluice's consumers: logs rebalances and client errors through `tracing`.
pub struct StageContext {
    group: String,
    /// Counts rebalances that assigned or revoked partitions (`sluice_rebalances_total`).
    rebalances: Option<prometheus::IntCounter>,
    /// Rebalances begun and done in this consumer's life (see [`StageContext::rebalances_seen`]).
    seen: Arc<std::sync::atomic::AtomicU64>,
}

impl StageContext {
    /// How many times a rebalance began or ended for this consumer: if it is the same at two
    /// moments, the assignment did not change between them.
    pub fn rebalances_seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The count behind [`StageContext::rebalances_seen`], to read from elsewhere.
    pub fn rebalance_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.seen.clone()
    }
}

impl rdkafka::client::ClientContext for StageContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(group = %self.group, fac, message, "librdkafka")
            }
            L::Warning => tracing::warn!(group = %self.group, fac, message, "librdkafka"),
            _ => tracing::debug!(group = %self.group, fac, message, "librdkafka"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, %error, reason, "kafka client error");
    }
}

impl rdkafka::consumer::ConsumerContext for StageContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(group = %self.group, rebalance = %describe(rebalance), "rebalance starting");
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(group = %self.group, rebalance = %describe(rebalance), "rebalance done");
        if let Some(counter) = &self.rebalances {
            counter.inc();
        }
    }
}

fn describe(rebalance: &rdkafka::consumer::Rebalance<'_>) -> String {
    use rdkafka::consumer::Rebalance;
    let list = |tpl: &rdkafka::TopicPartitionList| {
        tpl.elements()
            .iter()
            .map(|e| format!("{}[{}]", e.topic(), e.partition()))
            .collect::<Vec<_>>()
            .join(",")
    };
    match rebalance {
        Rebalance::Assign(tpl) => format!("assign {}", list(tpl)),
        Rebalance::Revoke(tpl) => format!("revoke {}", list(tpl)),
        Rebalance::Error(e) => format!("error {e}"),
    }
}

/// How long a stage's fetch may wait for data, milliseconds. Kafka, Redpanda and the local
/// broker as `deploy/local` builds it answer a waiting fetch as soon as a produce makes data
/// available, so this does not delay records: it only sets how often an idle consumer asks
/// (and so what idling costs the broker and the stage).
pub const FETCH_WAIT_MS: u32 = 500;

/// How a consumer fetches: how long a fetch may wait for data, and how much it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// `fetch.wait.max.ms`.
    pub wait_ms: u32,
    /// `fetch.min.bytes`.
    pub min_bytes: u32,
}

impl Fetch {
    /// The interactive path: a fetch is answered as soon as one record is there.
    pub const LATENCY: Self = Self {
        wait_ms: FETCH_WAIT_MS,
        min_bytes: 1,
    };

    /// Readers that work in batches anyway (the meters, windowed SQL): a fetch is answered
    /// once 64 KiB have gathered or after 200 ms, so a busy topic is read in a few large
    /// fetches a second rather than one per produce, and the stage handles each as one batch.
    pub const BULK: Self = Self {
        wait_ms: 200,
        min_bytes: 64 * 1024,
    };
}

/// A consumer with Sluice's context.
pub type KafkaConsumer = StreamConsumer<StageContext>;

/// Which producer profile to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerProfile {
    /// Each record leaves at once: replies and requests on the interactive path.
    Latency,
    /// Records batch for a few milliseconds: usage, DLQ, bulk.
    Throughput,
}

/// The base settings every client gets.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.bootstrap)
        .set("socket.nagle.disable", "true")
        .set("broker.address.family", "v4");
    for (key, value) in &config.client_properties {
        client.set(key, value);
    }
    client
}

/// The settings of an idempotent producer (no duplicates or reordering from the producer's own
/// retries) with `profile`'s batching: the latency profile sends each record at once,
/// uncompressed; the throughput profile lets records gather for up to 5 ms into batches of up
/// to 1 MiB or 10,000 records, compressed with lz4 (which every Kafka-protocol broker takes).
pub fn producer_config(config: &KafkaConfig, profile: ProducerProfile) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    match profile {
        ProducerProfile::Latency => client.set("linger.ms", "0").set("compression.type", "none"),
        ProducerProfile::Throughput => client
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1048576")
            .set("compression.type", "lz4"),
    };
    client
}

/// An idempotent producer with `profile`'s batching ([`producer_config`]).
pub fn producer(config: &KafkaConfig, profile: ProducerProfile) -> Result<Producer> {
    Producer::new(&producer_config(config, profile))
}

/// The producers a process shares, one per profile: every stage and the edge of a process send
/// through these two. A librdkafka producer is a client with its own threads and connections,
/// so one per stage multiplied the threads woken for each record; shared, the records a burst
/// sends to one partition from several stages also leave in one request.
#[derive(Clone)]
pub struct Producers {
    latency: Producer,
    throughput: Producer,
}

impl Producers {
    /// Both producers, connected to `config`'s broker.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            latency: producer(config, ProducerProfile::Latency)?,
            throughput: producer(config, ProducerProfile::Throughput)?,
        })
    }

    /// The producer with `profile`'s batching.
    pub fn get(&self, profile: ProducerProfile) -> &Producer {
        match profile {
            ProducerProfile::Latency => &self.latency,
            ProducerProfile::Throughput => &self.throughput,
        }
    }

    /// Sends one empty record keyed `sluice-warm-up` to `topic` through each producer and
    /// waits for the acknowledgements. A new idempotent producer first obtains its producer id
    /// from the broker, and the records it is given meanwhile wait (up to half a second on the
    /// local broker); a benchmark warms its producers so that its clock does not measure that.
    pub async fn warm_up(&self, topic: &str) -> Result<()> {
        for producer in [&self.latency, &self.throughput] {
            producer
                .send(
                    rdkafka::producer::FutureRecord::<str, [u8]>::to(topic)
                        .key(WARM_UP_KEY)
                        .payload(&[]),
                    Duration::from_secs(10),
                )
                .await?;
        }
        Ok(())
    }
}

/// The key of the records [`Producers::warm_up`] sends.
pub const WARM_UP_KEY: &str = "sluice-warm-up";

/// How much one fetch may bring back per partition: large enough that a consumer catching up
/// reads big runs of records per round trip.
const FETCH_PARTITION_BYTES: &str = "4194304";

/// How soon a consumer whose prefetched records reached librdkafka's thresholds
/// (`queued.min.messages`, `queued.max.messages.kbytes`) looks again whether it may fetch,
/// milliseconds. librdkafka's default, a second, leaves a consumer that reads slower than the
/// broker serves idle for most of that second each time it catches up with what it fetched:
/// a stage working through a backlog at ~230,000 records/s took a second per ~100,000 records
/// whatever its speed. Looking again every few milliseconds costs nothing measurable.
const FETCH_QUEUE_BACKOFF_MS: &str = "5";

/// What a stage's consumer fetches ahead at most, KiB. With the short `fetch.queue.backoff.ms`
/// every consumer has, this cap costs no measurable throughput (with librdkafka's default of a
/// second it cost operators a third of theirs).
pub const PREFETCH_KIB: u32 = 16 * 1024;

/// The settings every consumer shares: the cluster, `group`, and how soon a full prefetch
/// queue is looked at again.
fn consumer_config(config: &KafkaConfig, group: &str) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", group)
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    client
}

/// The settings of a plain consumer in `group` reading from the earliest offset with bulk
/// fetches, committing nothing: what a benchmark's hand-built limit uses.
pub fn bulk_consumer_config(config: &KafkaConfig, group: &str) -> ClientConfig {
    let mut client = consumer_config(config, group);
    client
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("max.partition.fetch.bytes", FETCH_PARTITION_BYTES)
        .set("enable.partition.eof", "false");
    client
}

/// A consumer in `group` that only commits offsets the runtime stored.
/// `fetch` says how long a fetch waits and for how much.
/// `max_prefetch_kib` caps what is fetched ahead (`queued.max.messages.kbytes`), so memory
/// stays bounded whatever the consumer's pace; [`PREFETCH_KIB`] is what stages use.
/// Rebalances are logged and, given `metrics`, counted.
pub fn consumer(
    config: &KafkaConfig,
    group: &str,
    fetch: Fetch,
    max_prefetch_kib: u32,
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<KafkaConsumer> {
    let mut client = consumer_config(config, group);
    client
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout_ms / 10)
                .clamp(100, 1_000)
                .to_string(),
        )
        .set("fetch.wait.max.ms", fetch.wait_ms.to_string())
        .set("fetch.min.bytes", fetch.min_bytes.to_string())
        .set("max.partition.fetch.bytes", FETCH_PARTITION_BYTES)
        .set("enable.partition.eof", "false");
    // librdkafka's default (64 MiB) let a stalled sink's process grow by ~90 MB.
    client.set("queued.max.messages.kbytes", max_prefetch_kib.to_string());
    Ok(client.create_with_context(StageContext {
        group: group.to_owned(),
        rebalances: metrics.map(|m| m.rebalances.with_label_values(&[group])),
        seen: Arc::default(),
    })?)
}

/// A consumer with no group, for reading assigned partitions (the edge's replies partition).
pub fn assigned_consumer(config: &KafkaConfig, fetch_wait_ms: u32) -> Result<KafkaConsumer> {
    assigned_consumer_with(config, fetch_wait_ms, &[])
}

/// [`assigned_consumer`] with more librdkafka settings (a smaller prefetch, say).
pub fn assigned_consumer_with(
    config: &KafkaConfig,
    fetch_wait_ms: u32,
    settings: &[(&str, &str)],
) -> Result<KafkaConsumer> {
    let mut client = consumer_config(config, "sluice-unused");
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("enable.partition.eof", "false");
    for (name, value) in settings {
        client.set(*name, *value);
    }
    Ok(client.create_with_context(StageContext {
        group: "(assigned)".to_owned(),
        rebalances: None,
        seen: Arc::default(),
    })?)
}

/// Creates `topics` with the configured partitions and replication; existing topics are left
/// alone. Returns the topics that were created.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(new_topics.iter(), &options).await?;
    topics_done(results, RDKafkaErrorCode::TopicAlreadyExists, "create")
}

/// The topics an admin operation did, `already` (nothing to do) counting as neither done nor
/// an error.
fn topics_done(
    results: Vec<rdkafka::admin::TopicResult>,
    already: RDKafkaErrorCode,
    what: &str,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for result in results {
        match result {
            Ok(name) => done.push(name),
            Err((_, code)) if code == already => {}
            Err((name, code)) => {
                return Err(Error::Config(format!("cannot {what} topic {name}: {code}")));
            }
        }
    }
    Ok(done)
}

/// Deletes `topics`; topics already gone are fine. Returns the topics that were deleted.
pub async fn delete_topics(config: &KafkaConfig, topics: &[&str]) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.delete_topics(topics, &options).await?;
    topics_done(results, RDKafkaErrorCode::UnknownTopicOrPartition, "delete")
}

/// Produces every (key, payload) to `topic`, waiting for room when the producer queue is full,
/// and returns once the broker acknowledged them all (bulk loads: benchmarks, tests).
pub async fn produce_all(
    kafka: &KafkaConfig,
    topic: &str,
    records: impl Iterator<Item = Result<(String, Vec<u8>)>>,
) -> Result<()> {
    let producer = producer(kafka, ProducerProfile::Throughput)?;
    let mut pending = Vec::new();
    for record in records {
        let (key, bytes) = record?;
        loop {
            match producer.send_result(
                rdkafka::producer::FutureRecord::to(topic)
                    .key(&key)
                    .payload(&bytes),
            ) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        if pending.len() >= 10_000 {
            for delivery in pending.drain(..) {
                acknowledged(delivery).await?;
            }
        }
    }
    for delivery in pending {
        acknowledged(delivery).await?;
    }
    Ok(())
}

async fn acknowledged(delivery: DeliveryFuture) -> Result<()> {
    delivery
        .await
        .map_err(|_| Error::Stalled("a delivery report was lost".into()))?
        .map(|_| ())
        .map_err(|(e, _)| Error::Kafka(e))
}

/// Number of partitions of `topic`, as the broker reports it.
pub fn partition_count(consumer: &KafkaConsumer, topic: &str) -> Result<i32> {
    use rdkafka::consumer::Consumer;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if count == 0 {
        return Err(Error::Config(format!(
            "topic {topic} has no partitions; run `sluice setup`"
        )));
    }
    i32::try_from(count)
        .map_err(|_| Error::Config(format!("topic {topic} has too many partitions")))
}

/// A background task measuring a consumer's lag; stop it with [`LagReporter::stop`].
pub struct LagReporter {
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LagReporter {
    /// Starts measuring `consumer`'s lag every `every` under `group`.
    pub fn start(
        consumer: std::sync::Arc<KafkaConsumer>,
        group: &str,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        every: Duration,
    ) -> Self {
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(report_lag(
            consumer,
            group.to_owned(),
            metrics,
            every,
            cancel.clone(),
        ));
        Self { cancel, task }
    }

    /// Stops measuring and waits for the task.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Every `every`, sets `sluice_consumer_lag` for each partition assigned to `consumer`: the
/// partition's high watermark minus the group's committed offset. Runs until `cancel` fires.
async fn report_lag(
    consumer: std::sync::Arc<KafkaConsumer>,
    group: String,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let consumer = consumer.clone();
        // The client calls block on the broker: keep them off the async workers.
        let lags = tokio::task::spawn_blocking(move || partition_lags(&consumer)).await;
        match lags {
            Ok(Ok(lags)) => {
                for (topic, partition, lag) in lags {
                    metrics
                        .consumer_lag
                        .with_label_values(&[&group, &topic, &partition.to_string()])
                        .set(lag);
                }
            }
            Ok(Err(e)) => tracing::debug!(%group, error = %e, "lag not measured this time"),
            Err(e) => tracing::debug!(%group, error = %e, "lag task failed"),
        }
    }
}

/// (topic, partition, lag) for every assigned partition.
fn partition_lags(consumer: &KafkaConsumer) -> Result<Vec<(String, i32, i64)>> {
    use rdkafka::{consumer::Consumer, Offset};
    let timeout = Duration::from_secs(5);
    let committed = consumer.committed(timeout)?;
    let mut lags = Vec::new();
    for element in committed.elements() {
        let (low, high) =
            consumer.fetch_watermarks(element.topic(), element.partition(), timeout)?;
        let done = match element.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lags.push((
            element.topic().to_owned(),
            element.partition(),
            (high - done).max(0),
        ));
    }
    Ok(lags)
}

/// How long a stage waits on slow downstream work before it pauses its partitions: short
/// waits (a lane briefly full under load, a slow insert) pass without touching the fetcher,
/// since a pause drops what was fetched ahead.
pub const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// How often a paused consumer is polled, so the group does not evict it for exceeding
/// `max.poll.interval.ms` however long downstream takes.
const POLL_WHILE_PAUSED: Duration = Duration::from_millis(500);

/// Backpressure: a consumer's partitions paused while downstream catches up, and what that
/// is counted as.
pub struct HoldBack {
    pauses: prometheus::IntCounter,
    paused: prometheus::IntGauge,
    /// Records that arrived while paused (from a partition a rebalance assigned meanwhile),
    /// in arrival order; [`HoldBack::recv`] hands them out before consuming anything new.
    arrived: std::collections::VecDeque<rdkafka::message::OwnedMessage>,
}

impl HoldBack {
    /// Counts pauses of `stage` in `sluice_consumer_pauses_total` and `sluice_consumer_paused`.
    pub fn new(metrics: &crate::metrics::Metrics, stage: &str) -> Self {
        Self {
            pauses: metrics.consumer_pauses.with_label_values(&[stage]),
            paused: metrics.consumer_paused.with_label_values(&[stage]),
            arrived: std::collections::VecDeque::new(),
        }
    }

    /// The next record to handle: one that arrived while paused, else the consumer's next.
    /// Cancel-safe, like the consumer's own `recv`.
    pub async fn recv(
        &mut self,
        consumer: &KafkaConsumer,
    ) -> rdkafka::error::KafkaResult<rdkafka::message::OwnedMessage> {
        if let Some(message) = self.arrived.pop_front() {
            return Ok(message);
        }
        consumer.recv().await.map(|message| message.detach())
    }

    /// Takes the records that arrived while paused and were not handed out yet (to be read
    /// again from the broker instead).
    pub fn take_arrived(&mut self) -> Vec<rdkafka::message::OwnedMessage> {
        self.arrived.drain(..).collect()
    }

    /// Appends to `out`, until it holds `max`, the records that are ready now (as
    /// [`HoldBack::recv`] would hand them out), without waiting for more. An error the
    /// consumer reports ends the take; it is logged, as the consume loops do.
    pub fn take_ready(
        &mut self,
        consumer: &KafkaConsumer,
        max: usize,
        out: &mut Vec<rdkafka::message::OwnedMessage>,
    ) {
        use futures::FutureExt;
        while out.len() < max {
            if let Some(message) = self.arrived.pop_front() {
                out.push(message);
                continue;
            }
            // The consumer's receive is cancel-safe: polled once and dropped, nothing is lost.
            match consumer.recv().now_or_never() {
                Some(Ok(message)) => out.push(message.detach()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consume failed");
                    break;
                }
                None => break,
            }
        }
    }

    /// Runs `work` (downstream making room); if it takes longer than [`PAUSE_AFTER`], pauses
    /// every partition assigned to `consumer` until it is done. Paused, librdkafka stops
    /// fetching and drops what it fetched ahead (so memory stays bounded however long the
    /// stall), and resumes from the first record not yet handed out, so nothing is skipped or
    /// repeated. The consumer keeps being polled meanwhile so it stays in its group; a record
    /// that still arrives (a partition assigned by a rebalance meanwhile) has its partition
    /// paused too and is kept for [`HoldBack::recv`].
    pub async fn hold<F: std::future::Future>(
        &mut self,
        consumer: &KafkaConsumer,
        work: F,
    ) -> F::Output {
        self.hold_after(consumer, work, PAUSE_AFTER).await
    }

    /// [`HoldBack::hold`], pausing once `work` has taken `after` (for work that had been
    /// running before it was held).
    pub async fn hold_after<F: std::future::Future>(
        &mut self,
        consumer: &KafkaConsumer,
        work: F,
        after: Duration,
    ) -> F::Output {
        use rdkafka::{consumer::Consumer, message::Message};
        tokio::pin!(work);
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = tokio::time::sleep(after) => {}
        }
        let paused = pause(consumer, None);
        self.pauses.inc();
        self.paused.set(1);
        tracing::info!(partitions = paused, "downstream is slow; partitions paused");
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                received = consumer.recv() => match received {
                    Ok(message) => {
                        pause(consumer, Some((message.topic(), message.partition())));
                        self.arrived.push_back(message.detach());
                    }
                    Err(e) => tracing::warn!(error = %e, "consume failed while paused"),
                },
                // Dropping the pending receive and starting another polls the client.
                _ = tokio::time::sleep(POLL_WHILE_PAUSED) => {}
            }
        };
        match consumer.assignment() {
            Ok(assignment) => {
                if let Err(e) = consumer.resume(&assignment) {
                    tracing::error!(error = %e, "resuming partitions failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the assignment to resume it"),
        }
        self.paused.set(0);
        tracing::info!("downstream caught up; partitions resumed");
        out
    }
}

/// Pauses one partition, or (given `None`) the whole assignment; returns how many.
fn pause(consumer: &KafkaConsumer, only: Option<(&str, i32)>) -> usize {
    use rdkafka::{consumer::Consumer, TopicPartitionList};
    let list = match only {
        Some((topic, partition)) => {
            let mut list = TopicPartitionList::new();
            list.add_partition(topic, partition);
            list
        }
        None => match consumer.assignment() {
            Ok(assignment) => assignment,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the assignment to pause it");
                return 0;
            }
        },
    };
    if let Err(e) = consumer.pause(&list) {
        tracing::error!(error = %e, "pausing partitions failed");
        return 0;
    }
    list.count()
}
