//! Backpressure. When a sink's store is down, the sink stops taking records instead of
//! buffering them: memory stays bounded while lag grows, and once the store is back every
//! record is written exactly once. When an operator stalls, its stage pauses its partitions,
//! stays in its consumer group, and resumes where it stopped. When the edge is at capacity, it
//! turns callers away at once with 503 and `Retry-After` rather than queueing them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use sluice_pipelines::{
    config::Wiring,
    kafka,
    metrics::Metrics,
    ops::Readiness,
    runtime::{self, StageDeps, StageSpec},
    BatchError, Emitter, Input, KafkaConfig, Operator,
};
use sluice_schemas::{Codec, RegistryClient, UsageEvent};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

#[tokio::test]
async fn a_stalled_sink_bounds_memory_and_loses_nothing() {
    let prefix = unique("t");
    // ClickHouse "down": nothing listens there.
    let dead_clickhouse = format!("http://127.0.0.1:{}", free_port());
    // The SQL pipelines read the same topic and hold open windows' rows in memory by design;
    // this test is about the sink, so they do not run here.
    let mut sluice = Sluice::start_with(
        &prefix,
        vec![
            ("SLUICE_CLICKHOUSE__URL".to_owned(), dead_clickhouse),
            ("SLUICE_SQL__ENABLED".to_owned(), "false".to_owned()),
        ],
    );
    let baseline_kib = sluice.rss_kib();

    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    codec.register::<UsageEvent>().await.unwrap();
    let tenant = unique("stall-");
    let usage_topic = sluice.topic("usage");
    let total = 80_000u64;
    let padding = "x".repeat(700); // ~800-byte records: about 64 MB in all
    let events = (0..total).map(|i| {
        let event = UsageEvent {
            model: format!("sim-small{padding}"),
            ..usage_event(format!("{tenant}-{i}"), &tenant)
        };
        (tenant.clone(), codec.encode(&event).unwrap())
    });
    produce_all(&usage_topic, events).await;

    // The sink cannot write, so the lag shows (almost) everything...
    let group = format!("{prefix}.metering");
    let lag_series = |p: i32| {
        format!(
            "sluice_consumer_lag{{group=\"{group}\",partition=\"{p}\",topic=\"{usage_topic}\"}}"
        )
    };
    let lag = eventually(30, "the metering lag to show the backlog", || async {
        let mut lag = 0.0;
        for p in 0..3 {
            lag += metric(&sluice.url, &lag_series(p)).await;
        }
        (lag >= (total - 2_000) as f64).then_some(lag)
    })
    .await;
    assert!(lag <= total as f64);
    // ...while memory stays bounded: well under the 60 MB waiting on the topic (prefetch is
    // for sinks capped at 16 MiB; with librdkafka's default of 64 MiB it grew by about 90 MB).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_kib = sluice.rss_kib().saturating_sub(baseline_kib);
    eprintln!("memory grew by {grown_kib} KiB with {lag} records waiting");
    assert!(
        grown_kib < 48 * 1024,
        "memory grew by {grown_kib} KiB while the sink was stalled"
    );
    assert!(metric(&sluice.url, "sluice_retries_total{stage=\"metering\"}").await >= 1.0);
    // The sink paused its partitions rather than only stopping its reads.
    assert_eq!(
        metric(&sluice.url, "sluice_consumer_paused{stage=\"metering\"}").await,
        1.0
    );
    assert!(
        metric(
            &sluice.url,
            "sluice_consumer_pauses_total{stage=\"metering\"}"
        )
        .await
            >= 1.0
    );
    // The usage API says ClickHouse is unavailable, in OpenAI's error shape.
    let key = create_tenant(&prefix).key;
    let (status, body) = get_json(&sluice.v1("/usage"), &key).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("service_unavailable")),
        "{body}"
    );

    // ClickHouse is back (the process restarts with the right address): every event is written once.
    sluice.extra_env.clear();
    sluice.restart();
    let rows: u64 = eventually(240, "the backlog to drain into ClickHouse", || async {
        let n = facts_of(&tenant).await?;
        (n >= total).then_some(n)
    })
    .await;
    assert_eq!(rows, total);
}

/// Records which request ids it was handed, in order, and the positions stored for commit;
/// stalls on the ids in `stalls`.
#[derive(Clone)]
struct StallingRecorder {
    seen: Arc<Mutex<Vec<String>>>,
    stalls: Arc<Mutex<HashMap<String, Duration>>>,
    committed: Arc<Mutex<HashMap<i32, i64>>>,
}

#[async_trait]
impl Operator for StallingRecorder {
    type Input = UsageEvent;

    async fn process(
        &mut self,
        batch: &[Input<UsageEvent>],
        _out: &mut Emitter,
    ) -> Result<(), BatchError> {
        for input in batch {
            let stall = self.stalls.lock().unwrap().remove(&input.record.request_id);
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
            self.seen
                .lock()
                .unwrap()
                .push(input.record.request_id.clone());
        }
        Ok(())
    }

    const WANTS_COMMITS: bool = true;

