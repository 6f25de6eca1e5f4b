//! ClickHouse DDL for database `sluice`. Each statement is idempotent and uses only syntax that
//! ClickHouse 18.16 and current releases both accept (no DateTime64, no settings clauses).

use super::ClickHouseConfig;
use crate::Result;

/// The statements, in order; `{db}` is the database name.
const STATEMENTS: &[&str] = &[
    "CREATE DATABASE IF NOT EXISTS {db}",
    // One row per billable model call. Duplicated deliveries share (tenant_id, event_id) and
    // collapse on merge; readers use FINAL so they never see a duplicate before the merge.
    "CREATE TABLE IF NOT EXISTS {db}.usage_events (
        event_id       String,
        request_id     String,
        tenant_id      String,
        model          String,
        provider       String,
        input_tokens   UInt64,
        output_tokens  UInt64,
        occurred_at    DateTime,
        occurred_at_ms Int64,
        inserted_at    DateTime DEFAULT now()
    ) ENGINE = ReplacingMergeTree()
    PARTITION BY toYYYYMM(occurred_at)
    ORDER BY (tenant_id, event_id)",
    // One row per model call that failed before producing anything (nothing billed): the
    // other half of an error rate. Keyed like the facts; read with FINAL.
    "CREATE TABLE IF NOT EXISTS {db}.failed_calls (
        event_id       String,
        request_id     String,
        tenant_id      String,
        model          String,
        provider       String,
        occurred_at    DateTime,
        occurred_at_ms Int64,
        latency_ms     Int64,
        outcome        String,
        key_id         String,
        user_id        String,
        trace_id       String,
        inserted_at    DateTime DEFAULT now()
    ) ENGINE = ReplacingMergeTree()
    PARTITION BY toYYYYMM(occurred_at)
    ORDER BY (tenant_id, event_id)",
    // Streaming SQL results (pipelines/sql): one row per window, group and source partition.
    // A window emitted again (late records, or a restart that re-read its records) has at least
    // as many `records`; ReplacingMergeTree(records) keeps the most complete row, readers use
    // FINAL and sum over source partitions.
    "CREATE TABLE IF NOT EXISTS {db}.tenant_usage_1m (
        window_start     DateTime('UTC'),
        window_end       DateTime('UTC'),
        tenant_id        String,
        source_partition Int32,
        records          UInt64,
        requests         UInt64,
        input_tokens     Int64,
        output_tokens    Int64,
        cost_micros      Float64
    ) ENGINE = ReplacingMergeTree(records)
    PARTITION BY toYYYYMM(window_start)
    ORDER BY (tenant_id, window_start, source_partition)",
    "CREATE TABLE IF NOT EXISTS {db}.model_latency_1m (
        window_start     DateTime('UTC'),
        window_end       DateTime('UTC'),
        model            String,
        source_partition Int32,
        records          UInt64,
        p50_ms           Float64,
        p95_ms           Float64,
        p99_ms           Float64,
        max_ms           Int64
    ) ENGINE = ReplacingMergeTree(records)
    PARTITION BY toYYYYMM(window_start)
    ORDER BY (model, window_start, source_partition)",
];

/// Columns added to tables after they were first released: `(table, column, type and
/// default)`. Added where missing (ClickHouse 18.16 knows no `ADD COLUMN IF NOT EXISTS`).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // Who made the request, and the provider's cached input tokens (usage events carry them).
    ("usage_events", "key_id", "String DEFAULT ''"),
    ("usage_events", "user_id", "String DEFAULT ''"),
    ("usage_events", "cached_input_tokens", "UInt64 DEFAULT 0"),
    ("usage_events", "trace_id", "String DEFAULT ''"),
    // How long the call took (-1: not measured), and why a billed call broke part-way.
    ("usage_events", "latency_ms", "Int64 DEFAULT -1"),
    ("usage_events", "outcome", "String DEFAULT ''"),
];

