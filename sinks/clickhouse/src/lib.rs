//! The metering sink: `sluice.usage` → ClickHouse `usage_events`, batched and exactly once per
//! `event_id`. Ids already stored are skipped before the insert, and the table is a
//! `ReplacingMergeTree` keyed by `(tenant_id, event_id)` read through `FINAL`, so even two sink
//! instances racing on a redelivered batch cannot count an event twice. Calls that failed
//! before producing anything (not billable) go to `failed_calls` instead.
//!
//! The table, its DDL and its queries belong to the stores (`sluice_stores::clickhouse::usage`);
//! this crate is the stage that fills it, and its benchmark ([`bench`]).

pub mod bench;

use std::{collections::HashSet, time::Instant};

use async_trait::async_trait;
use sluice_pipelines::{runtime::EffectivelyOnce, BatchCheck, BatchSink, ProcessError};
use sluice_schemas::UsageEvent;
use sluice_stores::{
    clickhouse::usage::{self, EventIds, FailedCallRow},
    ClickHouse,
};

/// `batch`'s billable events worth inserting: the first of each event, minus those already
/// stored and those of the batch written before (which a check run beside that write may
/// have missed).
/// Pure.
pub fn events_to_insert<'a>(
    batch: &'a [UsageEvent],
    already_stored: &EventIds,
    written_before: &EventIds,
) -> Vec<&'a UsageEvent> {
    let mut seen = HashSet::with_capacity(batch.len());
    batch
        .iter()
        .filter(|e| e.billable)
        .filter(|e| {
            let (tenant, id) = (e.tenant_id.as_str(), e.event_id.as_str());
            !already_stored.contains(tenant, id)
                && !written_before.contains(tenant, id)
                && seen.insert((tenant, id))
        })
        .collect()
}

/// Writes usage events to `usage_events`, once per event id.
pub struct UsageSink {
    clickhouse: ClickHouse,
    /// The events of the last batch written: the next batch's check may have run beside it.
    written_before: EventIds,
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
            written_before: EventIds::default(),
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

/// Which of a batch's billable events `usage_events` already holds.
pub struct StoredIdCheck {
    clickhouse: ClickHouse,
}

#[async_trait]
impl BatchCheck<UsageEvent> for StoredIdCheck {
    type Checked = EventIds;

    async fn check(&self, batch: &[UsageEvent]) -> Result<EventIds, ProcessError> {
        let billable = batch.iter().filter(|e| e.billable);
        usage::stored_event_ids(&self.clickhouse, billable)
            .await
            .map_err(retriable)
    }
}

#[async_trait]
impl BatchSink for UsageSink {
    type Input = UsageEvent;
    /// Rows are keyed by event id: already stored ids are skipped, and the table's
    /// ReplacingMergeTree folds any that race in.
    type Delivery = EffectivelyOnce;
    type Check = StoredIdCheck;

    fn check(&self) -> StoredIdCheck {
        StoredIdCheck {
            clickhouse: self.clickhouse.clone(),
        }
    }

    async fn write(
        &mut self,
        batch: &[UsageEvent],
        checked: Option<EventIds>,
    ) -> Result<usize, ProcessError> {
        let started = Instant::now();
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
        let looked_ahead = checked.is_some();
        let stored = match checked {
            Some(stored) => stored,
            None => self.check().check(batch).await?,
        };
        let checked_at = Instant::now();
        let new = events_to_insert(batch, &stored, &self.written_before);
        let inserted = usage::insert_events(&self.clickhouse, new)
            .await
            .map_err(retriable)?;
        // Every event of the batch is stored now, some perhaps by an earlier attempt that
        // failed after ClickHouse took its rows: the next check may have missed any of them.
        let mut written = EventIds::default();
        for e in batch.iter().filter(|e| e.billable) {
            written.insert(&e.tenant_id, &e.event_id);
        }
        self.written_before = written;
        tracing::debug!(
            records = batch.len(),
            inserted,
            already_stored = stored.len(),
            looked_ahead,
            check_ms = checked_at.duration_since(started).as_millis() as u64,
            insert_ms = checked_at.elapsed().as_millis() as u64,
            "usage batch written"
        );
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

    #[tokio::test]
    async fn a_batch_checked_beside_the_write_before_it_stores_no_event_twice() {
        let url = std::env::var("SLUICE_CLICKHOUSE__URL")
            .unwrap_or_else(|_| sluice_stores::clickhouse::ClickHouseConfig::default().url);
        let clickhouse = ClickHouse::new(&sluice_stores::clickhouse::ClickHouseConfig {
            url,
            ..Default::default()
        });
        let now_ms = sluice_pipelines::now_ms();
        let tenant = format!("test-lookahead-{}-{now_ms}", std::process::id());
        let of_tenant = |id: &str| UsageEvent {
            tenant_id: tenant.clone(),
            occurred_at_ms: now_ms,
            ..event(id)
        };
        let mut sink = UsageSink::new(clickhouse.clone());
        let first = [of_tenant("1"), of_tenant("2")];
        let second = [of_tenant("2"), of_tenant("3")];
        // The second batch is checked while the first is still on its way: "2" is not stored yet.
        let checked_early = sink.check().check(&second).await.unwrap();
        assert!(checked_early.is_empty());
        assert_eq!(sink.write(&first, None).await.unwrap(), 2);
        assert_eq!(sink.write(&second, Some(checked_early)).await.unwrap(), 1);
        // Redelivered, with a check of its own: nothing new.
        assert_eq!(sink.write(&second, None).await.unwrap(), 0);
        let rows = usage::totals_by_tenant_and_model(
            &clickhouse,
            now_ms - 1000,
            now_ms + 1000,
            Some(&tenant),
            usage::Rows::AsStored,
        )
        .await
        .unwrap();
        let stored: u64 = rows.iter().map(|r| r.requests).sum();
        assert_eq!(stored, 3, "each event stored once, without FINAL: {rows:?}");
    }

    #[test]
    fn duplicates_within_a_batch_and_stored_ids_are_skipped() {
        let batch = [event("a"), event("b"), event("a"), event("c")];
        let mut stored = EventIds::default();
        stored.insert("t", "b");
        let events = events_to_insert(&batch, &stored, &EventIds::default());
        let ids: Vec<_> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }
}
