//! `sluice bench sink`: how much of ClickHouse's own insert speed the metering sink keeps.
//!
//! The same N usage events go into `usage_events` two ways in the same run, each round under
//! fresh tenant ids so neither finds the other's rows:
//! - **clickhouse-client**: the rows as tab-separated text piped into one
//!   `INSERT … FORMAT TabSeparated` — how an operator loads rows in bulk by hand, the limit;
//! - **sink**: the events as Avro on a topic, read by the metering stage as it runs in
//!   production (batches, the already-stored check, the insert, offsets committed after it).
//!
//! It prints rows/s for both and, last, `ratio=<sink/clickhouse-client>`.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_pipelines::{
    bench::{fill, stage_metrics, BenchError, Comparison, Result, StageUnderTest, Workspace},
    config::{KafkaConfig, Wiring},
    sink::SinkSpec,
    Runnable,
};
use sluice_schemas::{Codec, UsageEvent};
use sluice_stores::{clickhouse::usage, ClickHouse};
use tokio::io::AsyncWriteExt;

use crate::UsageSink;

/// What to run.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Usage events per path and round.
    pub records: u64,
    /// Times each path runs (alternating); the median counts.
    pub rounds: usize,
    /// The sink's largest batch (as `stages.metering_max_batch`).
    pub max_batch: usize,
    /// The sink's largest batch in bytes (as `stages.metering_max_batch_bytes`).
    pub max_batch_bytes: usize,
    /// Most events one insert spans (as `stages.metering_max_insert_events`).
    pub max_insert_events: usize,
    /// Longest an insert stays open (as `stages.metering_max_insert_ms`).
    pub max_insert_age: Duration,
    /// How to reach ClickHouse's native port with `clickhouse-client`.
    pub client: ClientOptions,
}

/// Where `clickhouse-client` connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub program: String,
    pub host: String,
    /// ClickHouse's native (TCP) port.
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: String,
}

/// The measurements: clickhouse-client (the limit) against the sink.
#[derive(Debug, Clone)]
pub struct SinkReport {
    /// The run's workspace id: its topics were `<id>.*`, deleted when it ended.
    pub workspace: String,
    pub records: u64,
    pub comparison: Comparison,
}

/// Runs the benchmark.
pub async fn sink(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    clickhouse: ClickHouse,
    options: &SinkOptions,
) -> Result<SinkReport> {
    codec.register::<UsageEvent>().await?;
    let rounds = options.rounds.max(1);
    let suffixes: Vec<String> = (1..=rounds).map(|r| format!("usage-{r}")).collect();
    let mut names: Vec<&str> = suffixes.iter().map(String::as_str).collect();
    names.push("dlq");
    let workspace = Workspace::create(kafka, &names).await?;
    let work = async {
        for round in 1..=rounds {
            let topic = workspace.topic(&format!("usage-{round}"));
            eprintln!("filling {topic} with {} usage events...", options.records);
            let tenant = format!("{}-sink-{round}", workspace.id());
            fill(kafka, &codec, &topic, events(&tenant, options.records)).await?;
        }
        let comparison = Comparison::run(rounds, ("clickhouse-client", "sink"), |round| {
            let (workspace, codec, clickhouse) = (&workspace, codec.clone(), clickhouse.clone());
            async move {
                eprintln!("round {round}: clickhouse-client, one bulk insert...");
                let tenant = format!("{}-client-{round}", workspace.id());
                let limit = client_insert(&options.client, &tenant, options.records).await?;
                eprintln!("round {round}: consume -> decode -> batch -> ClickHouse -> commit...");
                let wiring = Wiring::new(
                    "bench-sink",
                    &workspace.group("sink", round),
                    &workspace.topic(&format!("usage-{round}")),
                    &workspace.topic("dlq"),
                );
                let rate = through_sink(kafka, codec, clickhouse, wiring, options).await?;
                Ok((limit, rate))
            }
        })
        .await?;
        Ok(SinkReport {
            workspace: workspace.id().to_owned(),
            records: options.records,
            comparison,
        })
    };
    workspace.run(kafka, work).await
}

