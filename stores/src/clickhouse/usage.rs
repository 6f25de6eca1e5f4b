//! The usage facts, `usage_events`: one row per billable model call, written by the metering
//! sink and read by the edge's `/v1/usage`, budgets, previews and invoices. Every read counts a
//! redelivered event once: through `FINAL`, or plainly for a closed month merged into one part
//! ([`usage_slices`], [`compact_closed_months`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sluice_schemas::UsageEvent;

use super::ClickHouse;
use crate::Result;

/// The table.
pub const TABLE: &str = "usage_events";
/// Calls that failed before producing anything.
pub const FAILED_TABLE: &str = "failed_calls";

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
    /// The API key that made the request (empty for a user's session).
    pub key_id: String,
    /// The user whose session made the request (empty for an API key).
    pub user_id: String,
    /// Input tokens the provider served from its cache (a part of `input_tokens`).
    pub cached_input_tokens: u64,
    /// The request's W3C trace id (hex; empty when unknown).
    pub trace_id: String,
    /// How long the model call took (-1: not measured).
    pub latency_ms: i64,
    /// Why the call broke part-way (empty: it finished).
    pub outcome: String,
}

/// One row of `failed_calls`: a call that failed before producing anything.
#[derive(Debug, Clone, PartialEq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct FailedCallRow {
    pub event_id: String,
    pub request_id: String,
    pub tenant_id: String,
    pub model: String,
    pub provider: String,
    pub occurred_at: u32,
    pub occurred_at_ms: i64,
    pub latency_ms: i64,
    /// The error code.
    pub outcome: String,
    pub key_id: String,
    pub user_id: String,
    pub trace_id: String,
}

impl From<&UsageEvent> for FailedCallRow {
    fn from(e: &UsageEvent) -> Self {
        let row = UsageRowRef::from(e);
        Self {
            event_id: row.event_id.to_owned(),
            request_id: row.request_id.to_owned(),
            tenant_id: row.tenant_id.to_owned(),
            model: row.model.to_owned(),
            provider: row.provider.to_owned(),
            occurred_at: row.occurred_at,
            occurred_at_ms: row.occurred_at_ms,
            latency_ms: row.latency_ms,
            outcome: e.outcome.clone().unwrap_or_else(|| "unknown".into()),
            key_id: row.key_id.to_owned(),
            user_id: row.user_id.to_owned(),
            trace_id: row.trace_id.to_owned(),
        }
    }
}

impl From<&UsageEvent> for UsageRow {
    fn from(e: &UsageEvent) -> Self {
        let r = UsageRowRef::from(e);
        Self {
            event_id: r.event_id.to_owned(),
            request_id: r.request_id.to_owned(),
            tenant_id: r.tenant_id.to_owned(),
            model: r.model.to_owned(),
            provider: r.provider.to_owned(),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            occurred_at: r.occurred_at,
            occurred_at_ms: r.occurred_at_ms,
            key_id: r.key_id.to_owned(),
            user_id: r.user_id.to_owned(),
            cached_input_tokens: r.cached_input_tokens,
            trace_id: r.trace_id.to_owned(),
            latency_ms: r.latency_ms,
            outcome: r.outcome.to_owned(),
        }
    }
}

/// A [`UsageRow`] borrowed from its event: what the metering sink writes, without copying
/// the event's text.
#[derive(Debug, Clone, PartialEq, ::clickhouse::Row, Serialize)]
pub struct UsageRowRef<'a> {
    pub event_id: &'a str,
    pub request_id: &'a str,
    pub tenant_id: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub occurred_at: u32,
    pub occurred_at_ms: i64,
    pub key_id: &'a str,
    pub user_id: &'a str,
    pub cached_input_tokens: u64,
    pub trace_id: &'a str,
    pub latency_ms: i64,
    pub outcome: &'a str,
}

impl<'a> From<&'a UsageEvent> for UsageRowRef<'a> {
    fn from(e: &'a UsageEvent) -> Self {
        Self {
            event_id: &e.event_id,
            request_id: &e.request_id,
            tenant_id: &e.tenant_id,
            model: &e.model,
            provider: &e.provider,
            input_tokens: u64::try_from(e.input_tokens).unwrap_or(0),
            output_tokens: u64::try_from(e.output_tokens).unwrap_or(0),
            occurred_at: event_second(e),
            occurred_at_ms: e.occurred_at_ms,
            key_id: e.key_id.as_deref().unwrap_or_default(),
            user_id: e.user_id.as_deref().unwrap_or_default(),
            cached_input_tokens: e
                .cached_input_tokens
                .and_then(|c| u64::try_from(c).ok())
                .unwrap_or(0),
            trace_id: e.trace_id.as_deref().unwrap_or_default(),
            latency_ms: e.latency_ms.unwrap_or(-1),
            outcome: e.outcome.as_deref().unwrap_or_default(),
        }
    }
}

