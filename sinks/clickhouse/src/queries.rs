//! Reads over the usage facts, for the edge's `/v1/usage` and for invoices. Every query names
//! its tenant and reads through `FINAL`, so redelivered events are never counted twice.

use serde::{Deserialize, Serialize};

/// Usage of one model over a time range.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct ModelUsage {
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A tenant's usage per model for events in `[from_s, to_s)` (Unix seconds).
pub async fn usage_by_model(
    client: &clickhouse::Client,
    tenant_id: &str,
    from_s: u32,
    to_s: u32,
) -> Result<Vec<ModelUsage>, clickhouse::error::Error> {
    client
        .query(
            "SELECT model, count() AS requests, sum(input_tokens) AS input_tokens, \
                    sum(output_tokens) AS output_tokens \
               FROM usage_events FINAL \
              WHERE tenant_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
              GROUP BY model ORDER BY model",
        )
        .bind(tenant_id)
        .bind(from_s)
        .bind(to_s)
        .fetch_all::<ModelUsage>()
        .await
}

/// Number of stored rows for one event id (1 after any number of redeliveries).
pub async fn event_count(
    client: &clickhouse::Client,
    event_id: &str,
) -> Result<u64, clickhouse::error::Error> {
    client
        .query("SELECT count() FROM usage_events FINAL WHERE event_id = ?")
        .bind(event_id)
        .fetch_one::<u64>()
        .await
}
