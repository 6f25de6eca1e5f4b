//! `sluice bench window`: records/s through the per-tenant per-minute aggregate
//! (`tenant_usage_1m`, written to ClickHouse), against a raw librdkafka consume of the same
//! records on the same broker in the same run.
//!
//! The records are usage events of `tenants` tenants (bench-only ids), their event times spread
//! over `minutes` minutes in order. Each round uses fresh consumer groups and starts its clock at
//! the first record; the SQL path is done when every record was consumed and folded into its
//! window and every window before the last minute was written.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::consumer::Consumer;
use sluice_pipelines::{
    bench::{first_record, progress, ratio, summarize},
    config::KafkaConfig,
    kafka,
    metrics::Metrics,
    ops::Readiness,
    runtime::{self, StageDeps},
    Error, Result,
};
use sluice_schemas::{Codec, UsageEvent};
use tokio_util::sync::CancellationToken;

use crate::{builtin, ClickHouseTarget, Output, OutputConfig, Pipeline, SqlOperator};

/// What to run.
#[derive(Debug, Clone)]
pub struct WindowOptions {
    pub records: u64,
    pub tenants: u64,
    pub minutes: u64,
    pub rounds: usize,
    /// Lanes of the SQL stage.
    pub lanes: usize,
}

/// The measurements (medians, and each path's slowest and fastest round).
#[derive(Debug, Clone)]
pub struct WindowReport {
    pub records: u64,
    pub raw_per_sec: f64,
    pub raw_range: (f64, f64),
    pub sql_per_sec: f64,
    pub sql_range: (f64, f64),
    /// Window rows the last round wrote.
    pub rows: u64,
}

impl WindowReport {
    /// SQL throughput over raw consume throughput.
    pub fn ratio(&self) -> f64 {
        ratio(self.sql_per_sec, self.raw_per_sec)
    }
}

/// Runs the benchmark on a fresh topic (`bench-<id>.usage`); rows go to ClickHouse table
/// `tenant_usage_1m` under tenant ids `bench-<id>-<n>`.
pub async fn window(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    clickhouse: ClickHouseTarget,
    options: &WindowOptions,
) -> Result<WindowReport> {
    codec.register::<UsageEvent>().await?;
    let id = format!("bench-{}", sluice_pipelines::now_ms());
    let input = format!("{id}.usage");
    let dlq = format!("{id}.dlq");
    kafka::ensure_topics(kafka, &[&input, &dlq]).await?;
    eprintln!("filling {input} with {} usage events...", options.records);
    fill(kafka, &codec, &input, &id, options).await?;
    let mut config = builtin::pipelines().remove(0);
    config.output = OutputConfig::Clickhouse(clickhouse.table.clone());
    let pipeline = Arc::new(Pipeline::compile::<UsageEvent>(&config).map_err(Error::Config)?);
    let (mut raws, mut sqls, mut rows) = (Vec::new(), Vec::new(), 0);
    for round in 1..=options.rounds.max(1) {
        eprintln!("round {round}: raw librdkafka consume...");
        let raw_rate = raw(kafka, &input, &format!("{id}.raw.{round}"), options.records).await?;
        eprintln!("round {round}: consume -> decode -> window -> DataFusion -> ClickHouse...");
        let (sql_rate, written) = sql(
            kafka,
            codec.clone(),
            &pipeline,
            &clickhouse,
            (&input, &dlq, &format!("{id}.sql.{round}")),
            options,
        )
        .await?;
        eprintln!("round {round}: raw {raw_rate:.0}/s, sql {sql_rate:.0}/s, {written} rows");
        raws.push(raw_rate);
        sqls.push(sql_rate);
        rows = written;
    }
    let (raw_per_sec, raw_range) = summarize(&mut raws);
    let (sql_per_sec, sql_range) = summarize(&mut sqls);
    Ok(WindowReport {
        records: options.records,
        raw_per_sec,
        raw_range,
        sql_per_sec,
        sql_range,
        rows,
    })
}

async fn fill(
    kafka: &KafkaConfig,
    codec: &Codec,
    topic: &str,
    id: &str,
    options: &WindowOptions,
) -> Result<()> {
    let span_ms = i64::try_from(options.minutes.max(1) * 60_000).unwrap_or(i64::MAX);
    let records = i64::try_from(options.records.max(1)).unwrap_or(i64::MAX);
    // Whole minutes, ending an hour ago.
    let base = (sluice_pipelines::now_ms() / 60_000 - 60) * 60_000 - span_ms;
    let events = (0..records).map(|i| {
        let tenant = format!("{id}-{}", i.unsigned_abs() % options.tenants.max(1));
        let event = UsageEvent {
            event_id: format!("{id}-{i}:0"),
            request_id: format!("{id}-{i}"),
            tenant_id: tenant.clone(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 100,
            output_tokens: 50,
            occurred_at_ms: base + i * span_ms / records,
            latency_ms: Some(20 + i % 200),
        };
        Ok((tenant, codec.encode(&event)?))
    });
    kafka::produce_all(kafka, topic, events).await
}

async fn raw(kafka: &KafkaConfig, input: &str, group: &str, total: u64) -> Result<f64> {
    let consumer = kafka::consumer(kafka, group, 100, None, None)?;
    consumer.subscribe(&[input])?;
    let mut started: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut done = 0u64;
    while done < total {
        let _message = consumer.recv().await?;
        let clock = *started.get_or_insert_with(Instant::now);
        done += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("raw", done, total, clock);
            last_report = Instant::now();
        }
    }
    let elapsed = started.map_or(f64::MAX, |s| s.elapsed().as_secs_f64());
    Ok(total as f64 / elapsed)
}

async fn sql(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    pipeline: &Arc<Pipeline>,
    clickhouse: &ClickHouseTarget,
    (input, dlq, group): (&str, &str, &str),
    options: &WindowOptions,
) -> Result<(f64, u64)> {
    let metrics = Arc::new(Metrics::new().map_err(|e| Error::Config(e.to_string()))?);
    let deps = StageDeps {
        kafka: kafka.clone(),
        codec,
        metrics: metrics.clone(),
        readiness: Readiness::default(),
    };
    let spec = crate::stage_spec(pipeline, "bench", group, input, dlq, options.lanes);
    let output = Arc::new(Output::clickhouse(clickhouse.clone()));
    let cancel = CancellationToken::new();
    let stage = tokio::spawn({
        let (pipeline, metrics) = (pipeline.clone(), metrics.clone());
        let make = move |_| {
            SqlOperator::<UsageEvent>::new(
                pipeline.clone(),
                output.clone(),
                None,
                &metrics,
                "bench",
            )
        };
        runtime::run_operator(make, spec, deps, cancel.clone())
    });
    let consumed = metrics.records_in.with_label_values(&["bench"]);
    let in_flight = metrics.in_flight.with_label_values(&["bench"]);
    let rows = metrics.window_rows.with_label_values(&["bench"]);
    let started = first_record(&consumed, &stage).await?;
    // Every tenant has a row for every minute but the last (closed when the partition idles).
    let expected_rows = options.tenants.min(options.records) * options.minutes.saturating_sub(1);
    let mut last_report = Instant::now();
    while consumed.get() < options.records || in_flight.get() > 0 || rows.get() < expected_rows {
        if stage.is_finished() {
            return Err(Error::Invalid(
                "the SQL stage stopped before finishing".into(),
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("sql", consumed.get(), options.records, started);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    cancel.cancel();
    stage
        .await
        .map_err(|e| Error::Invalid(format!("SQL stage task: {e}")))??;
    Ok((options.records as f64 / elapsed, rows.get()))
}