/// The event's time as the facts' `occurred_at` (`DateTime`, seconds) has it.
fn event_second(e: &UsageEvent) -> u32 {
    u32::try_from(e.occurred_at_ms.div_euclid(1000)).unwrap_or(0)
}

/// An `INSERT` into the facts that stays open while rows are written to it, batch after batch:
/// ClickHouse parses the rows as they come and stores them when it ends, as one part of the
/// table (and one of each rollup view) however many batches it took. Its rows are stored only
/// if [`EventsInsert::end`] succeeds; dropped, it is aborted and stores none of them, as long as
/// it holds fewer rows than one insert block (`max_insert_block_size`, 1,048,576 by default:
/// ClickHouse writes each full block as it goes).
pub struct EventsInsert {
    insert: ::clickhouse::insert::Insert<UsageRowRef<'static>>,
    rows: usize,
}

impl EventsInsert {
    /// Starts an insert.
    pub async fn open(clickhouse: &ClickHouse) -> Result<Self> {
        let insert = clickhouse.client().insert::<UsageRowRef>(TABLE).await?;
        Ok(Self { insert, rows: 0 })
    }

    /// Writes `events`, each straight from its event; returns how many. After an error the
    /// insert is broken: drop it.
    pub async fn write(&mut self, events: &[&UsageEvent]) -> Result<usize> {
        for event in events {
            self.insert.write(&UsageRowRef::from(*event)).await?;
        }
        self.rows += events.len();
        Ok(events.len())
    }

    /// Ends the insert: once this returns, its rows are stored. Returns how many.
    pub async fn end(self) -> Result<usize> {
        self.insert.end().await?;
        Ok(self.rows)
    }
}

/// Event ids per tenant (an event is `(tenant_id, event_id)`, the facts' sort key: two tenants'
/// ids never match each other).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventIds(HashMap<String, HashSet<String>>);

impl EventIds {
    /// Whether `tenant_id`'s `event_id` is here.
    pub fn contains(&self, tenant_id: &str, event_id: &str) -> bool {
        self.0
            .get(tenant_id)
            .is_some_and(|ids| ids.contains(event_id))
    }

    /// Adds `tenant_id`'s `event_id`.
    pub fn insert(&mut self, tenant_id: &str, event_id: &str) {
        match self.0.get_mut(tenant_id) {
            Some(ids) => {
                ids.insert(event_id.to_owned());
            }
            None => {
                self.0
                    .insert(tenant_id.to_owned(), HashSet::from([event_id.to_owned()]));
            }
        }
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.0.values().map(HashSet::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.values().all(HashSet::is_empty)
    }

    /// Every event, as `(tenant_id, event_id)`, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|(tenant, ids)| ids.iter().map(move |id| (tenant.as_str(), id.as_str())))
    }
}

/// Which of `events` are already stored: one query for the whole batch, the ids sent as
/// a table beside it (parsing them as literals in the query cost ClickHouse 18.16 about 7 µs an
/// id, and bounded the query's size). `(tenant_id, event_id)` is the table's sort key, so the
/// lookup reads only the index granules that can hold the ids asked about; and an event's
/// time is part of it (a usage event's `occurred_at_ms` is when the edge took its request,
/// the same however often it is delivered or its call re-run), so only parts of the table
/// whose times overlap the batch's are looked at. Tenants and ids are matched as two sets (a
/// third faster than one set of pairs) and the pairs checked here.
pub async fn stored_event_ids<'a>(
    clickhouse: &ClickHouse,
    events: impl IntoIterator<Item = &'a UsageEvent>,
) -> Result<EventIds> {
    let mut asked: HashSet<(&str, &str)> = HashSet::new();
    let (mut first_s, mut last_s) = (u32::MAX, 0u32);
    for e in events {
        asked.insert((e.tenant_id.as_str(), e.event_id.as_str()));
        let at = event_second(e);
        first_s = first_s.min(at);
        last_s = last_s.max(at);
    }
    if asked.is_empty() {
        return Ok(EventIds::default());
    }
    let found: Vec<StoredId> = clickhouse
        .query_with_table(
            &format!(
                "SELECT tenant_id, event_id FROM {TABLE} \
                  WHERE occurred_at >= toDateTime({first_s}) AND occurred_at <= toDateTime({last_s}) \
                    AND tenant_id IN (SELECT tenant_id FROM asked) \
                    AND event_id IN (SELECT event_id FROM asked) \
                  FORMAT JSONEachRow"
            ),
            ("asked", "tenant_id String, event_id String"),
            asked.iter().map(|(tenant_id, event_id)| StoredIdRef {
                tenant_id,
                event_id,
            }),
        )
        .await?;
    let mut stored = EventIds::default();
    for f in found {
        if asked.contains(&(f.tenant_id.as_str(), f.event_id.as_str())) {
            stored.insert(&f.tenant_id, &f.event_id);
        }
    }
    Ok(stored)
}

