//! The usage facts, `usage_events`: one row per billable model call, written by the metering
//! sink and read by the edge's `/v1/usage` (and invoices to come). Every read names its tenant
//! and goes through `FINAL`, so redelivered events are never counted twice.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sluice_schemas::UsageEvent;

use super::ClickHouse;
use crate::Result;

/// The table.
pub const TABLE: &str = "usage_events";

/// One row of `usage_events`.
#[derive(Debug, Clone, PartialEq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct UsageRow {
    pub event_id: String,
    pub request_id: String,
    pub tenant_id: String,
    pub model: String,
    pub provider: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Event time, seconds (ClickHouse `DateTime`).
    pub occurred_at: u32,
    /// Event time, milliseconds.
    pub occurred_at_ms: i64,
}

impl From<&UsageEvent> for UsageRow {
    fn from(e: &UsageEvent) -> Self {
        Self {
            event_id: e.event_id.clone(),
            request_id: e.request_id.clone(),
            tenant_id: e.tenant_id.clone(),
            model: e.model.clone(),
            provider: e.provider.clone(),
            input_tokens: u64::try_from(e.input_tokens).unwrap_or(0),
            output_tokens: u64::try_from(e.output_tokens).unwrap_or(0),
            occurred_at: u32::try_from(e.occurred_at_ms.div_euclid(1000)).unwrap_or(0),
            occurred_at_ms: e.occurred_at_ms,
        }
    }
}

/// Which of `events`' ids are already stored. Each query names one tenant, the leading column
/// of the table's sort key, so it reads that tenant's index range, not the table.
pub async fn stored_event_ids(
    clickhouse: &ClickHouse,
    events: &[UsageEvent],
) -> Result<HashSet<String>> {
    let mut stored = HashSet::new();
    // One query per chunk of the batch, whatever its tenants: a round trip per tenant made a
    // batch of many tenants' events wait for as many queries. The ids go as arrays (an `IN`
    // list of literals costs the server far more to parse), and bounded chunks keep each
    // query under the server's size limit.
    for chunk in events.chunks(STORED_CHECK_CHUNK) {
        let wanted: HashSet<(&str, &str)> = chunk
            .iter()
            .map(|e| (e.tenant_id.as_str(), e.event_id.as_str()))
            .collect();
        let mut tenants: Vec<&str> = wanted.iter().map(|(t, _)| *t).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let ids: Vec<&str> = wanted.iter().map(|(_, e)| *e).collect();
        let found = clickhouse
            .client()
            .query(&format!(
                "SELECT ?fields FROM {TABLE} \
                  WHERE tenant_id IN (SELECT arrayJoin(?)) AND event_id IN (SELECT arrayJoin(?))"
            ))
            .bind(&tenants)
            .bind(&ids)
            .fetch_all::<StoredId>()
            .await?;
        stored.extend(
            found
                .into_iter()
                .filter(|f| wanted.contains(&(f.tenant_id.as_str(), f.event_id.as_str())))
                .map(|f| f.event_id),
        );
    }
    Ok(stored)
}

/// Events checked in one query by [`stored_event_ids`].
const STORED_CHECK_CHUNK: usize = 2000;

/// An event already in the table.
#[derive(Debug, ::clickhouse::Row, Deserialize)]
struct StoredId {
    tenant_id: String,
    event_id: String,
}

/// Usage of one model over a time range.
#[derive(Debug, Clone, PartialEq, Eq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct ModelUsage {
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A tenant's usage per model for events in `[from_s, to_s)` (Unix seconds).
pub async fn usage_by_model(
    clickhouse: &ClickHouse,
    tenant_id: &str,
    from_s: u32,
    to_s: u32,
) -> Result<Vec<ModelUsage>> {
    Ok(clickhouse
        .client()
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
        .await?)
}

/// The tokens (input and output) a tenant's usage facts hold between `from_s` and `to_s`,
/// leaving out the requests named in `excluding` (counted elsewhere already).
pub async fn tokens_used(
    clickhouse: &ClickHouse,
    tenant_id: &str,
    from_s: u32,
    to_s: u32,
    excluding: &[String],
) -> Result<u64> {
    // An empty array literal has no element type on older servers: no filter instead.
    let filter = if excluding.is_empty() {
        ""
    } else {
        " AND NOT has(?, request_id)"
    };
    let mut query = clickhouse
        .client()
        .query(&format!(
            "SELECT toUInt64(sum(input_tokens) + sum(output_tokens)) \
               FROM usage_events FINAL \
              WHERE tenant_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?){filter}"
        ))
        .bind(tenant_id)
        .bind(from_s)
        .bind(to_s);
    if !excluding.is_empty() {
        query = query.bind(excluding);
    }
    Ok(query.fetch_one::<u64>().await?)
}

