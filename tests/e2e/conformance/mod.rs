//! The conformance kit: every operator and sink is run through the same properties on the real
//! broker, each stage as its own `sluice run <stage>` process, as an operator would run it:
//!
//! - **order per key**: one key's records take effect in the order they came;
//! - **poison → DLQ**: a record that does not decode (garbage, or a record of another type)
//!   goes to the DLQ with its source topic, partition, offset and bytes, and the key's later
//!   records still take effect;
//! - **kill -9**: the stage killed mid-stream and started again loses nothing, and an effect
//!   counted in a store is counted once (a record on a topic may be repeated, with the same id,
//!   which downstream deduplicates);
//! - **shutdown flush**: on SIGTERM the stage exits cleanly, and every record it committed had
//!   taken effect; started again, it loses nothing;
//! - **backpressure**: when downstream stalls, the stage pauses its partitions instead of
//!   buffering, and once downstream recovers it loses nothing (and keeps each key's order).
//!
//! A stage joins the kit by implementing [`Subject`] (its input record, its effects, how its
//! downstream stalls) in `subjects.rs` and being listed in [`subjects`]. The result is one table
//! of stage × property, printed at the end of the test (and on failure).

mod subjects;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message, Offset, TopicPartitionList,
};
use sluice_schemas::{Codec, DeadLetter, RegistryClient};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

pub use subjects::subjects;

/// A property of the kit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    Order,
    Poison,
    Kill,
    Shutdown,
    Backpressure,
}

impl Property {
    const ALL: [Property; 5] = [
        Property::Order,
        Property::Poison,
        Property::Kill,
        Property::Shutdown,
        Property::Backpressure,
    ];

    fn title(self) -> &'static str {
        match self {
            Property::Order => "order per key",
            Property::Poison => "poison → DLQ",
            Property::Kill => "kill -9",
            Property::Shutdown => "shutdown flush",
            Property::Backpressure => "backpressure",
        }
    }
}

/// How a stage's effects show whether a key's order was kept.
pub enum Order {
    /// Effects appear in a log (a topic) in the order they took effect.
    PerKey,
    /// The effects have no order to keep (why).
    NotApplicable(&'static str),
}

/// How the kit stalls a stage's downstream.
pub enum Stall {
    /// The store the stage writes is down (ClickHouse behind the kit's proxy).
    StoreDown,
    /// The topic the stage writes to does not exist yet (created to recover).
    MissingTopic(&'static str),
    /// The model the stage calls is slow.
    SlowModel,
}

/// What a stage did with the kit's records so far.
#[derive(Debug)]
pub enum Effects {
    /// Each record's effect, identified by (key, seq), once per time it was seen, in the order
    /// seen (per key: the order of a topic's partition).
    Each(Vec<(String, u32)>),
    /// Per key, how many records the effects count (aggregates read through `FINAL`).
    Counted(HashMap<String, u64>),
}

/// What the kit needs to know of a stage to run it.
pub struct About {
    /// The stage's name in metrics and dead letters (and the table's row).
    pub stage: &'static str,
    /// `sluice run <run_arg>` runs it.
    pub run_arg: &'static str,
    /// The topic it reads (suffix after the prefix).
    pub input: &'static str,
    /// Whether a key's order shows in its effects.
    pub order: Order,
    /// How its downstream stalls.
    pub stall: Stall,
    /// Whether its effects are counted in a store (then each must be counted exactly once).
    pub in_store: bool,
}

/// A stage under test.
#[async_trait]
pub trait Subject: Send + Sync {
    /// What the stage is.
    fn about(&self) -> About;
    /// Row label.
    fn name(&self) -> &'static str {
        self.about().stage
    }
    fn run_arg(&self) -> &'static str {
        self.about().run_arg
    }
    fn stage(&self) -> &'static str {
        self.about().stage
    }
    fn input(&self) -> &'static str {
        self.about().input
    }
    fn order(&self) -> Order {
        self.about().order
    }
    fn stall(&self) -> Stall {
        self.about().stall
    }
    fn in_store(&self) -> bool {
        self.about().in_store
    }
    /// Records per key `property` produces (the poison property sends its own two); the
    /// backpressure property uses one key, so it needs enough records to fill a lane.
    fn records_per_key(&self, property: Property) -> u32 {
        match property {
            Property::Backpressure => 60,
            _ => 30,
        }
    }
    /// Extra environment for the stage's process in `property`.
    fn env(&self, _world: &World, _property: Property) -> Vec<(String, String)> {
        Vec::new()
    }
    /// The encoded input record number `seq` of `key`.
    fn record(&self, world: &World, key: &str, seq: u32) -> Vec<u8>;
    /// A valid frame of a record of another type (poison by its schema).
    fn foreign_record(&self, world: &World) -> Vec<u8> {
        subjects::foreign(self.input(), world)
    }
    /// The effects so far.
    async fn effects(&self, world: &World) -> Effects;
}

