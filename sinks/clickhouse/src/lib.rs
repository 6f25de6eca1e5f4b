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
    clickhouse::usage::{self, EventIds, EventsInsert, FailedCallRow},
    ClickHouse,
};

/// `batch`'s billable events worth inserting: the first of each event, minus those already
/// stored and those in any of `written` (events of writes the check may not have seen).
/// Pure.
pub fn events_to_insert<'a>(
    batch: &'a [UsageEvent],
    already_stored: &EventIds,
    written: &[&EventIds],
) -> Vec<&'a UsageEvent> {
    let mut seen = HashSet::with_capacity(batch.len());
    batch
        .iter()
        .filter(|e| e.billable)
        .filter(|e| {
            let (tenant, id) = (e.tenant_id.as_str(), e.event_id.as_str());
            !already_stored.contains(tenant, id)
                && !written.iter().any(|w| w.contains(tenant, id))
                && seen.insert((tenant, id))
        })
        .collect()
}

/// Writes usage events to `usage_events`, once per event id. One insert spans batches until
/// the sink loop ends it, so ClickHouse makes one part of many batches (each insert costs it a
/// part of the table and one of each rollup view, whatever its size).
pub struct UsageSink {
    clickhouse: ClickHouse,
    /// The insert under way, if rows were written since the last end.
    open: Option<EventsInsert>,
    /// Every billable event of the batches written since the last end: a later batch's check
    /// cannot see them until the insert ends.
    open_events: EventIds,
    /// The events of the insert that ended last: the next batch's check may have run beside
    /// its end.
    ended_last: EventIds,
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
            open: None,
            open_events: EventIds::default(),
            ended_last: EventIds::default(),
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

    /// Writes `failed` to their table and `batch`'s new billable events into the open insert;
    /// returns how many events were new.
    async fn write_batch(
        &mut self,
        batch: &[UsageEvent],
        failed: &[FailedCallRow],
        checked: Option<EventIds>,
        started: Instant,
    ) -> sluice_stores::Result<usize> {
        self.clickhouse
            .insert_rows(usage::FAILED_TABLE, failed)
            .await?;
        let looked_ahead = checked.is_some();
        let stored = match checked {
            Some(stored) => stored,
            None => stored_billable(&self.clickhouse, batch).await?,
        };
        let checked_at = Instant::now();
        let new = events_to_insert(batch, &stored, &[&self.open_events, &self.ended_last]);
        self.write_rows(&new).await?;
        tracing::debug!(
            records = batch.len(),
            inserted = new.len(),
            already_stored = stored.len(),
            looked_ahead,
            check_ms = checked_at.duration_since(started).as_millis() as u64,
            write_ms = checked_at.elapsed().as_millis() as u64,
            "usage batch written"
        );
        Ok(new.len())
    }

    /// Writes `new` into the open insert (opening one if none is).
    async fn write_rows(&mut self, new: &[&UsageEvent]) -> sluice_stores::Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let insert = match &mut self.open {
            Some(insert) => insert,
            None => self
                .open
                .insert(EventsInsert::open(&self.clickhouse).await?),
        };
        insert.write(new).await?;
        Ok(())
    }
}

