//! ClickHouse DDL for database `sluice`. Each statement is idempotent and uses only syntax that
//! ClickHouse 18.16 and current releases both accept (no DateTime64, no settings clauses).

use crate::ClickHouseConfig;

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
];

/// Creates the database and tables if they are missing.
pub async fn migrate(config: &ClickHouseConfig) -> Result<(), clickhouse::error::Error> {
    let client = config.server_client();
    for statement in STATEMENTS {
        let sql = statement.replace("{db}", &config.database);
        client.query(&sql).execute().await?;
    }
    Ok(())
}