/// A cell's outcome.
enum Outcome {
    Pass(String),
    NotApplicable(&'static str),
    Fail(String),
}

/// What every cell shares: one schema registry and a codec talking to it.
pub struct Kit {
    _registry: Part,
    pub registry_url: String,
    pub codec: Arc<Codec>,
}

impl Kit {
    async fn start() -> Self {
        let prefix = unique("kit");
        run_cli(&prefix, &["setup"]);
        let port = free_port();
        let registry_url = format!("http://127.0.0.1:{port}");
        let registry = spawn_part(
            &prefix,
            &registry_url,
            &["registry"],
            &[("SLUICE_REGISTRY__LISTEN", format!("127.0.0.1:{port}"))],
        );
        wait_ready(&registry.ops_url);
        let codec = Arc::new(Codec::new(RegistryClient::new(&registry_url).unwrap()));
        codec.register_all().await.unwrap();
        Self {
            _registry: registry,
            registry_url,
            codec,
        }
    }
}

/// One cell's world: its own topic prefix (hence its own topics and groups) and keys.
pub struct World {
    pub prefix: String,
    pub kit: Arc<Kit>,
    /// When the world began (ms since the epoch).
    pub created_ms: i64,
    /// Topics this world has (suffixes).
    topics: Vec<&'static str>,
}

/// One input record: its key, number, and where it landed.
#[derive(Debug, Clone)]
pub struct Sent {
    pub key: String,
    pub seq: u32,
    pub partition: i32,
    pub offset: i64,
}

const TOPICS: [&str; 5] = ["requests", "routed", "replies", "usage", "dlq"];

impl World {
    async fn new(kit: &Arc<Kit>, missing: Option<&'static str>) -> Self {
        let world = Self {
            prefix: unique("c"),
            kit: kit.clone(),
            created_ms: sluice_pipelines::now_ms(),
            topics: TOPICS.into_iter().filter(|t| Some(*t) != missing).collect(),
        };
        for topic in world.topics.clone() {
            world.create_topic(topic).await;
        }
        world
    }

    async fn create_topic(&self, suffix: &str) {
        let kafka = sluice_pipelines::KafkaConfig {
            bootstrap: bootstrap(),
            partitions: 3,
            ..Default::default()
        };
        let topic = self.topic(suffix);
        sluice_pipelines::kafka::ensure_topics(&kafka, &[topic.as_str()])
            .await
            .unwrap();
    }

    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// Key number `n` of this world.
    pub fn key(&self, n: usize) -> String {
        format!("{}-k{n}", self.prefix)
    }

