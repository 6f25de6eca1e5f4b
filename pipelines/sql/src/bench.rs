//! `sluice bench window`: records/s through the per-tenant per-minute aggregate
//! (`tenant_usage_1m`, written to ClickHouse), against a raw librdkafka consume of the same
//! records on the same broker in the same run (the harness's limit).
//!
//! The records are usage events of `tenants` tenants (bench-only ids), their event times spread
//! over `minutes` minutes in order. Each round uses fresh consumer groups and starts its clock at
//! the first record; the SQL path is done when every record was consumed and folded into its
//! window and every window before the last minute was written.

use std::sync::Arc;

use sluice_pipelines::{
    bench::{
        fill, raw_path, stage_metrics, BenchError, Comparison, Result, StageUnderTest, Workspace,
    },
    config::{KafkaConfig, Wiring},
    Runnable,
};
use sluice_schemas::{Codec, UsageEvent};
use sluice_stores::ClickHouse;

use crate::{builtin, Output, OutputConfig, Pipeline, SqlOperator};

/// The table the benchmark writes.
pub const TABLE: &str = "tenant_usage_1m";

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

/// The measurements: raw consume (the limit) against the SQL stage.
#[derive(Debug, Clone)]
pub struct WindowReport {
    /// The run's workspace id: its topics were `<id>.*`, deleted when it ended.
    pub workspace: String,
    pub records: u64,
    pub comparison: Comparison,
    /// Window rows the last round wrote.
    pub rows: u64,
    /// The most rows the SQL stage's windows kept at once in the last round (partial states:
    /// a few per tenant and open window, however many records).
    pub peak_held_rows: i64,
}

/// Runs the benchmark on a fresh topic (`bench-<id>.usage`, deleted when it ends); rows go to
/// ClickHouse table `tenant_usage_1m` under tenant ids `bench-<id>-<n>`.
pub async fn window(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    clickhouse: ClickHouse,
    options: &WindowOptions,
) -> Result<WindowReport> {
    codec.register::<UsageEvent>().await?;
    let workspace = Workspace::create(kafka, &["usage", "dlq"]).await?;
    let (input, dlq) = (workspace.topic("usage"), workspace.topic("dlq"));
    eprintln!("filling {input} with {} usage events...", options.records);
    let work = async {
        fill(kafka, &codec, &input, events(workspace.id(), options)).await?;
        let mut config = builtin::pipelines().remove(0);
        config.output = OutputConfig::Clickhouse(TABLE.into());
        let pipeline =
            Pipeline::compile::<UsageEvent>(&config).map_err(|e| BenchError::Setup(e.into()))?;
        let pipeline = Arc::new(pipeline);
        let output = Arc::new(Output::clickhouse(clickhouse, TABLE));
        let rows = std::cell::Cell::new(0);
        let peak = std::cell::Cell::new(0);
        let comparison = Comparison::run(options.rounds, ("raw", "sql"), |round| {
            let (workspace, codec, pipeline, output) =
                (&workspace, codec.clone(), &pipeline, output.clone());
            let (input, dlq, rows, peak) = (&input, &dlq, &rows, &peak);
            async move {
                eprintln!("round {round}: raw librdkafka consume...");
                let group = workspace.group("raw", round);
                let raw = raw_path(kafka, input, None, &group, options.records).await?;
                eprintln!(
                    "round {round}: consume -> decode -> window -> DataFusion -> ClickHouse..."
                );
                let group = workspace.group("sql", round);
                let (rate, written, held) = sql(
                    kafka,
                    codec,
                    pipeline,
                    output,
                    (input, dlq, &group),
                    options,
                )
                .await?;
                eprintln!("round {round}: {written} rows, at most {held} rows held in windows");
                rows.set(written);
                peak.set(held);
                Ok((raw, rate))
            }
        })
        .await?;
        Ok(WindowReport {
            workspace: workspace.id().to_owned(),
            records: options.records,
            comparison,
            rows: rows.get(),
            peak_held_rows: peak.get(),
        })
    };
    workspace.run(kafka, work).await
}

/// Usage events of `options.tenants` tenants over `options.minutes` whole minutes ending an
/// hour ago, keyed by tenant.
fn events(id: &str, options: &WindowOptions) -> impl Iterator<Item = (String, UsageEvent)> {
    let span_ms = i64::try_from(options.minutes.max(1) * 60_000).unwrap_or(i64::MAX);
    let records = i64::try_from(options.records.max(1)).unwrap_or(i64::MAX);
    let base = (sluice_pipelines::now_ms() / 60_000 - 60) * 60_000 - span_ms;
    let (id, tenants) = (id.to_owned(), options.tenants.max(1));
    (0..records).map(move |i| {
        let tenant = format!("{id}-{}", i.unsigned_abs() % tenants);
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
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
        };
        (tenant, event)
    })
}

/// The SQL path: records/s, the rows written and the most rows its windows kept at once.
async fn sql(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    pipeline: &Arc<Pipeline>,
    output: Arc<Output>,
    (input, dlq, group): (&str, &str, &str),
    options: &WindowOptions,
) -> Result<(f64, u64, i64)> {
    let metrics = stage_metrics()?;
    let spec = crate::stage_spec(
        pipeline,
        Wiring::new("bench", group, input, dlq),
        options.lanes,
    );
    let make = {
        let (pipeline, metrics) = (pipeline.clone(), metrics.clone());
        move |_| {
            SqlOperator::<UsageEvent>::new(
                pipeline.clone(),
                output.clone(),
                None,
                &metrics,
                "bench",
            )
        }
    };
    let stage = StageUnderTest::start(
        "sql",
        kafka,
        codec,
        metrics,
        Runnable::operator(make, spec),
        None,
    )
    .await?;
    let in_flight = stage.metrics.in_flight.with_label_values(&["bench"]);
    let rows = stage.metrics.window_rows.with_label_values(&["bench"]);
    let held = stage.metrics.window_held_rows.with_label_values(&["bench"]);
    let peak = std::cell::Cell::new(0);
    // Every tenant has a row for every minute but the last (closed when the partition idles).
    let expected_rows = options.tenants.min(options.records) * options.minutes.saturating_sub(1);
    let seconds = stage
        .time(
            options.records,
            || stage.consumed(),
            || {
                peak.set(peak.get().max(held.get()));
                stage.consumed() >= options.records
                    && in_flight.get() == 0
                    && rows.get() >= expected_rows
            },
        )
        .await?;
    stage.stop().await?;
    Ok((options.records as f64 / seconds, rows.get(), peak.get()))
}
