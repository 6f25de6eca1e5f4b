//! Streaming SQL pipelines on the real broker and ClickHouse: per-tenant per-minute rates and
//! per-model latency percentiles are exact, through a `kill -9` while windows are held; late
//! records within the lateness update their window, later ones are counted and left out.

use std::time::{Duration, Instant};

use rdkafka::{
    message::Message,
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use serde_json::Value;
use sluice_schemas::{Codec, Record, RegistryClient, UsageEvent, WindowResult};

use crate::harness::*;

/// Writes usage events straight to the stage's input topic, keyed by tenant as the
/// orchestrator does.
struct UsageWriter {
    codec: Codec,
    producer: FutureProducer,
    topic: String,
}

impl UsageWriter {
    async fn new(sluice: &Sluice) -> Self {
        let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
        codec.register::<UsageEvent>().await.unwrap();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .unwrap();
        Self {
            codec,
            producer,
            topic: sluice.topic("usage"),
        }
    }

    async fn send(
        &self,
        tenant: &str,
        n: usize,
        at_ms: i64,
        input: i64,
        output: i64,
        latency: i64,
    ) {
        let event = UsageEvent {
            input_tokens: input,
            output_tokens: output,
            occurred_at_ms: at_ms,
            latency_ms: Some(latency),
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
            ..usage_event(format!("{tenant}-{n}"), tenant)
        };
        let bytes = self.codec.encode(&event).unwrap();
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(tenant).payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

#[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
struct TenantMinute {
    minute: u32,
    records: u64,
    requests: u64,
    input_tokens: i64,
    output_tokens: i64,
    cost_micros: f64,
}

async fn tenant_minutes(tenant: &str) -> Vec<TenantMinute> {
    clickhouse()
        .query(
            "SELECT toUInt32(toUnixTimestamp(window_start)) AS minute, sum(records) AS records, \
                    sum(requests) AS requests, sum(input_tokens) AS input_tokens, \
                    sum(output_tokens) AS output_tokens, sum(cost_micros) AS cost_micros \
             FROM tenant_usage_1m FINAL WHERE tenant_id = ? GROUP BY minute ORDER BY minute",
        )
        .bind(tenant)
        .fetch_all()
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn per_minute_rates_are_exact_through_a_crash_while_windows_are_held() {
    let mut sluice = Sluice::start();
    let writer = UsageWriter::new(&sluice).await;
    let tenant = unique("sql-tenant-");
    // Two whole minutes, ten minutes ago: five calls in the first, three in the second, the
    // second minute's calls early in it, so the first window is emitted but still held (within
    // its lateness) when the process dies.
    let base = (sluice_pipelines::now_ms() / 60_000 - 10) * 60_000;
    let mut n = 0;
    for i in 0..5 {
        writer
            .send(&tenant, n, base + 1_000 * i, 10, 20 + i, 100 + 10 * i)
            .await;
        n += 1;
    }
    for i in 0..3 {
        writer
            .send(&tenant, n, base + 60_000 + 1_000 * i, 1_000, 0, 50)
            .await;
        n += 1;
    }
    let consumed = r#"sluice_records_in_total{stage="sql.tenant_usage_1m"}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&sluice.url, consumed).await < 8.0 {
        assert!(
            Instant::now() < deadline,
            "the SQL stage did not read the events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Killed before the second window goes idle (5 s): the first window's records are held.
    let killed_at = Instant::now();
    sluice.kill();
    sluice.restart_after_crash(killed_at).await;

    let minute = |offset: i64| u32::try_from((base + offset) / 1000).unwrap();
    let expected = vec![
        TenantMinute {
            minute: minute(0),
            records: 5,
            requests: 5,
            input_tokens: 50,
            output_tokens: 110,
            // sim-small: 0.1 $ per million input tokens, 0.4 $ per million output tokens.
            cost_micros: 50.0 * 0.1 + 110.0 * 0.4,
        },
        TenantMinute {
            minute: minute(60_000),
            records: 3,
            requests: 3,
            input_tokens: 3_000,
            output_tokens: 0,
            cost_micros: 300.0,
        },
    ];
    let rows = eventually(60, "both minutes in tenant_usage_1m", || async {
        let rows = tenant_minutes(&tenant).await;
        (rows.len() == 2 && rows[1].records == 3).then_some(rows)
    })
    .await;
    assert_eq!(
        rows, expected,
        "exact, nothing counted twice after the crash"
    );

    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Latency {
        records: u64,
        p50_ms: f64,
        max_ms: i64,
    }
    let latency: Latency = clickhouse()
        .query(
            "SELECT sum(records) AS records, max(p50_ms) AS p50_ms, max(max_ms) AS max_ms \
             FROM model_latency_1m FINAL WHERE window_start = toDateTime(?) AND model = 'sim-small'",
        )
        .bind(minute(0))
        .fetch_one()
        .await
        .unwrap();
    assert!(latency.records >= 5, "{latency:?}");
    assert!(latency.max_ms >= 140 && latency.p50_ms > 0.0, "{latency:?}");

    // Long after both windows closed: counted as late, the rows stay as they were.
    let late = r#"sluice_late_records_total{stage="sql.tenant_usage_1m"}"#;
    let before = metric(&sluice.url, late).await;
    writer.send(&tenant, n, base + 30_000, 7, 7, 7).await;
    eventually(30, "the late record counted", || async {
        (metric(&sluice.url, late).await > before).then_some(())
    })
    .await;
    assert_eq!(tenant_minutes(&tenant).await, expected);
}

#[tokio::test]
async fn a_configured_pipeline_updates_windows_with_late_records_and_writes_to_a_topic() {
    let prefix = unique("t");
    let config = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(
        &config,
        r#"
[sql]
lanes = 2

[[sql.pipelines]]
name = "late_test"
source = "usage"
sql = """
SELECT window_start, window_end, tenant_id, count(*) AS records, sum(output_tokens) AS output_tokens
FROM usage GROUP BY hop(interval '1 minute', interval '1 minute'), tenant_id
"""
event_time = "occurred_at_ms"
max_out_of_orderness = "1 second"
allowed_lateness = "1 hour"
idle_after = "1 hour"
output = { topic = "late-results" }
"#,
    )
    .unwrap();
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_CONFIG".into(), config.display().to_string())],
    );
    let writer = UsageWriter::new(&sluice).await;
    let results = topic_reader(&sluice.topic("late-results"));
    let tenant = unique("late-");
    let base = (sluice_pipelines::now_ms() / 60_000 - 30) * 60_000;

    writer.send(&tenant, 0, base + 10_000, 1, 1, 1).await;
    // The next minute's record moves the watermark past the first window: emitted with 1.
    writer.send(&tenant, 1, base + 70_000, 1, 10, 1).await;
    let read = |records: i64| {
        let tenant = tenant.clone();
        move |message: &rdkafka::message::BorrowedMessage<'_>| {
            let bytes = message.payload()?;
            let (_, body) = sluice_schemas::wire::unframe(bytes).ok()?;
            let schema = WindowResult::schema().ok()?;
            let result: WindowResult = sluice_schemas::codec::decode_body(schema, body).ok()?;
            let row: Value = serde_json::from_str(&result.row_json).ok()?;
            (row["tenant_id"] == tenant.as_str()
                && result.window_start_ms == base
                && result.records == records)
                .then_some((result, row))
        }
    };
    let (first, row) = find_record(&results, 60, read(1)).await;
    assert_eq!(
        (first.window_end_ms, row["output_tokens"].as_i64()),
        (base + 60_000, Some(1))
    );

    // Late, but within the hour of lateness: the window is emitted again, complete.
    writer.send(&tenant, 2, base + 20_000, 1, 100, 1).await;
    let (_, row) = find_record(&results, 60, read(2)).await;
    assert_eq!(row["output_tokens"].as_i64(), Some(101));

    // Beyond the lateness: counted, not added.
    let late = r#"sluice_late_records_total{stage="sql.late_test"}"#;
    writer
        .send(&tenant, 3, base - 3 * 3_600_000, 1, 1_000, 1)
        .await;
    eventually(30, "the late record counted", || async {
        (metric(&sluice.url, late).await >= 1.0).then_some(())
    })
    .await;
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn a_pipeline_whose_store_is_down_stops_taking_records_instead_of_holding_them() {
    let prefix = unique("t");
    let dead_clickhouse = format!("http://127.0.0.1:{}", free_port());
    let sluice = Sluice::start_with(
        &prefix,
        vec![
            ("SLUICE_CLICKHOUSE__URL".into(), dead_clickhouse),
            // A window keeps a partial state per group and folded batch: this tenant's open
            // windows pass two rows as soon as the first of them cannot be written.
            ("SLUICE_SQL__MAX_HELD_ROWS".into(), "2".into()),
            ("SLUICE_SQL__LANES".into(), "1".into()),
        ],
    );
    let writer = UsageWriter::new(&sluice).await;
    let tenant = unique("outage-");
    let total = 20_000i64;
    // Ten minutes of event time, in order: the first window closes (and fails to be written)
    // after about 2,000 records.
    let base = (sluice_pipelines::now_ms() / 60_000 - 30) * 60_000;
    let events = (0..total).map(|i| {
        let event = UsageEvent {
            occurred_at_ms: base + i * 30,
            latency_ms: Some(5),
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
            ..usage_event(format!("{tenant}-{i}"), &tenant)
        };
        (tenant.clone(), writer.codec.encode(&event).unwrap())
    });
    produce_all(&writer.topic, events).await;
    let consumed = r#"sluice_records_in_total{stage="sql.tenant_usage_1m"}"#;
    // Wait until the stage stops taking records (the same count for three seconds).
    let (mut last, mut steady) = (-1.0, 0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let later = loop {
        let now = metric(&sluice.url, consumed).await;
        steady = if now == last && now > 0.0 {
            steady + 1
        } else {
            0
        };
        if steady >= 3 {
            break now;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "the SQL stage never settled ({now} records)"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let waits = r#"sluice_lane_full_waits_total{stage="sql.tenant_usage_1m"}"#;
    assert!(
        metric(&sluice.url, waits).await >= 1.0,
        "the consumer waited on the full lane"
    );
    assert!(
        later < (total / 2) as f64,
        "{later} of {total} records taken while the store was down"
    );
}

#[tokio::test]
async fn sql_pipelines_run_as_their_own_process() {
    // `sluice up` without SQL; `sluice run sql` alone computes the windows.
    let prefix = unique("t");
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_SQL__ENABLED".to_owned(), "false".to_owned())],
    );
    let part = sluice.spawn_part(&["run", "sql"], &[]);
    wait_ready(&part.ops_url);
    let writer = UsageWriter::new(&sluice).await;
    let tenant = unique("sql-alone-");
    // Not the minute the crash test writes: `model_latency_1m` rows are per model, so two
    // tests' rows of one minute and partition would fold into one.
    let base = (sluice_pipelines::now_ms() / 60_000 - 20) * 60_000;
    for n in 0..3 {
        writer
            .send(&tenant, n, base + 1_000 * n as i64, 10, 10, 100)
            .await;
    }
    let rows = eventually(60, "the minute in tenant_usage_1m", || async {
        let rows = tenant_minutes(&tenant).await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(
        (rows.len(), rows[0].records, rows[0].input_tokens),
        (1, 3, 30)
    );
    let consumed = r#"sluice_records_in_total{stage="sql.tenant_usage_1m"}"#;
    assert!(metric(&part.ops_url, consumed).await >= 3.0);
    assert_eq!(metric(&sluice.url, consumed).await, 0.0, "up runs no SQL");
}