    /// Produces `records` to the subject's input topic, in order, and returns where each landed.
    async fn produce(
        &self,
        subject: &dyn Subject,
        records: &[(String, Option<u32>, Vec<u8>)],
    ) -> Vec<(String, Option<u32>, i32, i64)> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let topic = self.topic(subject.input());
        let mut deliveries = Vec::with_capacity(records.len());
        for (key, _, bytes) in records {
            loop {
                match producer.send_result(FutureRecord::to(&topic).key(key).payload(bytes)) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        let mut landed = Vec::with_capacity(records.len());
        for ((key, seq, _), delivery) in records.iter().zip(deliveries) {
            let delivery = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
            landed.push((key.clone(), *seq, delivery.partition, delivery.offset));
        }
        landed
    }

    /// Produces `per_key` records for each of `keys` keys, interleaved, and returns them.
    async fn produce_keys(&self, subject: &dyn Subject, keys: usize, per_key: u32) -> Vec<Sent> {
        let mut records = Vec::new();
        for seq in 0..per_key {
            for k in 0..keys {
                let key = self.key(k);
                let bytes = subject.record(self, &key, seq);
                records.push((key, Some(seq), bytes));
            }
        }
        self.produce(subject, &records)
            .await
            .into_iter()
            .filter_map(|(key, seq, partition, offset)| {
                Some(Sent {
                    key,
                    seq: seq?,
                    partition,
                    offset,
                })
            })
            .collect()
    }

    /// Starts the subject's stage process and waits until it is ready.
    async fn start(&self, subject: &dyn Subject, env: &[(String, String)]) -> Part {
        let env: Vec<(String, String)> = env.to_vec();
        let (prefix, registry) = (self.prefix.clone(), self.kit.registry_url.clone());
        let arg = subject.run_arg();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, String)> =
                env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            // A free port can be taken by a parallel test before the stage binds it: then it
            // exits at once, and starts again on another.
            for _ in 0..3 {
                let mut part = spawn_part(&prefix, &registry, &["run", arg], &env);
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline && !part.exited() {
                    if ready(&part.ops_url) {
                        return part;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            panic!("sluice run {arg} did not become ready");
        })
        .await
        .unwrap()
    }

    /// The offsets the stage's group committed, per partition of its input.
    async fn committed(&self, subject: &dyn Subject) -> HashMap<i32, i64> {
        let (prefix, stage, topic) = (
            self.prefix.clone(),
            subject.stage(),
            self.topic(subject.input()),
        );
        tokio::task::spawn_blocking(move || committed_offsets(&prefix, stage, &topic))
            .await
            .unwrap()
    }

    /// Every dead letter in this world's DLQ so far.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let reader = topic_reader(&self.topic("dlq"));
        let mut letters = Vec::new();
        while let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_secs(2), reader.recv()).await
        {
            if let Some(bytes) = message.payload() {
                if let Ok(letter) = self.kit.codec.decode::<DeadLetter>(bytes).await {
                    letters.push(letter);
                }
            }
        }
        letters
    }
}