/// An event already in the table.
#[derive(Debug, Deserialize)]
struct StoredId {
    tenant_id: String,
    event_id: String,
}

/// An event asked about.
#[derive(Debug, Serialize)]
struct StoredIdRef<'a> {
    tenant_id: &'a str,
    event_id: &'a str,
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

/// Usage summed between moments at which a price changes (and, if asked, per key and day):
/// every fact in one slice has one price.
#[derive(Debug, Clone, PartialEq, Eq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct UsageSlice {
    pub tenant_id: String,
    pub model: String,
    /// The month of the slice's facts (UTC), `YYYYMM`.
    pub month: u32,
    /// How many of the price changes given are at or before the slice's facts: slice `k`
    /// lies between change `k - 1` (or the month's start) and change `k` (or its end).
    pub segment: u32,
    /// The key (or, for a session, the user) and UTC day, when asked for; otherwise empty
    /// and 0.
    pub caller: String,
    pub day: u32,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

/// Which facts [`usage_slices`] reads, and how it splits them.
#[derive(Debug, Clone)]
pub struct SliceQuery<'a> {
    /// Event time range, Unix milliseconds, `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Moments (ascending) at which prices change inside the range.
    pub price_changes: &'a [i64],
    /// Only these tenants (`None`: all).
    pub tenants: Option<&'a [String]>,
    /// Also split per key (or user) and UTC day (days since 1970-01-01).
    pub by_key_and_day: bool,
    /// Leave out these requests.
    pub excluding: &'a [String],
}

/// The usage facts in a range, summed per tenant, model, month and slice between price
/// changes.
///
/// Exact whatever is stored twice, without paying for `FINAL` where it is not needed: a month
/// whose partition is one merged part (see [`compact_closed_months`]) holds each event once
/// and is read plainly; every other month goes through `FINAL`; both reads run at once. The
/// partitions are looked at before and after: if a merged month changed meanwhile (late usage
/// landed in it) or a month gained its first rows, the whole range is read again through
/// `FINAL`.
pub async fn usage_slices(
    clickhouse: &ClickHouse,
    query: &SliceQuery<'_>,
) -> Result<Vec<UsageSlice>> {
    let Some(months) = month_window(query.from_ms, query.to_ms) else {
        return read_slices(clickhouse, query, Rows::Deduplicated, None, None).await;
    };
    let before = partitions(clickhouse, months).await?;
    let (merged, unmerged): (Vec<&Partition>, Vec<&Partition>) =
        before.values().partition(|p| p.merged);
    if merged.is_empty() {
        return read_slices(clickhouse, query, Rows::Deduplicated, None, None).await;
    }
    let merged_months: Vec<u32> = merged.iter().map(|p| p.month).collect();
    let unmerged_months: Vec<u32> = unmerged.iter().map(|p| p.month).collect();
    let plain = read_by_month(clickhouse, query, &merged_months);
    let deduplicated = async {
        if unmerged_months.is_empty() {
            return Ok(Vec::new());
        }
        read_slices(
            clickhouse,
            query,
            Rows::Deduplicated,
            Some(&unmerged_months),
            None,
        )
        .await
    };
    let (mut slices, rest) = tokio::try_join!(plain, deduplicated)?;
    // Unmerged months may merge meanwhile (FINAL read one consistent set of their parts); a
    // merged month that changed, or a month that gained its first rows, was not read right.
    let after = partitions(clickhouse, months).await?;
    let unchanged = after.keys().all(|m| before.contains_key(m))
        && merged.iter().all(|p| after.get(&p.month) == Some(*p));
    if !unchanged {
        return read_slices(clickhouse, query, Rows::Deduplicated, None, None).await;
    }
    slices.extend(rest);
    Ok(slices)
}