/// Which of `batch`'s billable events `usage_events` already holds.
async fn stored_billable(
    clickhouse: &ClickHouse,
    batch: &[UsageEvent],
) -> sluice_stores::Result<EventIds> {
    usage::stored_event_ids(clickhouse, batch.iter().filter(|e| e.billable)).await
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
        stored_billable(&self.clickhouse, batch)
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
        let inserted = match self.write_batch(batch, &failed, checked, started).await {
            Ok(inserted) => inserted,
            Err(e) => {
                // The insert is broken: none of it will be stored.
                self.abandon();
                return Err(retriable(e));
            }
        };
        // Every event of the batch is stored once the insert ends, some perhaps by an earlier
        // attempt that failed after ClickHouse took its rows: a later check may miss any of them.
        for e in batch.iter().filter(|e| e.billable) {
            self.open_events.insert(&e.tenant_id, &e.event_id);
        }
        // Checks started after the last insert ended (every one from now on) saw it.
        self.ended_last = EventIds::default();
        Ok(inserted + failed.len())
    }

    async fn end(&mut self) -> Result<(), ProcessError> {
        let started = Instant::now();
        let ended = match self.open.take() {
            Some(insert) => insert.end().await,
            None => Ok(0),
        };
        let events = std::mem::take(&mut self.open_events);
        match ended {
            Ok(rows) => {
                tracing::debug!(
                    rows,
                    end_ms = started.elapsed().as_millis() as u64,
                    "usage insert ended"
                );
                self.ended_last = events;
                Ok(())
            }
            Err(e) => Err(retriable(e)),
        }
    }

    fn abandon(&mut self) {
        self.open = None;
        self.open_events = EventIds::default();
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

    fn local_clickhouse() -> ClickHouse {
        let url = std::env::var("SLUICE_CLICKHOUSE__URL")
            .unwrap_or_else(|_| sluice_stores::clickhouse::ClickHouseConfig::default().url);
        ClickHouse::new(&sluice_stores::clickhouse::ClickHouseConfig {
            url,
            ..Default::default()
        })
    }

    /// A fresh tenant's events at `now_ms`, and how many of its rows are stored (without
    /// `FINAL`: a row stored twice counts twice).
    fn tenant_events(name: &str) -> (impl Fn(&str) -> UsageEvent, String, i64) {
        let now_ms = sluice_pipelines::now_ms();
        let tenant = format!("test-{name}-{}-{now_ms}", std::process::id());
        let of_tenant = {
            let tenant = tenant.clone();
            move |id: &str| UsageEvent {
                tenant_id: tenant.clone(),
                occurred_at_ms: now_ms,
                ..event(id)
            }
        };
        (of_tenant, tenant, now_ms)
    }

    async fn rows_of(clickhouse: &ClickHouse, tenant: &str, now_ms: i64) -> u64 {
        let rows = usage::totals_by_tenant_and_model(
            clickhouse,
            now_ms - 1000,
            now_ms + 1000,
            Some(tenant),
            usage::Rows::AsStored,
        )
        .await
        .unwrap();
        rows.iter().map(|r| r.requests).sum()
    }

    #[tokio::test]
    async fn an_insert_spanning_batches_stores_each_event_once_when_it_ends() {
        let clickhouse = local_clickhouse();
        let (of_tenant, tenant, now_ms) = tenant_events("spanning");
        let mut sink = UsageSink::new(clickhouse.clone());
        let first = [of_tenant("1"), of_tenant("2")];
        let second = [of_tenant("2"), of_tenant("3")];
        let third = [of_tenant("3"), of_tenant("4")];
        // The second batch is checked while the first is written: "2" is not stored yet.
        let checked_early = sink.check().check(&second).await.unwrap();
        assert!(checked_early.is_empty());
        assert_eq!(sink.write(&first, None).await.unwrap(), 2);
        assert_eq!(sink.write(&second, Some(checked_early)).await.unwrap(), 1);
        assert_eq!(
            rows_of(&clickhouse, &tenant, now_ms).await,
            0,
            "nothing before the end"
        );
        // The third is checked beside the end: it cannot see "3" either.
        let checked_early = sink.check().check(&third).await.unwrap();
        sink.end().await.unwrap();
        assert_eq!(rows_of(&clickhouse, &tenant, now_ms).await, 3);
        assert_eq!(sink.write(&third, Some(checked_early)).await.unwrap(), 1);
        sink.end().await.unwrap();
        // Redelivered, with a check of its own: nothing new.
        assert_eq!(sink.write(&third, None).await.unwrap(), 0);
        sink.end().await.unwrap();
        assert_eq!(
            rows_of(&clickhouse, &tenant, now_ms).await,
            4,
            "each event stored once, without FINAL"
        );
    }

    #[tokio::test]
    async fn an_abandoned_insert_stores_nothing_and_its_events_are_written_again() {
        let clickhouse = local_clickhouse();
        let (of_tenant, tenant, now_ms) = tenant_events("abandoned");
        let mut sink = UsageSink::new(clickhouse.clone());
        // Enough rows that the client has sent some of them to ClickHouse before the abort.
        let batch: Vec<UsageEvent> = (0..5_000).map(|i| of_tenant(&i.to_string())).collect();
        assert_eq!(sink.write(&batch, None).await.unwrap(), 5_000);
        sink.abandon();
        // ClickHouse has seen the insert aborted: what it took is not stored.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(rows_of(&clickhouse, &tenant, now_ms).await, 0);
        // Read again (as the sink loop does), the batch is new.
        assert_eq!(sink.write(&batch, None).await.unwrap(), 5_000);
        sink.end().await.unwrap();
        assert_eq!(rows_of(&clickhouse, &tenant, now_ms).await, 5_000);
    }

    #[test]
    fn duplicates_within_a_batch_and_stored_ids_are_skipped() {
        let batch = [event("a"), event("b"), event("a"), event("c")];
        let mut stored = EventIds::default();
        stored.insert("t", "b");
        let events = events_to_insert(&batch, &stored, &[&EventIds::default()]);
        let ids: Vec<_> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }
}