/// The offsets `<prefix>.<stage>` committed on each partition of `topic` (blocking).
fn committed_offsets(prefix: &str, stage: &str, topic: &str) -> HashMap<i32, i64> {
    let group = format!("{prefix}.{stage}");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..3 {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// What the effects say about the records sent.
struct Tally {
    /// Records with no effect yet.
    missing: usize,
    /// Effects beyond one per record (repeats on a topic; over-counts in a store).
    extra: u64,
    /// Keys whose effects came out of order.
    out_of_order: Vec<String>,
}

fn tally(sent: &[Sent], effects: &Effects) -> Tally {
    match effects {
        Effects::Each(seen) => {
            let mut count: HashMap<(&str, u32), u64> = HashMap::new();
            let mut first_order: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for (key, seq) in seen {
                let n = count.entry((key.as_str(), *seq)).or_default();
                if *n == 0 {
                    first_order.entry(key.as_str()).or_default().push(*seq);
                }
                *n += 1;
            }
            let missing = sent
                .iter()
                .filter(|s| !count.contains_key(&(s.key.as_str(), s.seq)))
                .count();
            let extra = count.values().map(|n| n - 1).sum();
            let out_of_order = first_order
                .into_iter()
                .filter(|(_, seqs)| seqs.windows(2).any(|w| w[0] > w[1]))
                .map(|(key, _)| key.to_owned())
                .collect();
            Tally {
                missing,
                extra,
                out_of_order,
            }
        }
        Effects::Counted(counted) => {
            let mut expected: HashMap<&str, u64> = HashMap::new();
            for s in sent {
                *expected.entry(&s.key).or_default() += 1;
            }
            let missing = expected
                .iter()
                .map(|(key, n)| n.saturating_sub(*counted.get(*key).unwrap_or(&0)) as usize)
                .sum();
            let extra = expected
                .iter()
                .map(|(key, n)| counted.get(*key).unwrap_or(&0).saturating_sub(*n))
                .sum();
            Tally {
                missing,
                extra,
                out_of_order: Vec::new(),
            }
        }
    }
}

/// Polls the effects until every record in `sent` took effect (at most `seconds`).
async fn await_all(
    subject: &dyn Subject,
    world: &World,
    sent: &[Sent],
    seconds: u64,
) -> Result<Tally, String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let tally = tally(sent, &subject.effects(world).await);
        if tally.missing == 0 {
            return Ok(tally);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {} records never took effect",
                tally.missing,
                sent.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls until at least one record took effect; returns how many had.
async fn await_some(subject: &dyn Subject, world: &World, sent: &[Sent]) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tally = tally(sent, &subject.effects(world).await);
        if tally.missing < sent.len() {
            return Ok(sent.len() - tally.missing);
        }
        if Instant::now() >= deadline {
            return Err("no record took effect within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The exactness verdict: a store counts each record once; a topic may repeat records.
fn exactness(subject: &dyn Subject, tally: &Tally) -> Result<String, String> {
    if subject.in_store() {
        if tally.extra > 0 {
            return Err(format!("{} effects counted twice", tally.extra));
        }
        Ok("each counted once".into())
    } else {
        Ok(match tally.extra {
            0 => "none repeated".into(),
            n => format!("{n} repeated (same ids)"),
        })
    }
}

/// Stops a stage process with SIGTERM; true if it exited cleanly.
async fn stop(mut part: Part) -> bool {
    tokio::task::spawn_blocking(move || part.terminate())
        .await
        .unwrap_or(false)
}

/// Waits until the stage has read at least one record (it holds records it has not finished).
async fn await_consumed(subject: &dyn Subject, stage: &Part) -> Result<(), String> {
    let consumed = format!("sluice_records_in_total{{stage=\"{}\"}}", subject.stage());
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&stage.ops_url, &consumed).await < 1.0 {
        if Instant::now() >= deadline {
            return Err("the stage read nothing within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn order(subject: &dyn Subject, kit: &Arc<Kit>) -> Result<String, String> {
    let world = World::new(kit, None).await;
    let (keys, per_key) = (4, subject.records_per_key(Property::Order));
    let sent = world.produce_keys(subject, keys, per_key).await;
    let stage = world
        .start(subject, &subject.env(&world, Property::Order))
        .await;
    let tally = await_all(subject, &world, &sent, 60).await;
    stop(stage).await;
    let tally = tally?;
    if !tally.out_of_order.is_empty() {
        return Err(format!("keys out of order: {:?}", tally.out_of_order));
    }
    if tally.extra > 0 {
        return Err(format!(
            "{} effects repeated without a failure",
            tally.extra
        ));
    }
    Ok(format!("{keys}×{per_key} in order"))
}

async fn poison(subject: &dyn Subject, kit: &Arc<Kit>) -> Result<String, String> {
    let world = World::new(kit, None).await;
    let key = world.key(0);
    let garbage = b"\x00 not a schema-registry frame".to_vec();
    let foreign = subject.foreign_record(&world);
    let records = vec![
        (key.clone(), Some(0), subject.record(&world, &key, 0)),
        (key.clone(), None, garbage.clone()),
        (key.clone(), None, foreign.clone()),
        (key.clone(), Some(1), subject.record(&world, &key, 1)),
    ];
    let landed = world.produce(subject, &records).await;
    let sent: Vec<Sent> = landed
        .iter()
        .filter_map(|(key, seq, partition, offset)| {
            Some(Sent {
                key: key.clone(),
                seq: (*seq)?,
                partition: *partition,
                offset: *offset,
            })
        })
        .collect();
    let stage = world
        .start(subject, &subject.env(&world, Property::Poison))
        .await;
    // The key's records after the poison take effect: the stage went on.
    let went_on = await_all(subject, &world, &sent, 60).await;
    let input = world.topic(subject.input());
    let deadline = Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let letters: Vec<DeadLetter> = world
            .dead_letters()
            .await
            .into_iter()
            .filter(|l| l.stage == subject.stage())
            .collect();
        if letters.len() >= 2 || Instant::now() >= deadline {
            break letters;
        }
    };
    stop(stage).await;
    went_on?;
    for ((_, _, partition, offset), bytes) in [(&landed[1], &garbage), (&landed[2], &foreign)] {
        let letter = letters
            .iter()
            .find(|l| l.source_partition == *partition && l.source_offset == *offset)
            .ok_or_else(|| {
                format!("no dead letter for {input}[{partition}]@{offset}: {letters:?}")
            })?;
        if letter.source_topic != input || letter.payload.as_deref() != Some(&bytes[..]) {
            return Err(format!(
                "the dead letter lost its source or bytes: {letter:?}"
            ));
        }
        if !letter.reason.starts_with("undecodable") {
            return Err(format!("unexpected reason: {}", letter.reason));
        }
    }
    Ok("2 letters, with coordinates".into())
}

async fn kill(subject: &dyn Subject, kit: &Arc<Kit>) -> Result<String, String> {
    let world = World::new(kit, None).await;
    let per_key = subject.records_per_key(Property::Kill);
    let sent = world.produce_keys(subject, 4, per_key).await;
    let env = subject.env(&world, Property::Kill);
    let mut stage = world.start(subject, &env).await;
    await_consumed(subject, &stage).await?;
    stage.kill();
    let killed_at = Instant::now();
    let done_before = sent.len() - tally(&sent, &subject.effects(&world).await).missing;
    // The broker evicts the dead member when its session expires (10 s); starting the next
    // one after that keeps the restart to one rebalance.
    tokio::time::sleep_until((killed_at + Duration::from_secs(12)).into()).await;
    let again = world.start(subject, &env).await;
    let tally = await_all(subject, &world, &sent, 90).await;
    stop(again).await;
    let verdict = exactness(subject, &tally?)?;
    Ok(format!("killed at {done_before}/{}; {verdict}", sent.len()))
}

async fn shutdown(subject: &dyn Subject, kit: &Arc<Kit>) -> Result<String, String> {
    let world = World::new(kit, None).await;
    let per_key = subject.records_per_key(Property::Shutdown);
    let sent = world.produce_keys(subject, 4, per_key).await;
    let env = subject.env(&world, Property::Shutdown);
    let stage = world.start(subject, &env).await;
    await_consumed(subject, &stage).await?;
    if !stop(stage).await {
        return Err("the stage did not exit cleanly on SIGTERM".into());
    }
    // Everything the stage committed had taken effect before it said so.
    let committed = world.committed(subject).await;
    let before: Vec<Sent> = sent
        .iter()
        .filter(|s| committed.get(&s.partition).is_some_and(|c| s.offset < *c))
        .cloned()
        .collect();
    // The stage has exited, so nothing writes effects any more: reading for a while only gives
    // the reader (a fresh consumer on a busy machine) time to see what is already there.
    if let Err(missing) = await_all(subject, &world, &before, 15).await {
        return Err(format!("committed records had not taken effect: {missing}"));
    }
    let again = world.start(subject, &env).await;
    let tally = await_all(subject, &world, &sent, 90).await;
    stop(again).await;
    let verdict = exactness(subject, &tally?)?;
    Ok(format!(
        "{}/{} committed, all in effect; {verdict}",
        before.len(),
        sent.len()
    ))
}

async fn backpressure(subject: &dyn Subject, kit: &Arc<Kit>) -> Result<String, String> {
    let missing = match subject.stall() {
        Stall::MissingTopic(topic) => Some(topic),
        Stall::StoreDown | Stall::SlowModel => None,
    };
    let world = World::new(kit, missing).await;
    let mut env = subject.env(&world, Property::Backpressure);
    let proxy = match subject.stall() {
        Stall::StoreDown => {
            let proxy = StoreProxy::start(&clickhouse_url()).await;
            env.push(("SLUICE_CLICKHOUSE__URL".into(), proxy.url()));
            Some(proxy)
        }
        Stall::MissingTopic(_) | Stall::SlowModel => None,
    };
    let per_key = subject.records_per_key(Property::Backpressure);
    let sent = world.produce_keys(subject, 1, per_key).await;
    let stage = world.start(subject, &env).await;
    let paused = format!("sluice_consumer_paused{{stage=\"{}\"}}", subject.stage());
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&stage.ops_url, &paused).await < 1.0 {
        if Instant::now() >= deadline {
            stop(stage).await;
            return Err("the stage never paused its partitions".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (A reader subscribed to a topic that does not exist yet would not see it appear.)
    let waiting = match missing {
        Some(_) => sent.len(),
        None => tally(&sent, &subject.effects(&world).await).missing,
    };
    let rebalances = format!(
        "sluice_rebalances_total{{group=\"{}.{}\"}}",
        world.prefix,
        subject.stage()
    );
    let rebalances_paused = metric(&stage.ops_url, &rebalances).await;
    // Downstream recovers.
    if let Some(topic) = missing {
        world.create_topic(topic).await;
    }
    if let Some(proxy) = &proxy {
        proxy.set_up(true);
    }
    let tally = await_all(subject, &world, &sent, 120).await;
    let rebalanced = metric(&stage.ops_url, &rebalances).await > rebalances_paused;
    stop(stage).await;
    let tally = tally?;
    if rebalanced {
        return Err("the stage left its group while paused".into());
    }
    if matches!(subject.order(), Order::PerKey) && !tally.out_of_order.is_empty() {
        return Err(format!("keys out of order: {:?}", tally.out_of_order));
    }
    let verdict = exactness(subject, &tally)?;
    Ok(format!(
        "paused with {waiting}/{} waiting; {verdict}",
        sent.len()
    ))
}

/// A TCP proxy in front of a store that the kit turns off and on: while down it accepts and
/// drops every connection (and cuts the open ones), as a store that went away would.
pub struct StoreProxy {
    port: u16,
    up: Arc<AtomicBool>,
    changed: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StoreProxy {
    /// A proxy to `target` (an `http://host:port` URL), down.
    async fn start(target: &str) -> Self {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(false));
        let (changed, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let up = up.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let (target, mut watch) = (target.clone(), watch.clone());
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = watch.wait_for(|up| !up) => {}
                        }
                    });
                }
            }
        });
        Self {
            port,
            up,
            changed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        let _ = self.changed.send(up);
    }
}

impl Drop for StoreProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_cell(subject: Arc<dyn Subject>, property: Property, kit: Arc<Kit>) -> Outcome {
    if property == Property::Order {
        if let Order::NotApplicable(why) = subject.order() {
            return Outcome::NotApplicable(why);
        }
    }
    let task = tokio::spawn(async move {
        let subject = subject.as_ref();
        match property {
            Property::Order => order(subject, &kit).await,
            Property::Poison => poison(subject, &kit).await,
            Property::Kill => kill(subject, &kit).await,
            Property::Shutdown => shutdown(subject, &kit).await,
            Property::Backpressure => backpressure(subject, &kit).await,
        }
    });
    match task.await {
        Ok(Ok(note)) => Outcome::Pass(note),
        Ok(Err(failure)) => Outcome::Fail(failure),
        Err(e) => Outcome::Fail(format!("panicked: {e}")),
    }
}

fn render(rows: &[(&'static str, Vec<Outcome>)]) -> String {
    let mut out =
        String::from("\nconformance: stage × property (✓ holds, — does not apply, ✗ fails)\n\n");
    out.push_str(&format!("| {:<22} |", "stage"));
    for property in Property::ALL {
        out.push_str(&format!(" {} |", property.title()));
    }
    out.push('\n');
    out.push_str(&format!("|{}|", "-".repeat(24)));
    for _ in Property::ALL {
        out.push_str("---|");
    }
    out.push('\n');
    for (name, outcomes) in rows {
        out.push_str(&format!("| {name:<22} |"));
        for outcome in outcomes {
            let cell = match outcome {
                Outcome::Pass(note) => format!("✓ {note}"),
                Outcome::NotApplicable(why) => format!("— {why}"),
                Outcome::Fail(why) => format!("✗ {why}"),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_stage_conforms() {
    let kit = Arc::new(Kit::start().await);
    let subjects = subjects();
    // Each stage's properties run one after another; the stages run side by side.
    let mut chains = Vec::new();
    for subject in subjects {
        let kit = kit.clone();
        chains.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for property in Property::ALL {
                let started = Instant::now();
                let outcome = run_cell(subject.clone(), property, kit.clone()).await;
                eprintln!(
                    "conformance: {} / {} in {:.0?}",
                    subject.name(),
                    property.title(),
                    started.elapsed()
                );
                outcomes.push(outcome);
            }
            (subject.name(), outcomes)
        }));
    }
    let mut rows = Vec::new();
    for chain in chains {
        rows.push(chain.await.unwrap());
    }
    let table = render(&rows);
    println!("{table}");
    let failed = rows
        .iter()
        .flat_map(|(_, outcomes)| outcomes)
        .any(|o| matches!(o, Outcome::Fail(_)));
    assert!(!failed, "{table}");
}