/// Reads the slices of `query` from the merged partitions of `months` plainly, one UTC month
/// of the range at a time, each query told its month rather than working it out for every
/// row (which, with the grouping by it, cost a tenth of the read). A UTC month is read where a
/// partition of `months` could hold its facts (the partition key is in the server's time
/// zone): the month itself or one either side. The months' reads run at once.
async fn read_by_month(
    clickhouse: &ClickHouse,
    query: &SliceQuery<'_>,
    months: &[u32],
) -> Result<Vec<UsageSlice>> {
    use crate::billing::Period;
    let mut reads = Vec::new();
    let mut month = Period::containing(query.from_ms);
    while month.start_ms() < query.to_ms {
        let near = [month.previous(), month, month.next()]
            .iter()
            .any(|m| months.contains(&m.yyyymm()));
        if near {
            let within = SliceQuery {
                from_ms: query.from_ms.max(month.start_ms()),
                to_ms: query.to_ms.min(month.end_ms()),
                ..query.clone()
            };
            reads.push(async move {
                read_slices(
                    clickhouse,
                    &within,
                    Rows::AsStored,
                    Some(months),
                    Some(month.yyyymm()),
                )
                .await
            });
        }
        let next = month.next();
        if next == month {
            // The calendar's last month: nothing after it.
            break;
        }
        month = next;
    }
    let read = futures::future::try_join_all(reads).await?;
    Ok(read.into_iter().flatten().collect())
}

/// Reads the slices of `query` through `rows`, from the partitions of `months` only (or all);
/// `utc_month`: the UTC month (`YYYYMM`) the whole range lies in, when it does.
async fn read_slices(
    clickhouse: &ClickHouse,
    query: &SliceQuery<'_>,
    rows: Rows,
    months: Option<&[u32]>,
    utc_month: Option<u32>,
) -> Result<Vec<UsageSlice>> {
    let tenant_filter = if query.tenants.is_some() {
        " AND tenant_id IN (SELECT arrayJoin(?))"
    } else {
        ""
    };
    // An empty array literal has no element type on older servers: no filter instead.
    let excluding = if query.excluding.is_empty() {
        ""
    } else {
        " AND NOT has(?, request_id)"
    };
    // Numbers of our own making: the condition on the partition key lets ClickHouse skip
    // every other partition before reading (and before merging, through FINAL).
    let partition_filter = months.map_or_else(String::new, |months| {
        let listed: Vec<String> = months.iter().map(u32::to_string).collect();
        format!(" AND toYYYYMM(occurred_at) IN ({})", listed.join(", "))
    });
    // With no price change in the range (the usual case) there is one slice per month.
    let segment = if query.price_changes.is_empty() {
        "toUInt32(0)"
    } else {
        "toUInt32(arrayCount(b -> b <= occurred_at_ms, ?))"
    };
    let (key, day) = if query.by_key_and_day {
        (
            "if(key_id != '', key_id, user_id)",
            "toUInt32(intDiv(occurred_at_ms, 86400000))",
        )
    } else {
        ("''", "toUInt32(0)")
    };
    let final_ = match rows {
        Rows::Deduplicated => " FINAL",
        Rows::AsStored => "",
    };
    // `occurred_at` (seconds) bounds pick the monthly partitions; `occurred_at_ms` the exact
    // range, unless it starts and ends on whole seconds (months, days), when the seconds are
    // exact and the milliseconds need not be read at all (a tenth of a month's read).
    // (ClickHouse 18.16 reads no column that only a lambda names: the slicing by price
    // changes needs the milliseconds named outside it.)
    let whole_seconds =
        query.from_ms % 1000 == 0 && query.to_ms % 1000 == 0 && query.price_changes.is_empty();
    let exact_range = if whole_seconds {
        ""
    } else {
        " AND occurred_at_ms >= ? AND occurred_at_ms < ?"
    };
    let month = utc_month.map_or_else(
        || "toYYYYMM(occurred_at, 'UTC')".to_owned(),
        |m| format!("toUInt32({m})"),
    );
    // Constants need no grouping: only what varies from row to row is grouped by.
    let mut grouped = vec!["tenant_id", "model"];
    if utc_month.is_none() {
        grouped.push("month");
    }
    if !query.price_changes.is_empty() {
        grouped.push("segment");
    }
    if query.by_key_and_day {
        grouped.extend(["caller", "day"]);
    }
    let grouped = grouped.join(", ");
    let sql = format!(
        "SELECT tenant_id, model, {month} AS month, {segment} AS segment, \
                {key} AS caller, {day} AS day, count() AS requests, \
                sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
                sum(cached_input_tokens) AS cached_input_tokens \
           FROM {TABLE}{final_} \
          WHERE occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?)\
                {exact_range}{partition_filter}{tenant_filter}{excluding} \
          GROUP BY {grouped}"
    );
    let from_s = u32::try_from(query.from_ms.div_euclid(1000)).unwrap_or(0);
    let to_s = query.to_ms.div_euclid(1000) + i64::from(!whole_seconds);
    let to_s = u32::try_from(to_s).unwrap_or(u32::MAX);
    let mut select = clickhouse.client().query(&sql);
    if !query.price_changes.is_empty() {
        select = select.bind(query.price_changes);
    }
    select = select.bind(from_s).bind(to_s);
    if !whole_seconds {
        select = select.bind(query.from_ms).bind(query.to_ms);
    }
    if let Some(tenants) = query.tenants {
        select = select.bind(tenants);
    }
    if !query.excluding.is_empty() {
        select = select.bind(query.excluding);
    }
    Ok(select.fetch_all::<UsageSlice>().await?)
}

