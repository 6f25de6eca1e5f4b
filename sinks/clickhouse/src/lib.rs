//! The metering sink and everything Sluice keeps in ClickHouse.
//!
//! - [`schema`]: the DDL of database `sluice` (applied by `sluice migrate`), written in SQL that
//!   both ClickHouse 18.16 and current releases accept.
//! - [`UsageSink`]: `sluice.usage` → `sluice.usage_events`, batched and exactly once per
//!   `event_id`: ids already stored are skipped before the insert, and the table is a
//!   `ReplacingMergeTree` keyed by `(tenant_id, event_id)` with reads through `FINAL`, so even
//!   two sink instances racing on a redelivered batch cannot count an event twice.
//! - [`queries`]: the read side used by the edge's usage API.

pub mod queries;
pub mod schema;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_pipelines::{runtime::EffectivelyOnce, BatchSink, ProcessError};
use sluice_schemas::UsageEvent;

/// How to reach ClickHouse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding Sluice's tables.
    pub database: String,
    /// User the sinks and the edge connect as.
    pub user: String,
    /// That user's password (empty for none).
    pub password: String,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "sluice".into(),
            user: "default".into(),
            password: String::new(),
        }
    }
}

impl ClickHouseConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            problems.push("clickhouse.url must be an http:// or https:// URL".to_owned());
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            problems.push("clickhouse.database must be a plain identifier".to_owned());
        }
        problems
    }

    /// A client bound to the database. Validation is off: ClickHouse 18.16 lacks the
    /// `RowBinaryWithNamesAndTypes` format it needs; rows are plain `RowBinary`.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }

    /// A client not bound to a database (for creating it).
    pub fn server_client(&self) -> clickhouse::Client {
        let mut client = clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_validation(false);
        if !self.password.is_empty() {
            client = client.with_password(&self.password);
        }
        client
    }
}

/// One row of `sluice.usage_events`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
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

/// Rows of `batch` worth inserting: the first of each event id, minus ids already stored. Pure.
pub fn rows_to_insert(batch: &[UsageEvent], already_stored: &HashSet<String>) -> Vec<UsageRow> {
    let mut seen = HashSet::with_capacity(batch.len());
    batch
        .iter()
        .filter(|e| !already_stored.contains(&e.event_id) && seen.insert(e.event_id.as_str()))
        .map(UsageRow::from)
        .collect()
}

/// Writes usage events to `usage_events`, once per event id.
pub struct UsageSink {
    client: clickhouse::Client,
}

impl UsageSink {
    /// A sink writing through `client` (bound to the database).
    pub fn new(client: clickhouse::Client) -> Self {
        Self { client }
    }

    /// The batch's event ids already in the table. Each query names one tenant, the leading
    /// column of the table's sort key, so it reads that tenant's index range, not the table.
    async fn stored_ids(
        &self,
        batch: &[UsageEvent],
    ) -> Result<HashSet<String>, clickhouse::error::Error> {
        let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
        for event in batch {
            by_tenant
                .entry(&event.tenant_id)
                .or_default()
                .push(&event.event_id);
        }
        let mut stored = HashSet::new();
        for (tenant, ids) in by_tenant {
            // Bounded IN lists keep each query small.
            for chunk in ids.chunks(500) {
                let placeholders = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "SELECT event_id FROM usage_events WHERE tenant_id = ? AND event_id IN ({placeholders})"
                );
                let mut query = self.client.query(&sql).bind(tenant);
                for id in chunk {
                    query = query.bind(*id);
                }
                stored.extend(query.fetch_all::<String>().await?);
            }
        }
        Ok(stored)
    }
}

fn retriable(e: clickhouse::error::Error) -> ProcessError {
    // Rows are built from decoded records, so a refusal means ClickHouse or its schema is not
    // as expected: keep retrying (and alerting through the retry metric) rather than drop usage.
    ProcessError::Retriable(format!("clickhouse: {e}"))
}

#[async_trait]
impl BatchSink for UsageSink {
    type Input = UsageEvent;
    /// Rows are keyed by event id: already stored ids are skipped, and the table's
    /// ReplacingMergeTree folds any that race in.
    type Delivery = EffectivelyOnce;

    async fn write(&mut self, batch: &[UsageEvent]) -> Result<usize, ProcessError> {
        let stored = self.stored_ids(batch).await.map_err(retriable)?;
        let rows = rows_to_insert(batch, &stored);
        if rows.is_empty() {
            return Ok(0);
        }
        let mut insert = self
            .client
            .insert::<UsageRow>("usage_events")
            .await
            .map_err(retriable)?;
        for row in &rows {
            insert.write(row).await.map_err(retriable)?;
        }
        insert.end().await.map_err(retriable)?;
        Ok(rows.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> UsageEvent {
        UsageEvent {
            event_id: id.into(),
            request_id: "r".into(),
            tenant_id: "t".into(),
            model: "m".into(),
            provider: "sim".into(),
            input_tokens: 3,
            output_tokens: 4,
            occurred_at_ms: 1_700_000_000_123,
            latency_ms: None,
        }
    }

    #[test]
    fn duplicates_within_a_batch_and_stored_ids_are_skipped() {
        let batch = [event("a"), event("b"), event("a"), event("c")];
        let stored: HashSet<String> = ["b".to_owned()].into();
        let rows = rows_to_insert(&batch, &stored);
        let ids: Vec<_> = rows.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(rows[0].occurred_at, 1_700_000_000);
        assert_eq!(rows[0].occurred_at_ms, 1_700_000_000_123);
    }

    #[test]
    fn config_parses_and_validates() {
        let c: ClickHouseConfig = toml::from_str("url = \"ftp://x\"\ndatabase = \"a-b\"").unwrap();
        assert_eq!(c.validate().len(), 2);
        assert!(ClickHouseConfig::default().validate().is_empty());
    }
}