/// Rollups of the facts, kept by materialized views as facts are inserted: `(target table,
/// its DDL, the view's name, the view's SELECT over usage_events)`. The metering sink inserts
/// each event id once, so each event is counted once (two sinks racing on one redelivered
/// batch could insert it twice: `sluice invoices reconcile` would show it).
const ROLLUPS: &[(&str, &str, &str, &str)] = &[
    (
        "usage_hourly",
        "CREATE TABLE IF NOT EXISTS {db}.usage_hourly (
            hour                DateTime('UTC'),
            tenant_id           String,
            model               String,
            requests            UInt64,
            input_tokens        UInt64,
            output_tokens       UInt64,
            cached_input_tokens UInt64
        ) ENGINE = SummingMergeTree()
        PARTITION BY toYYYYMM(hour)
        ORDER BY (tenant_id, hour, model)",
        "usage_hourly_mv",
        "SELECT toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, tenant_id, model,
                count() AS requests, sum(input_tokens) AS input_tokens,
                sum(output_tokens) AS output_tokens, sum(cached_input_tokens) AS cached_input_tokens
           FROM {db}.usage_events{final} GROUP BY hour, tenant_id, model",
    ),
    (
        "usage_daily",
        "CREATE TABLE IF NOT EXISTS {db}.usage_daily (
            day                 Date,
            tenant_id           String,
            requests            UInt64,
            input_tokens        UInt64,
            output_tokens       UInt64,
            cached_input_tokens UInt64
        ) ENGINE = SummingMergeTree()
        PARTITION BY toYYYYMM(day)
        ORDER BY (tenant_id, day)",
        "usage_daily_mv",
        "SELECT toDate(occurred_at, 'UTC') AS day, tenant_id,
                count() AS requests, sum(input_tokens) AS input_tokens,
                sum(output_tokens) AS output_tokens, sum(cached_input_tokens) AS cached_input_tokens
           FROM {db}.usage_events{final} GROUP BY day, tenant_id",
    ),
];

/// Creates the database and tables if they are missing, adds missing columns, and creates the
/// rollups' views (filling a new rollup once from the facts already stored).
pub async fn migrate(config: &ClickHouseConfig) -> Result<()> {
    let client = config.server_client();
    for statement in STATEMENTS {
        let sql = statement.replace("{db}", &config.database);
        client.query(&sql).execute().await?;
    }
    for (table, column, definition) in ADDED_COLUMNS {
        if has_column(&client, &config.database, table, column).await? {
            continue;
        }
        let sql = format!(
            "ALTER TABLE {}.{table} ADD COLUMN {column} {definition}",
            config.database
        );
        if let Err(e) = client.query(&sql).execute().await {
            // Another process migrating at the same moment may have added it first.
            if !has_column(&client, &config.database, table, column).await? {
                return Err(e.into());
            }
        }
    }
    let db = &config.database;
    for (table, ddl, view, select) in ROLLUPS {
        client.query(&ddl.replace("{db}", db)).execute().await?;
        let existed: Vec<String> = client
            .query("SELECT name FROM system.tables WHERE database = ? AND name = ?")
            .bind(db)
            .bind(view)
            .fetch_all()
            .await?;
        if !existed.is_empty() {
            continue;
        }
        // Facts stored before the view existed are rolled up once, from those inserted before
        // the second it was made (run `sluice setup` with metering stopped to make it exact).
        let before: u32 = client.query("SELECT toUInt32(now())").fetch_one().await?;
        let view_select = select.replace("{db}", db).replace("{final}", "");
        let create = format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view} TO {db}.{table} AS {view_select}"
        );
        client.query(&create).execute().await?;
        let backfill = select
            .replace("{db}", db)
            .replace("{final}", " FINAL")
            .replace(
                " GROUP BY ",
                &format!(" WHERE inserted_at < toDateTime({before}) GROUP BY "),
            );
        client
            .query(&format!("INSERT INTO {db}.{table} {backfill}"))
            .execute()
            .await?;
    }
    Ok(())
}

async fn has_column(
    client: &::clickhouse::Client,
    database: &str,
    table: &str,
    column: &str,
) -> Result<bool> {
    let found: Vec<String> = client
        .query("SELECT name FROM system.columns WHERE database = ? AND table = ? AND name = ?")
        .bind(database)
        .bind(table)
        .bind(column)
        .fetch_all()
        .await?;
    Ok(!found.is_empty())
}
