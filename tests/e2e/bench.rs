//! The benchmarks run end to end (small, so it is a check, not a measurement).

use crate::harness::*;

/// The `<id>` of the `topics: <id>.*` line a benchmark prints.
fn workspace_of(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.strip_prefix("topics: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| t.strip_suffix(".*"))
        .unwrap_or_else(|| panic!("no topics line in {out}"))
}

/// Asserts that none of `<id>.<suffix>` is left on the broker.
fn assert_topics_gone(out: &str, suffixes: &[&str]) {
    let id = workspace_of(out);
    for suffix in suffixes {
        let topic = format!("{id}.{suffix}");
        assert!(!topic_exists(&topic), "{topic} left behind: {out}");
    }
}

/// The records/s a benchmark printed on its line starting with `label` (`label…: <n> records/s`).
fn printed_rate(out: &str, label: &str) -> f64 {
    out.lines()
        .find(|l| l.starts_with(label))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {label} line in {out}"))
}

/// The `ratio=<x>` every benchmark prints last; positive.
fn last_line_ratio(out: &str) -> f64 {
    let last = out.lines().last().unwrap_or_default();
    let ratio: f64 = last
        .strip_prefix("ratio=")
        .expect("last line is ratio=")
        .parse()
        .unwrap();
    assert!(ratio > 0.0, "{out}");
    ratio
}

#[tokio::test]
async fn a_benchmark_workspace_deletes_its_topics_when_removed() {
    let kafka = kafka_config();
    let workspace = sluice_pipelines::bench::Workspace::create(&kafka, &["in", "out"])
        .await
        .unwrap();
    let topics = [workspace.topic("in"), workspace.topic("out")];
    assert!(topics.iter().all(|t| topic_exists(t)), "{topics:?} created");
    workspace.remove(&kafka).await;
    for topic in &topics {
        assert!(!topic_exists(topic), "{topic} still listed after remove");
    }
}

#[tokio::test]
async fn passthrough_benchmark_reports_both_paths_and_a_ratio() {
    let sluice = Sluice::start();
    let args = [
        "bench",
        "passthrough",
        "--records",
        "300",
        "--record-bytes",
        "512",
        "--rounds",
        "1",
    ];
    let out = sluice.cli(&args);
    let ratio = last_line_ratio(&out);
    let (raw, pipeline) = (printed_rate(&out, "raw"), printed_rate(&out, "pipeline"));
    assert!(raw > 0.0 && pipeline > 0.0);
    // The printed rates are rounded to whole records/s.
    assert!(
        (pipeline / raw / ratio - 1.0).abs() < 0.02,
        "ratio is pipeline/raw: {out}"
    );
    assert_topics_gone(&out, &["in", "raw-out", "pipeline-out", "dlq"]);
}

#[tokio::test]
async fn sink_benchmark_writes_every_row_both_ways_and_reports_a_ratio() {
    let sluice = Sluice::start();
    let args = ["bench", "sink", "--records", "2000", "--rounds", "2"];
    let out = sluice.cli(&args);
    let ratio = last_line_ratio(&out);
    let (client, sink) = (
        printed_rate(&out, "clickhouse-client"),
        printed_rate(&out, "metering sink"),
    );
    assert!(client > 0.0 && sink > 0.0, "{out}");
    assert!(
        (sink / client / ratio - 1.0).abs() < 0.02,
        "ratio is sink/clickhouse-client: {out}"
    );
    // Every round wrote its 2,000 rows each way, once.
    let id = workspace_of(&out);
    for path in ["sink", "client"] {
        for round in 1..=2 {
            let tenant = format!("{id}-{path}-{round}");
            let rows: u64 = clickhouse()
                .query("SELECT count() FROM usage_events FINAL WHERE tenant_id = ?")
                .bind(&tenant)
                .fetch_one()
                .await
                .unwrap();
            assert_eq!(rows, 2000, "{tenant}: {out}");
        }
    }
    assert_topics_gone(&out, &["usage-1", "usage-2", "dlq"]);
}

#[tokio::test]
async fn window_benchmark_writes_every_closed_window_and_reports_a_ratio() {
    let sluice = Sluice::start();
    let args = [
        "bench",
        "window",
        "--records",
        "3000",
        "--tenants",
        "10",
        "--minutes",
        "3",
        "--rounds",
        "1",
    ];
    let out = sluice.cli(&args);
    last_line_ratio(&out);
    // Ten tenants, two closed minutes each (the third closes when the partition goes quiet).
    let sql = out
        .lines()
        .find(|l| l.starts_with("SQL tenant_usage_1m"))
        .unwrap_or_else(|| panic!("no SQL line in {out}"));
    // "..., <rows> rows, at most <held> rows held in windows"
    let count = |suffix: &str| -> u64 {
        sql.split(", ")
            .find_map(|part| part.strip_suffix(suffix))
            .and_then(|n| n.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{suffix}' in {sql}"))
    };
    assert!(count(" rows") >= 20, "{out}");
    // Windows keep aggregate states, not the 3,000 records.
    assert!(count(" rows held in windows") < 500, "{out}");
    assert_topics_gone(&out, &["usage", "dlq"]);
}

#[tokio::test]
async fn gateway_benchmark_measures_the_upstream_the_hop_and_sluice_with_and_without_limits() {
    let sluice = Sluice::start();
    let args = [
        "bench",
        "gateway",
        "--clients",
        "1,3",
        "--seconds",
        "1",
        "--warmup-seconds",
        "0",
        "--idle-seconds",
        "1",
        "--hop-samples",
        "20",
        "--compare-limits",
    ];
    let out = sluice.cli(&args);
    assert!(out.contains("one broker hop"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(
        rows.len(),
        6,
        "a row per level, and two for its clients split by limits: {out}"
    );
    assert_eq!(rows.iter().filter(|r| r.contains("limits on;")).count(), 2);
    // The limited half's rows say how often the edge called Redis for them.
    for row in rows.iter().filter(|r| r.contains("limits on;")) {
        let calls = row
            .rsplit_once("limits on; ")
            .and_then(|(_, c)| c.split_whitespace().next())
            .and_then(|c| c.parse::<f64>().ok());
        assert!(calls.is_some(), "{row}");
    }
    let last = out.lines().last().unwrap_or_default();
    let fields: Vec<(&str, f64)> = last
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        names,
        [
            "max_rps",
            "p99_tax_ms_c10",
            "limits_rate_ratio",
            "limits_p99_added_ms_c10"
        ],
        "{out}"
    );
    assert!(fields[0].1 > 0.0, "requests went through Sluice: {out}");
    assert!(
        fields[2].1 > 0.0,
        "limited requests went through too: {out}"
    );
    assert!(fields.iter().all(|(_, v)| v.is_finite()), "{out}");
    assert!(out.contains("no level with 10 clients"), "{out}");
    // Its topics, the hop's and its own sluice up's, are gone once it has reported.
    assert_topics_gone(
        &out,
        &["hop", "requests", "routed", "replies", "usage", "dlq"],
    );
}

#[tokio::test]
async fn invoice_benchmark_checks_its_invoices_and_leaves_only_them_behind() {
    let prefix = unique("t");
    let out = run_cli(
        &prefix,
        &["bench", "invoices", "--events", "30000", "--tenants", "30"],
    );
    last_line_ratio(&out);
    assert!(out.contains("checked: 30 invoices"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.split("(tenants ").nth(1))
        .and_then(|l| l.strip_suffix("-*)"))
        .unwrap_or_else(|| panic!("no tenants line in {out}"));
    let facts: u64 = clickhouse()
        .query("SELECT count() FROM usage_events WHERE startsWith(event_id, ?)")
        .bind(format!("{id}-"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(facts, 0, "{out}");
    let admin = sluice_stores::postgres::connect(&admin_database_url(), 1)
        .await
        .unwrap();
    let (tenants, invoices): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tenants WHERE name LIKE $1 || '-%'), \
                (SELECT count(*) FROM invoices WHERE tenant_name LIKE $1 || '-%')",
    )
    .bind(id)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((tenants, invoices), (0, 30), "{out}");
}

#[tokio::test]
async fn workflow_benchmark_runs_workflows_through_the_broker_and_prices_the_guard() {
    let sluice = Sluice::start();
    let args = [
        "bench",
        "workflows",
        "--clients",
        "1,3",
        "--seconds",
        "1",
        "--warmup-seconds",
        "0",
        "--guard-calls",
        "2000",
        "--hop-samples",
        "20",
    ];
    let out = sluice.cli(&args);
    assert!(out.contains("one broker hop"), "{out}");
    assert!(out.contains("tool guard (2000 calls"), "{out}");
    assert!(!out.contains("a run failed"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 2, "a row per level: {out}");
    let last = out.lines().last().unwrap_or_default();
    let fields: Vec<(&str, f64)> = last
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        names,
        ["runs_per_s", "step_p50_ms", "guard_ns_per_call", "ratio"],
        "{out}"
    );
    assert!(fields[0].1 > 0.0 && fields[3].1 > 0.0, "{out}");
    assert!(fields.iter().all(|(_, v)| v.is_finite()), "{out}");
    assert_topics_gone(
        &out,
        &[
            "hop",
            "requests",
            "routed",
            "replies",
            "usage",
            "workflow-events",
        ],
    );
}