/// Every usage fact of a tenant, oldest first, as they are read (for the tenant's data export).
pub fn tenant_events(
    clickhouse: &ClickHouse,
    tenant_id: &str,
) -> Result<clickhouse::query::RowCursor<UsageRow>> {
    Ok(clickhouse
        .client()
        .query(
            "SELECT ?fields FROM usage_events FINAL WHERE tenant_id = ? ORDER BY occurred_at_ms, event_id",
        )
        .bind(tenant_id)
        .fetch::<UsageRow>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local stack's ClickHouse (`SLUICE_CLICKHOUSE__URL`, as `deploy/local` sets it).
    fn local_clickhouse() -> ClickHouse {
        let url = std::env::var("SLUICE_CLICKHOUSE__URL")
            .unwrap_or_else(|_| crate::clickhouse::ClickHouseConfig::default().url);
        ClickHouse::new(&crate::clickhouse::ClickHouseConfig {
            url,
            ..Default::default()
        })
    }

    #[test]
    fn rows_carry_event_time_in_seconds_and_milliseconds() {
        let event = UsageEvent {
            event_id: "a".into(),
            request_id: "r".into(),
            tenant_id: "t".into(),
            model: "m".into(),
            provider: "sim".into(),
            input_tokens: 3,
            output_tokens: -4,
            occurred_at_ms: 1_700_000_000_123,
            latency_ms: None,
        };
        let row = UsageRow::from(&event);
        assert_eq!(row.occurred_at, 1_700_000_000);
        assert_eq!(row.occurred_at_ms, 1_700_000_000_123);
        assert_eq!((row.input_tokens, row.output_tokens), (3, 0));
    }

    #[tokio::test]
    async fn tokens_used_leaves_out_the_requests_named() {
        let clickhouse = local_clickhouse();
        let tenant = format!("test-{}", uuid::Uuid::new_v4().simple());
        let row = |request: &str, input, output| UsageRow {
            event_id: format!("{request}-event"),
            request_id: request.into(),
            tenant_id: tenant.clone(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: input,
            output_tokens: output,
            occurred_at: 1_796_572_800,
            occurred_at_ms: 1_796_572_800_000,
        };
        let rows = [row("r1", 10, 5), row("r2", 20, 1), row("r3", 100, 0)];
        clickhouse.insert_rows("usage_events", &rows).await.unwrap();
        let used = |excluding: Vec<String>| {
            let (clickhouse, tenant) = (clickhouse.clone(), tenant.clone());
            async move {
                tokens_used(
                    &clickhouse,
                    &tenant,
                    1_796_572_000,
                    1_796_573_000,
                    &excluding,
                )
                .await
                .unwrap()
            }
        };
        assert_eq!(used(Vec::new()).await, 136);
        assert_eq!(used(vec!["r3".into(), "elsewhere".into()]).await, 36);
        let nothing = tokens_used(&clickhouse, "no-such-tenant", 0, u32::MAX, &[]).await;
        assert_eq!(nothing.unwrap(), 0);
    }

    #[tokio::test]
    async fn stored_ids_are_found_per_tenant_in_one_batch_of_many_tenants() {
        let clickhouse = local_clickhouse();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let (a, b) = (format!("test-{run}-a"), format!("test-{run}-b"));
        let event = |tenant: &str, id: &str| UsageEvent {
            event_id: format!("{run}-{id}"),
            request_id: id.into(),
            tenant_id: tenant.into(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 1,
            output_tokens: 1,
            occurred_at_ms: 1_796_572_800_000,
            latency_ms: None,
        };
        let stored = [event(&a, "1"), event(&b, "2")];
        let rows: Vec<UsageRow> = stored.iter().map(UsageRow::from).collect();
        clickhouse.insert_rows(TABLE, &rows).await.unwrap();
        let batch = [event(&a, "1"), event(&a, "3"), event(&b, "2")];
        let found = stored_event_ids(&clickhouse, &batch).await.unwrap();
        let mut found: Vec<String> = found.into_iter().collect();
        found.sort();
        assert_eq!(found, [format!("{run}-1"), format!("{run}-2")]);
        // An id stored under another tenant of the same batch is not this event's.
        let crossed = [event(&b, "1"), event(&a, "3")];
        let found = stored_event_ids(&clickhouse, &crossed).await.unwrap();
        assert!(found.is_empty(), "{found:?}");
        assert!(stored_event_ids(&clickhouse, &[]).await.unwrap().is_empty());
    }
}