/// One month's partition of the facts as ClickHouse holds it at a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `YYYYMM`, in the server's time zone (the table's partition key).
    pub month: u32,
    /// Its active parts, by name (a part never changes; a merge or insert makes a new name).
    pub parts: Vec<String>,
    /// One part written by a merge: every event in it once, so it reads the same without
    /// `FINAL`. (An insert's part is not merged, even alone.)
    pub merged: bool,
}

/// An active part of the table, as `system.parts` lists it.
#[derive(Debug, ::clickhouse::Row, Deserialize)]
struct ActivePart {
    partition: String,
    name: String,
    level: u32,
}

/// The partitions of the facts holding rows, for months (`YYYYMM`) in `window` (inclusive).
pub async fn partitions(
    clickhouse: &ClickHouse,
    (first, last): (u32, u32),
) -> Result<BTreeMap<u32, Partition>> {
    let parts: Vec<ActivePart> = clickhouse
        .client()
        .query(
            "SELECT partition, name, level FROM system.parts \
              WHERE database = currentDatabase() AND table = ? AND active \
                AND partition >= ? AND partition <= ? \
              ORDER BY partition, name",
        )
        .bind(TABLE)
        .bind(format!("{first:06}"))
        .bind(format!("{last:06}"))
        .fetch_all()
        .await?;
    let mut partitions: BTreeMap<u32, Partition> = BTreeMap::new();
    for part in parts {
        // A partition of another key than ours would not parse: then nothing reads plainly.
        let Ok(month) = part.partition.trim_matches('\'').parse::<u32>() else {
            return Ok(BTreeMap::new());
        };
        if month < first || month > last {
            continue;
        }
        let partition = partitions.entry(month).or_insert_with(|| Partition {
            month,
            parts: Vec::new(),
            merged: true,
        });
        partition.parts.push(part.name);
        partition.merged = partition.parts.len() == 1 && part.level > 0;
    }
    Ok(partitions)
}

/// The months (`YYYYMM`) whose partitions can hold facts of `[from_ms, to_ms)`: its UTC
/// months and one either side, since the partition key is in the server's time zone. `None`
/// for a range beyond the calendar.
fn month_window(from_ms: i64, to_ms: i64) -> Option<(u32, u32)> {
    use crate::billing::Period;
    let month =
        |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|_| Period::containing(ms));
    let (first, last) = (month(from_ms)?, month(to_ms.saturating_sub(1))?);
    Some((first.previous().yyyymm(), last.next().yyyymm()))
}

/// Merges into one part each partition of a month that ended at least `grace_s` seconds ago
/// (by the server's clock) whose facts are not yet in one merged part, so reads of it need no
/// `FINAL`. Returns the months merged. Late usage for such a month makes a new part, and the
/// month is read through `FINAL` until the next compaction.
pub async fn compact_closed_months(clickhouse: &ClickHouse, grace_s: u32) -> Result<Vec<u32>> {
    let closed_before: u32 = clickhouse
        .client()
        .query("SELECT toYYYYMM(now() - ?)")
        .bind(grace_s)
        .fetch_one()
        .await?;
    let closed = (0, closed_before.saturating_sub(1));
    let candidates: Vec<u32> = partitions(clickhouse, closed)
        .await?
        .into_values()
        .filter(|p| !p.merged)
        .map(|p| p.month)
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    for &month in &candidates {
        compact_month(clickhouse, month).await?;
    }
    // `OPTIMIZE` says nothing when a background merge held the parts: ask what is merged now.
    let now = partitions(clickhouse, closed).await?;
    Ok(candidates
        .into_iter()
        .filter(|m| now.get(m).is_some_and(|p| p.merged))
        .collect())
}