    fn on_commit(&mut self, positions: &[(i32, i64)]) {
        self.committed
            .lock()
            .unwrap()
            .extend(positions.iter().copied());
    }
}

#[tokio::test]
async fn a_stalled_operator_pauses_its_partitions_stays_in_its_group_and_resumes_in_order() {
    let prefix = unique("t");
    // Only for its schema registry.
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_SQL__ENABLED".to_owned(), "false".to_owned())],
    );
    let mut kafka = KafkaConfig {
        bootstrap: bootstrap(),
        partitions: 3,
        ..KafkaConfig::default()
    };
    // The shortest interval librdkafka allows (the session timeout, 10 s): a consumer that
    // stopped polling during the 12 s stall below would be evicted from its group.
    kafka
        .client_properties
        .insert("max.poll.interval.ms".into(), "10000".into());
    let input = format!("{prefix}.stalling");
    let dlq = format!("{prefix}.stalling-dlq");
    kafka::ensure_topics(&kafka, &[&input, &dlq]).await.unwrap();
    let codec = Arc::new(Codec::new(
        RegistryClient::new(&sluice.registry_url).unwrap(),
    ));
    codec.register::<UsageEvent>().await.unwrap();

    let keys = 6;
    let per_key = 60;
    // Produced in batches, so a pause lands inside one and the resume fetches from its middle.
    let events = (0..per_key).flat_map(|seq| (0..keys).map(move |k| (seq, k)));
    let records = events.map(|(seq, k)| {
        let event = usage_event(format!("k{k}-{seq:03}"), &format!("k{k}"));
        (format!("k{k}"), codec.encode(&event).unwrap())
    });
    produce_all(&input, records).await;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let stalls = Arc::new(Mutex::new(HashMap::from([
        ("k0-005".to_owned(), Duration::from_secs(12)),
        ("k3-030".to_owned(), Duration::from_secs(3)),
    ])));
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let operator = StallingRecorder {
        seen: seen.clone(),
        stalls,
        committed: committed.clone(),
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let deps = StageDeps {
        producers: sluice_pipelines::kafka::Producers::new(&kafka).unwrap(),
        kafka,
        codec,
        metrics: metrics.clone(),
        readiness: Readiness::default(),
    };
    let group = format!("{prefix}.stalling");
    let mut spec = StageSpec::new(Wiring::new("stalling", &group, &input, &dlq));
    spec.lanes = 2;
    spec.lane_capacity = 4;
    spec.max_batch = 4;
    let cancel = CancellationToken::new();
    let stage = tokio::spawn(runtime::run_operator(
        move |_| operator.clone(),
        spec,
        deps,
        cancel.clone(),
    ));

    let total = keys * per_key;
    let rebalances = metrics.rebalances.with_label_values(&[&group]);
    eventually(30, "the first record", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let rebalances_at_start = rebalances.get();
    eventually(90, "every record to be handed over", || async {
        (seen.lock().unwrap().len() >= total).then_some(())
    })
    .await;
    // The commit hook sees the stored positions reach the end of every partition (the topic
    // is fresh, so its offsets count its records).
    eventually(30, "positions stored past every record", || async {
        let stored: i64 = committed.lock().unwrap().values().sum();
        (stored == total as i64).then_some(())
    })
    .await;
    // No rebalance came between the first record and the last (stopping revokes, so this is
    // checked before).
    assert_eq!(
        rebalances.get(),
        rebalances_at_start,
        "the stage stayed in its group through the stall"
    );
    cancel.cancel();
    stage.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), total, "each record was handed over once");
    for k in 0..keys {
        let of_key: Vec<&String> = seen
            .iter()
            .filter(|id| id.starts_with(&format!("k{k}-")))
            .collect();
        let expected: Vec<String> = (0..per_key).map(|seq| format!("k{k}-{seq:03}")).collect();
        assert_eq!(
            of_key,
            expected.iter().collect::<Vec<_>>(),
            "key k{k} kept its order"
        );
    }
    let pauses = metrics
        .consumer_pauses
        .with_label_values(&["stalling"])
        .get();
    assert!(pauses >= 2, "both stalls paused the partitions ({pauses})");
    assert_eq!(
        metrics
            .consumer_paused
            .with_label_values(&["stalling"])
            .get(),
        0,
        "resumed"
    );
}

