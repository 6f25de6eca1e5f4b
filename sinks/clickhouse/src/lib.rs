//! The metering sink: `sluice.usage` → ClickHouse `usage_events`, batched and exactly once per
//! `event_id`. Ids already stored are skipped before the insert, and the table is a
//! `ReplacingMergeTree` keyed by `(tenant_id, event_id)` read through `FINAL`, so even two sink
//! instances racing on a redelivered batch cannot count an event twice. Calls that failed
//! before producing anything (not billable) go to `failed_calls` instead.
//!
//! The table, its DDL and its queries belong to the stores (`sluice_stores::clickhouse::usage`);
//! this crate is the stage that fills it, and its benchmark ([`bench`]).

pub mod bench;

use std::collections::HashSet;

use async_trait::async_trait;
use sluice_pipelines::{runtime::EffectivelyOnce, BatchSink, ProcessError};
use sluice_schemas::UsageEvent;
use sluice_stores::{
    clickhouse::usage::{self, FailedCallRow},
    ClickHouse,
};

/// `batch`'s billable events worth inserting: the first of each event id, minus ids already
/// stored. Pure.
pub fn events_to_insert<'a>(
    batch: &'a [UsageEvent],
    already_stored: &HashSet<String>,
) -> Vec<&'a UsageEvent> {
    let mut seen = HashSet::with_capacity(batch.len());
    batch
        .iter()
        .filter(|e| e.billable)
        .filter(|e| !already_stored.contains(&e.event_id) && seen.insert(e.event_id.as_str()))
        .collect()
}

/// Writes usage events to `usage_events`, once per event id.
pub struct UsageSink {
    clickhouse: ClickHouse,
    /// Seconds after a month ends before its facts are merged into one part (`None`: never).
    compact_after_s: Option<u32>,
    /// The compaction under way, if one is.
    compacting: Option<tokio::task::JoinHandle<()>>,
}

impl UsageSink {
    /// A sink writing to `clickhouse`.
    pub fn new(clickhouse: ClickHouse) -> Self {
        Self {
            clickhouse,
            compact_after_s: None,
            compacting: None,
        }
    }

    /// Also merges each closed month's facts into one part, `after_s` seconds after the month
    /// ends (and again after late usage lands in it), so billing reads it without `FINAL`.
    pub fn compacting_closed_months(mut self, after_s: u32) -> Self {
        self.compact_after_s = Some(after_s);
        self
    }
}

fn retriable(e: sluice_stores::Error) -> ProcessError {
    // Rows are built from decoded records, so a refusal means ClickHouse or its schema is not
    // as expected: keep retrying (and alerting through the retry metric) rather than drop usage.
    ProcessError::Retriable(e.to_string())
}

#[async_trait]
impl BatchSink for UsageSink {
    type Input = UsageEvent;
    /// Rows are keyed by event id: already stored ids are skipped, and the table's
    /// ReplacingMergeTree folds any that race in.
    type Delivery = EffectivelyOnce;

    async fn write(&mut self, batch: &[UsageEvent]) -> Result<usize, ProcessError> {
        // Failed calls feed no rollup: the table's FINAL reads fold a redelivered one.
        let failed: Vec<FailedCallRow> = batch
            .iter()
            .filter(|e| !e.billable)
            .map(FailedCallRow::from)
            .collect();
        self.clickhouse
            .insert_rows(usage::FAILED_TABLE, &failed)
            .await
            .map_err(retriable)?;
        let billable = batch.iter().filter(|e| e.billable);
        let stored = usage::stored_event_ids(&self.clickhouse, billable)
            .await
            .map_err(retriable)?;
        let new = events_to_insert(batch, &stored);
        let inserted = usage::insert_events(&self.clickhouse, new)
            .await
            .map_err(retriable)?;
        Ok(inserted + failed.len())
    }

    async fn upkeep(&mut self) {
        let Some(after_s) = self.compact_after_s else {
            return;
        };
        if self.compacting.as_ref().is_some_and(|c| !c.is_finished()) {
            return;
        }
        let clickhouse = self.clickhouse.clone();
        self.compacting = Some(tokio::spawn(async move {
            match usage::compact_closed_months(&clickhouse, after_s).await {
                Ok(months) if months.is_empty() => {}
                Ok(months) => tracing::info!(?months, "closed months' usage facts merged"),
                Err(e) => {
                    tracing::warn!(error = %e, "closed months' usage facts not merged; trying again later")
                }
            }
        }));
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
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
        }
    }

    #[test]
    fn duplicates_within_a_batch_and_stored_ids_are_skipped() {
        let batch = [event("a"), event("b"), event("a"), event("c")];
        let stored: HashSet<String> = ["b".to_owned()].into();
        let events = events_to_insert(&batch, &stored);
        let ids: Vec<_> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }
}