/// Merges one month's (`YYYYMM`) facts into one part, keeping one row per event. (If a
/// background merge holds its parts, nothing happens: the next look does it.)
pub async fn compact_month(clickhouse: &ClickHouse, yyyymm: u32) -> Result<()> {
    clickhouse
        .client()
        .query(&format!("OPTIMIZE TABLE {TABLE} PARTITION {yyyymm} FINAL"))
        .execute()
        .await?;
    Ok(())
}

/// Usage of one tenant and model.
#[derive(Debug, Clone, PartialEq, Eq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct TenantModelUsage {
    pub tenant_id: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

/// How a read treats an event stored twice whose rows have not merged yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Once (`FINAL`): what billing needs.
    Deduplicated,
    /// As stored: what a hand-written `GROUP BY` reads, right while no event is stored twice.
    AsStored,
}

/// Every tenant's (or one's) usage per model for events in `[from_ms, to_ms)`: one `GROUP BY`.
pub async fn totals_by_tenant_and_model(
    clickhouse: &ClickHouse,
    from_ms: i64,
    to_ms: i64,
    tenant: Option<&str>,
    rows: Rows,
) -> Result<Vec<TenantModelUsage>> {
    let final_ = match rows {
        Rows::Deduplicated => " FINAL",
        Rows::AsStored => "",
    };
    Ok(clickhouse
        .client()
        .query(&format!(
            "SELECT tenant_id, model, count() AS requests, sum(input_tokens) AS input_tokens, \
                    sum(output_tokens) AS output_tokens, \
                    sum(cached_input_tokens) AS cached_input_tokens \
               FROM {TABLE}{final_} \
              WHERE occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
                AND occurred_at_ms >= ? AND occurred_at_ms < ? AND (? = '' OR tenant_id = ?) \
              GROUP BY tenant_id, model"
        ))
        .bind(u32::try_from(from_ms.div_euclid(1000)).unwrap_or(0))
        .bind(u32::try_from(to_ms.div_euclid(1000) + 1).unwrap_or(u32::MAX))
        .bind(from_ms)
        .bind(to_ms)
        .bind(tenant.unwrap_or_default())
        .bind(tenant.unwrap_or_default())
        .fetch_all::<TenantModelUsage>()
        .await?)
}