/// `records` usage events of `tenant`, an hour ago, keyed by tenant.
fn events(tenant: &str, records: u64) -> impl Iterator<Item = (String, UsageEvent)> {
    let at = sluice_pipelines::now_ms() - 3_600_000;
    let tenant = tenant.to_owned();
    (0..records).map(move |i| {
        let event = UsageEvent {
            event_id: format!("{tenant}-{i}:0"),
            request_id: format!("{tenant}-{i}"),
            tenant_id: tenant.clone(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 100,
            output_tokens: 50,
            occurred_at_ms: at + i64::try_from(i % 60_000).unwrap_or(0),
            latency_ms: Some(20),
            // As the orchestrator writes them: who called, and the trace.
            key_id: Some("6f1c2a4e-0d4b-4c5e-9a7b-3e2f1d0c9b8a".to_owned()),
            user_id: None,
            cached_input_tokens: None,
            trace_id: Some(format!("{i:032x}")),
            outcome: None,
            billable: true,
        };
        (tenant.clone(), event)
    })
}

/// The same rows as tab-separated text, one line each.
fn tab_separated(tenant: &str, records: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(usize::try_from(records).unwrap_or(0) * 96);
    for (_, event) in events(tenant, records) {
        let row = usage::UsageRow::from(&event);
        body.extend_from_slice(
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                row.event_id,
                row.request_id,
                row.tenant_id,
                row.model,
                row.provider,
                row.input_tokens,
                row.output_tokens,
                row.occurred_at,
                row.occurred_at_ms,
                row.key_id,
                row.user_id,
                row.cached_input_tokens,
                row.trace_id
            )
            .as_bytes(),
        );
    }
    body
}

/// Rows/s of one `clickhouse-client` insert of `records` rows for `tenant`, from the start of
/// the process to its exit (the rows are made before the clock starts).
async fn client_insert(client: &ClientOptions, tenant: &str, records: u64) -> Result<f64> {
    let body = tab_separated(tenant, records);
    let query = format!(
        "INSERT INTO {} (event_id, request_id, tenant_id, model, provider, input_tokens, \
         output_tokens, occurred_at, occurred_at_ms, key_id, user_id, cached_input_tokens, \
         trace_id) FORMAT TabSeparated",
        usage::TABLE
    );
    let setup = |e: std::io::Error| BenchError::Setup(format!("{}: {e}", client.program).into());
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&client.program)
        .args(["--host", &client.host, "--port", &client.port.to_string()])
        .args(["--database", &client.database, "--user", &client.user])
        .args(["--password", &client.password, "--query", &query])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(setup)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body).await.map_err(setup)?;
    }
    let output = child.wait_with_output().await.map_err(setup)?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(BenchError::Setup(
            format!(
                "{} failed ({}): {}",
                client.program,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into(),
        ));
    }
    Ok(records as f64 / seconds.max(1e-9))
}

/// Rows/s of the metering stage writing one round's topic, from its first record until it has
/// written every row and the records are all consumed.
async fn through_sink(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    clickhouse: ClickHouse,
    wiring: Wiring,
    options: &SinkOptions,
) -> Result<f64> {
    let metrics = stage_metrics()?;
    let rows = metrics.sink_rows.with_label_values(&[&wiring.name]);
    let writes = metrics
        .sink_batch_seconds
        .with_label_values(&[&wiring.name]);
    let mut spec = SinkSpec::new(wiring);
    spec.max_batch = options.max_batch.max(1);
    spec.max_batch_bytes = options.max_batch_bytes.max(1);
    spec.max_write_records = options.max_insert_events.max(1);
    spec.max_write_age = options.max_insert_age;
    let stage = StageUnderTest::start(
        "sink",
        kafka,
        codec,
        metrics,
        Runnable::effectively_once_sink(UsageSink::new(clickhouse), spec),
        None,
    )
    .await?;
    let seconds = stage
        .time(
            options.records,
            || rows.get(),
            || rows.get() >= options.records,
        )
        .await?;
    stage.stop().await?;
    eprintln!(
        "  sink: {seconds:.2} s, of which {:.2} s in {} batch writes (the stored-id check and the rows sent)",
        writes.get_sample_sum(),
        writes.get_sample_count()
    );
    Ok(options.records as f64 / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_tab_separated_with_the_time_in_seconds_and_milliseconds() {
        let body = tab_separated("t", 2);
        let text = String::from_utf8(body).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let fields: Vec<&str> = lines[1].split('\t').collect();
        assert_eq!(fields.len(), 13);
        assert_eq!(&fields[..3], ["t-1:0", "t-1", "t"]);
        let seconds: i64 = fields[7].parse().unwrap();
        let millis: i64 = fields[8].parse().unwrap();
        assert_eq!(seconds, millis / 1000);
    }
}