#[tokio::test]
async fn an_edge_at_capacity_sheds_with_503_and_retry_after_and_serves_again_after() {
    let prefix = unique("t");
    let mut env = sim_speed(40.0);
    env.push(("SLUICE_EDGE__MAX_IN_FLIGHT".to_owned(), "1".to_owned()));
    let sluice = Sluice::start_with(&prefix, env);
    let tenant = create_tenant(&sluice.prefix);
    // About 1.5 s of reply holds the only place.
    let slow = spawn_chat(
        &sluice,
        &tenant.key,
        "hold the place".into(),
        60,
        Duration::ZERO,
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let body = serde_json::json!({"model": "auto", "max_tokens": 4,
        "messages": [{"role": "user", "content": "one more"}]});
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "overloaded", "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    let (status, reply) = slow.await.unwrap();
    assert_eq!(status, 200, "{reply}");
    assert!(metric(&sluice.url, "sluice_edge_shed_total").await >= 1.0);
    // The place is free again once the first reply is complete.
    let (status, reply) = chat(&sluice, &tenant.key, body).await;
    assert_eq!(status, 200, "{reply}");
}

/// A sink whose writes span batches, kept in memory, that fails on command: once, a write that
/// joins an open write, and once, the end of an open write holding more than one batch (each
/// loses the open write). It skips ids already in its open write (a batch given to it twice in
/// one write) but not ids already stored, so a record the loop writes again is stored twice.
struct FlakySink {
    stored: Arc<Mutex<Vec<String>>>,
    open: Vec<String>,
    /// Batches in the open write.
    open_batches: usize,
    write_failed: bool,
    end_failed: bool,
}

#[async_trait]
impl sluice_pipelines::BatchSink for FlakySink {
    type Input = UsageEvent;
    type Delivery = runtime::EffectivelyOnce;
    type Check = sluice_pipelines::NoCheck;

    fn check(&self) -> sluice_pipelines::NoCheck {
        sluice_pipelines::NoCheck
    }

    async fn write(
        &mut self,
        batch: &[UsageEvent],
        _checked: Option<()>,
    ) -> Result<usize, sluice_pipelines::ProcessError> {
        if self.open_batches > 0 && !self.write_failed {
            self.write_failed = true;
            self.abandon();
            return Err(sluice_pipelines::ProcessError::Retriable(
                "write failed on command".into(),
            ));
        }
        let mut new = 0;
        for event in batch {
            if !self.open.contains(&event.request_id) {
                self.open.push(event.request_id.clone());
                new += 1;
            }
        }
        self.open_batches += 1;
        Ok(new)
    }

    async fn end(&mut self) -> Result<(), sluice_pipelines::ProcessError> {
        if self.open_batches > 1 && !self.end_failed {
            self.end_failed = true;
            self.abandon();
            return Err(sluice_pipelines::ProcessError::Retriable(
                "end failed on command".into(),
            ));
        }
        self.stored.lock().unwrap().append(&mut self.open);
        self.open_batches = 0;
        Ok(())
    }

    fn abandon(&mut self) {
        self.open.clear();
        self.open_batches = 0;
    }
}

#[tokio::test]
async fn a_write_spanning_batches_that_fails_is_read_again_and_stores_each_record_once() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let prefix = unique("t");
    // Only for its schema registry.
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_SQL__ENABLED".to_owned(), "false".to_owned())],
    );
    let kafka = KafkaConfig {
        bootstrap: bootstrap(),
        partitions: 3,
        ..KafkaConfig::default()
    };
    let input = format!("{prefix}.spanning");
    let dlq = format!("{prefix}.spanning-dlq");
    kafka::ensure_topics(&kafka, &[&input, &dlq]).await.unwrap();
    let codec = Arc::new(Codec::new(
        RegistryClient::new(&sluice.registry_url).unwrap(),
    ));
    codec.register::<UsageEvent>().await.unwrap();
    let total = 3_000;
    let records = (0..total).map(|i| {
        let key = format!("k{}", i % 7);
        let event = usage_event(format!("r{i:05}"), &key);
        (key, codec.encode(&event).unwrap())
    });
    produce_all(&input, records).await;

    let stored = Arc::new(Mutex::new(Vec::new()));
    let sink = FlakySink {
        stored: stored.clone(),
        open: Vec::new(),
        open_batches: 0,
        write_failed: false,
        end_failed: false,
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let deps = StageDeps {
        producers: sluice_pipelines::kafka::Producers::new(&kafka).unwrap(),
        kafka: kafka.clone(),
        codec,
        metrics: metrics.clone(),
        readiness: Readiness::default(),
    };
    let group = format!("{prefix}.spanning");
    let mut spec =
        sluice_pipelines::sink::SinkSpec::new(Wiring::new("spanning", &group, &input, &dlq));
    spec.max_batch = 100;
    spec.linger = Duration::from_millis(20);
    spec.max_write_records = 1_000;
    spec.max_write_age = Duration::from_secs(5);
    let cancel = CancellationToken::new();
    let stage = tokio::spawn(sluice_pipelines::sink::run_sink(
        sink,
        spec,
        deps,
        cancel.clone(),
    ));
    eventually(60, "every record stored", || async {
        (stored.lock().unwrap().len() >= total).then_some(())
    })
    .await;
    cancel.cancel();
    stage.await.unwrap().unwrap();

    let stored = stored.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(distinct.len(), total, "every record stored");
    assert_eq!(stored.len(), total, "none stored twice");
    assert!(
        metrics.retries.with_label_values(&["spanning"]).get() >= 2,
        "both failures happened"
    );
    // The offsets committed cover every record: the lost writes' records were read again
    // and nothing after them was committed past them.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition(&input, p);
    }
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .unwrap();
    let sum: i64 = committed
        .elements()
        .iter()
        .filter_map(|e| e.offset().to_raw())
        .sum();
    assert_eq!(sum, total as i64);
}