/// Usage of one tenant as the per-minute rollup (`tenant_usage_1m`) has it.
#[derive(Debug, Clone, PartialEq, Eq, ::clickhouse::Row, Serialize, Deserialize)]
pub struct RolledUp {
    pub tenant_id: String,
    pub requests: u64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// Every tenant's (or one's) usage in the per-minute rollup, for windows starting in
/// `[from_ms, to_ms)`.
pub async fn rollup_by_tenant(
    clickhouse: &ClickHouse,
    from_ms: i64,
    to_ms: i64,
    tenant: Option<&str>,
) -> Result<Vec<RolledUp>> {
    Ok(clickhouse
        .client()
        .query(
            "SELECT tenant_id, sum(requests) AS requests, sum(input_tokens) AS input_tokens, \
                    sum(output_tokens) AS output_tokens \
               FROM tenant_usage_1m FINAL \
              WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) \
                AND (? = '' OR tenant_id = ?) \
              GROUP BY tenant_id",
        )
        .bind(u32::try_from(from_ms.div_euclid(1000)).unwrap_or(0))
        .bind(u32::try_from(to_ms.div_euclid(1000)).unwrap_or(u32::MAX))
        .bind(tenant.unwrap_or_default())
        .bind(tenant.unwrap_or_default())
        .fetch_all::<RolledUp>()
        .await?)
}

/// Synthetic usage for benchmarks, made inside ClickHouse: `events` facts spread over
/// `tenants` (in turn) and `models`, at times spread over `[from_ms, from_ms + span_ms)`,
/// with ids starting `id_prefix`.
pub struct SyntheticUsage<'a> {
    pub id_prefix: &'a str,
    pub tenants: &'a [String],
    /// The first model gets four fifths of the events, the second the rest.
    pub models: [&'a str; 2],
    pub events: u64,
    pub from_ms: i64,
    pub span_ms: i64,
}

/// Writes [`SyntheticUsage`] (one `INSERT … SELECT`, no rows through the client).
pub async fn fill_synthetic(clickhouse: &ClickHouse, usage: &SyntheticUsage<'_>) -> Result<()> {
    if usage.tenants.is_empty() || usage.span_ms <= 0 {
        return Err(crate::Error::Invalid(
            "synthetic usage needs tenants and a time span".into(),
        ));
    }
    clickhouse
        .client()
        .query(&format!(
            "INSERT INTO {TABLE} (event_id, request_id, tenant_id, model, provider, input_tokens, \
                    output_tokens, occurred_at, occurred_at_ms, key_id) \
             SELECT concat(?, toString(number)), concat(?, toString(number)), \
                    arrayElement(?, (number % ?) + 1), if(intDiv(number, ?) % 5 = 0, ?, ?), 'sim', \
                    100 + number % 900, 10 + number % 300, toDateTime(intDiv(at, 1000)), at, 'synthetic' \
               FROM (SELECT number, ? + (number * 7919) % ? AS at FROM system.numbers LIMIT ?)"
        ))
        .bind(format!("{}-e", usage.id_prefix))
        .bind(format!("{}-r", usage.id_prefix))
        .bind(usage.tenants)
        .bind(usage.tenants.len() as u64)
        .bind(usage.tenants.len() as u64)
        .bind(usage.models[1])
        .bind(usage.models[0])
        .bind(usage.from_ms)
        .bind(usage.span_ms)
        .bind(usage.events)
        .execute()
        .await?;
    Ok(())
}

/// Drops every fact of one month (`YYYYMM`, the table's partition): for a benchmark's own
/// month of the distant past, never for a month anyone bills.
pub async fn drop_month(clickhouse: &ClickHouse, yyyymm: u32) -> Result<()> {
    clickhouse
        .client()
        .query(&format!("ALTER TABLE {TABLE} DROP PARTITION {yyyymm}"))
        .execute()
        .await?;
    Ok(())
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
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
        };
        let row = UsageRow::from(&event);
        assert_eq!(row.occurred_at, 1_700_000_000);
        assert_eq!(row.occurred_at_ms, 1_700_000_000_123);
        assert_eq!((row.input_tokens, row.output_tokens), (3, 0));
    }

    /// A usage event of `tenant` on `sim-small`, one token each way.
    fn one_token_each_way(tenant: &str, event_id: &str, request_id: &str) -> UsageEvent {
        UsageEvent {
            event_id: event_id.into(),
            request_id: request_id.into(),
            tenant_id: tenant.into(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 1,
            output_tokens: 1,
            occurred_at_ms: 1_796_572_800_000,
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
    async fn stored_ids_are_found_whatever_characters_they_hold_and_only_for_their_tenant() {
        let clickhouse = local_clickhouse();
        let tenant = format!("test-{}", uuid::Uuid::new_v4().simple());
        let event = |id: &str, tenant: &str| one_token_each_way(tenant, id, "r");
        // Ids a producer could put on the topic: quotes, tabs, newlines, backslashes, unicode.
        let odd = ["plain:0", "quote' \" :0", "tab\tnew\nline\\:0", "ünï:0"];
        let stored: Vec<UsageRow> = odd
            .iter()
            .map(|id| UsageRow::from(&event(id, &tenant)))
            .collect();
        clickhouse.insert_rows(TABLE, &stored).await.unwrap();
        let other = format!("test-{}", uuid::Uuid::new_v4().simple());
        let mut asked: Vec<UsageEvent> = odd.iter().map(|id| event(id, &tenant)).collect();
        asked.push(event("absent:0", &tenant));
        asked.push(event("plain:0", &other));
        let found = stored_event_ids(&clickhouse, &asked).await.unwrap();
        assert!(found.iter().all(|(t, _)| t == tenant));
        let mut found: Vec<&str> = found.iter().map(|(_, id)| id).collect();
        found.sort_unstable();
        let mut expected = odd.to_vec();
        expected.sort_unstable();
        assert_eq!(found, expected);
        let none = stored_event_ids(&clickhouse, &[event("plain:0", &other)])
            .await
            .unwrap();
        assert!(none.is_empty(), "another tenant's id is not this one's");
        assert!(stored_event_ids(&clickhouse, &[]).await.unwrap().is_empty());
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
            key_id: String::new(),
            user_id: String::new(),
            cached_input_tokens: 0,
            trace_id: String::new(),
            latency_ms: -1,
            outcome: String::new(),
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
        let event = |tenant: &str, id: &str| one_token_each_way(tenant, &format!("{run}-{id}"), id);
        let stored = [event(&a, "1"), event(&b, "2")];
        let rows: Vec<UsageRow> = stored.iter().map(UsageRow::from).collect();
        clickhouse.insert_rows(TABLE, &rows).await.unwrap();
        let batch = [event(&a, "1"), event(&a, "3"), event(&b, "2")];
        let found = stored_event_ids(&clickhouse, &batch).await.unwrap();
        let mut found: Vec<(&str, &str)> = found.iter().collect();
        found.sort();
        let (one, two) = (format!("{run}-1"), format!("{run}-2"));
        assert_eq!(
            found,
            [(a.as_str(), one.as_str()), (b.as_str(), two.as_str())]
        );
        // An id stored under another tenant of the same batch is not this event's.
        let crossed = [event(&b, "1"), event(&a, "3")];
        let found = stored_event_ids(&clickhouse, &crossed).await.unwrap();
        assert!(found.is_empty(), "{found:?}");
        assert!(stored_event_ids(&clickhouse, &[]).await.unwrap().is_empty());
    }

    #[test]
    fn the_month_window_reaches_one_month_either_side() {
        use crate::billing::Period;
        let november = Period::parse("2026-11").unwrap();
        assert_eq!(
            month_window(november.start_ms(), november.end_ms()),
            Some((202610, 202612))
        );
        let january = Period::parse("2027-01").unwrap();
        assert_eq!(
            month_window(november.start_ms(), january.end_ms()),
            Some((202610, 202702))
        );
        assert_eq!(month_window(0, i64::MAX), None);
    }

    #[tokio::test]
    async fn a_merged_month_reads_plainly_and_every_month_counts_each_event_once() {
        use crate::billing::Period;
        let clickhouse = local_clickhouse();
        let tenant = format!("test-{}", uuid::Uuid::new_v4().simple());
        // A month of the 1970s of this test's own (others use the present or the 1980s).
        let nth = uuid::Uuid::new_v4().as_u128() % 100;
        let month = Period::parse(&format!("{}-{:02}", 1971 + nth / 12, 1 + nth % 12)).unwrap();
        let next = month.next();
        let event = |id: &str, at: Period| UsageEvent {
            occurred_at_ms: at.start_ms() + 3_600_000,
            ..one_token_each_way(&tenant, id, id)
        };
        let insert = |events: Vec<UsageEvent>| {
            let clickhouse = clickhouse.clone();
            async move {
                let rows: Vec<UsageRow> = events.iter().map(UsageRow::from).collect();
                clickhouse.insert_rows(TABLE, &rows).await.unwrap();
            }
        };
        let requests_between = |from_ms: i64, to_ms: i64| {
            let (clickhouse, tenants) = (clickhouse.clone(), vec![tenant.clone()]);
            async move {
                let query = SliceQuery {
                    from_ms,
                    to_ms,
                    price_changes: &[],
                    tenants: Some(&tenants),
                    by_key_and_day: false,
                    excluding: &[],
                };
                let slices = usage_slices(&clickhouse, &query).await.unwrap();
                slices.iter().map(|s| s.requests).sum::<u64>()
            }
        };
        let requests = |from: Period, to: Period| requests_between(from.start_ms(), to.end_ms());
        let merged = |at: Period| {
            let clickhouse = clickhouse.clone();
            async move {
                let window = (at.yyyymm(), at.yyyymm());
                partitions(&clickhouse, window).await.unwrap()[&at.yyyymm()].merged
            }
        };
        // Merged into one part by compaction (a background merge may get there first, or
        // hold the parts for a moment: look again until it is done).
        let compact = |months: Vec<Period>| {
            let clickhouse = clickhouse.clone();
            async move {
                for _ in 0..50 {
                    compact_closed_months(&clickhouse, 0).await.unwrap();
                    let mut all = true;
                    for &m in &months {
                        all &= merged(m).await;
                    }
                    if all {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                panic!("{months:?} not merged into one part");
            }
        };
        // Two inserts, one event in both: two parts (until merged), read through FINAL.
        insert(vec![event("a", month), event("b", month)]).await;
        insert(vec![event("a", month)]).await;
        assert_eq!(requests(month, month).await, 2);
        // Closed long ago: compaction merges it into one part, read plainly, still once each.
        compact(vec![month]).await;
        assert_eq!(requests(month, month).await, 2);
        // A merged month beside one that is not: each read its way, both counted once.
        insert(vec![event("c", next)]).await;
        insert(vec![event("c", next), event("d", next)]).await;
        assert_eq!(requests(month, next).await, 4);
        // Late usage in the merged month (here a redelivery): a new part, still once.
        insert(vec![event("b", month)]).await;
        assert_eq!(requests(month, next).await, 4);
        compact(vec![month, next]).await;
        // A range that does not start or end on a whole second is cut to the millisecond.
        let at = month.start_ms() + 3_600_000;
        assert_eq!(requests_between(at, at + 1).await, 2);
        assert_eq!(requests_between(at + 1, next.end_ms()).await, 2);
        assert_eq!(requests_between(at - 1, at).await, 0);
        assert_eq!(requests(month, next).await, 4);
    }
}
