//! The SQL operator: records into per-partition event-time windows, folded into the state of
//! the query's aggregates as they come ([`WindowQuery`]), each window finished when its
//! partition's watermark passes its end, written out, and let go once past its lateness.
//! Offsets of records a window still holds are not committed.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    marker::PhantomData,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use sluice_pipelines::{
    config::Wiring,
    metrics::Metrics,
    runtime::{Input, LaneBy, StageSpec},
    BatchError, Emitter, Operator, ProcessError, RecordContext,
};
use sluice_schemas::Record;
use sluice_stores::{ModelCatalog, ModelSpec};

use crate::{
    output::Written,
    plan::WindowQuery,
    table::{Cell, Row},
    Output, Pipeline, Result,
};

/// One window of one source partition.
struct WindowState {
    /// What the window keeps of its records: the partial states of the query's aggregates, or
    /// the rows themselves when the query cannot be run in stages.
    kept: Vec<RecordBatch>,
    /// Rows in `kept`.
    kept_rows: usize,
    /// Records folded in.
    records: u64,
    /// Lowest offset among the records: the runtime commits no further while the window lives.
    first_offset: i64,
    /// Records the window had when last emitted.
    emitted: Option<u64>,
}

/// The records of one batch bound for one window.
struct Arrivals<'a> {
    rows: Vec<&'a [Cell]>,
    contexts: Vec<&'a RecordContext>,
}

/// Batches a window keeps before they are merged into one.
const COMPACT_AFTER: usize = 8;

/// ClickHouse writes a lane lets run while it goes on folding records; the next emission waits
/// for the oldest to finish. One is enough to keep the lane busy (windows close far apart next
/// to a write's few milliseconds), and while the store is down or slow, a lane is held up by
/// its first window that cannot be written: it takes only the records before the next window
/// closes before it stops taking any (the store's own retries take seconds).
const MAX_WRITES_IN_FLIGHT: usize = 1;

/// A write of emitted windows that is still running: which windows, with how many records each
/// had when emitted. They count as emitted (and can be let go) only once it succeeds; until
/// then they keep their offsets from being committed, like any window not yet written.
struct InFlight {
    windows: Vec<((i32, i64), u64)>,
    task: tokio::task::JoinHandle<Result<usize, ProcessError>>,
}

/// Runs a [`Pipeline`] over records of type `T`; one instance per lane, lanes by partition.
pub struct SqlOperator<T> {
    pipeline: Arc<Pipeline>,
    output: Arc<Output>,
    catalog: Option<Arc<ModelCatalog>>,
    /// The query, planned for this lane on its first batch.
    query: Option<Arc<WindowQuery>>,
    /// Open windows by (source partition, window start).
    windows: BTreeMap<(i32, i64), WindowState>,
    watermarks: HashMap<i32, i64>,
    /// Per partition, the highest offset already taken into the windows.
    placed_up_to: HashMap<i32, i64>,
    /// Event times of the batch being processed, so the runtime's watermark pass does not read
    /// each record again.
    batch_event_times: HashMap<(i32, i64), i64>,
    /// Rows kept in all windows, against `max_held_rows`.
    held_rows: usize,
    max_held_rows: usize,
    /// Whether the last write of window rows failed.
    failing: bool,
    /// ClickHouse writes of emitted windows still running, oldest first.
    writes: VecDeque<InFlight>,
    late: prometheus::IntCounter,
    held: prometheus::IntGauge,
    failed_windows: prometheus::IntCounter,
    rows_out: prometheus::IntCounter,
    _record: PhantomData<fn() -> T>,
}

impl<T> SqlOperator<T> {
    /// An operator for `pipeline` writing to `output`; `catalog` provides the `models` table.
    pub fn new(
        pipeline: Arc<Pipeline>,
        output: Arc<Output>,
        catalog: Option<Arc<ModelCatalog>>,
        metrics: &Metrics,
        stage: &str,
    ) -> Self {
        Self {
            late: metrics.late_records.with_label_values(&[stage]),
            held: metrics.window_held_rows.with_label_values(&[stage]),
            failed_windows: metrics.window_failures.with_label_values(&[stage]),
            rows_out: metrics.window_rows.with_label_values(&[stage]),
            pipeline,
            output,
            catalog,
            query: None,
            windows: BTreeMap::new(),
            watermarks: HashMap::new(),
            placed_up_to: HashMap::new(),
            batch_event_times: HashMap::new(),
            held_rows: 0,
            max_held_rows: DEFAULT_MAX_HELD_ROWS,
            failing: false,
            writes: VecDeque::new(),
            _record: PhantomData,
        }
    }

    /// Rows kept beyond which, while writes fail, the operator takes no more records (memory
    /// stays bounded through a store outage; the records wait in the topic).
    pub fn with_max_held_rows(mut self, rows: usize) -> Self {
        self.max_held_rows = rows.max(1);
        self
    }

    /// The query planned for this lane (checked at start-up, so planning again succeeds).
    async fn query(&mut self) -> Result<Arc<WindowQuery>> {
        if let Some(query) = &self.query {
            return Ok(query.clone());
        }
        let query = Arc::new(WindowQuery::plan(&self.pipeline).await?);
        self.query = Some(query.clone());
        Ok(query)
    }

    fn models(&self) -> Arc<Vec<ModelSpec>> {
        self.catalog
            .as_ref()
            .map_or_else(Arc::default, |c| c.snapshot())
    }

    /// Folds the records of one batch bound for the window `key` into it. Records the query
    /// cannot take (an expression failing on their values) go to the DLQ with the reason.
    async fn fold(
        &mut self,
        query: &WindowQuery,
        key: (i32, i64),
        arrivals: Arrivals<'_>,
        rejected: &mut HashSet<i64>,
        out: &mut Emitter,
    ) {
        let models = self.models();
        let (start, end) = (
            key.1,
            key.1.saturating_add(self.pipeline.query.window.size_ms()),
        );
        let columns = &self.pipeline.columns;
        let all = columns.batch(arrivals.rows.iter().map(|r| (*r, start, end)));
        let folded = match all {
            Ok(batch) => query.fold(batch, &models).await,
            Err(error) => Err(error),
        };
        let (kept, contexts) = match folded {
            Ok(kept) => (kept, arrivals.contexts),
            Err(_) => {
                // One record at a time, to find the ones the query fails on.
                let (mut kept, mut taken) = (Vec::new(), Vec::new());
                for (row, ctx) in arrivals.rows.iter().zip(arrivals.contexts) {
                    let one = columns.batch(std::iter::once((*row, start, end)));
                    let folded = match one {
                        Ok(batch) => query.fold(batch, &models).await,
                        Err(error) => Err(error),
                    };
                    match folded {
                        Ok(states) => {
                            kept.extend(states);
                            taken.push(ctx);
                        }
                        Err(error) if rejected.insert(ctx.offset) => {
                            out.reject(ctx, format!("the query cannot take this record: {error}"));
                        }
                        Err(_) => {}
                    }
                }
                (kept, taken)
            }
        };
        let Some(first_offset) = contexts.iter().map(|c| c.offset).min() else {
            return;
        };
        let state = self.windows.entry(key).or_insert(WindowState {
            kept: Vec::new(),
            kept_rows: 0,
            records: 0,
            first_offset,
            emitted: None,
        });
        state.first_offset = state.first_offset.min(first_offset);
        state.records += contexts.len() as u64;
        let added: usize = kept.iter().map(RecordBatch::num_rows).sum();
        state.kept.extend(kept);
        state.kept_rows += added;
        let mut held = self.held_rows + added;
        if state.kept.len() >= COMPACT_AFTER {
            // Merging is only a saving: if it fails, the window keeps its batches as they are.
            match query.compact(state.kept.clone()).await {
                Ok(merged) => {
                    let before = state.kept_rows;
                    state.kept_rows = merged.iter().map(RecordBatch::num_rows).sum();
                    state.kept = merged;
                    held = (held + state.kept_rows).saturating_sub(before);
                }
                Err(error) => tracing::warn!(
                    pipeline = %self.pipeline.name, partition = key.0, window_start_ms = key.1,
                    error = %error, "cannot merge a window's states; keeping them apart"
                ),
            }
        }
        self.set_held(held);
    }

    /// Records how many rows the windows keep, here and in `sluice_window_held_rows` (which
    /// sums the stage's lanes).
    fn set_held(&mut self, rows: usize) {
        let delta = i64::try_from(rows).unwrap_or(i64::MAX)
            - i64::try_from(self.held_rows).unwrap_or(i64::MAX);
        self.held.add(delta);
        self.held_rows = rows;
    }

    /// Emits every closed window of `partition` that has records not yet emitted, then forgets
    /// the windows past their lateness.
    async fn emit(&mut self, partition: i32, out: &mut Emitter) -> Result<(), ProcessError> {
        let finished = self.finish_writes(false).await;
        let result = self.emit_due(partition, out).await;
        if result.is_err() {
            self.failing = true;
        }
        finished.and(result)
    }

    /// Takes in the writes that finished (all of them, waiting, when `all`; the oldest, waiting,
    /// while more than [`MAX_WRITES_IN_FLIGHT`] run): the windows of a write that succeeded
    /// count as emitted; those of one that failed are written again on the next emission. The
    /// error of the last failed write is returned, to be logged where the hooks' errors are.
    async fn finish_writes(&mut self, all: bool) -> Result<(), ProcessError> {
        let mut failure = None;
        while let Some(oldest) = self.writes.front() {
            let wait = all || self.writes.len() > MAX_WRITES_IN_FLIGHT;
            if !wait && !oldest.task.is_finished() {
                break;
            }
            let Some(write) = self.writes.pop_front() else {
                break;
            };
            let result = match write.task.await {
                Ok(result) => result,
                Err(e) => Err(ProcessError::Retriable(format!(
                    "a window write stopped: {e}"
                ))),
            };
            match result {
                Ok(_) => {
                    for (key, records) in write.windows {
                        if let Some(w) = self.windows.get_mut(&key) {
                            w.emitted = Some(records);
                        }
                    }
                    self.failing = false;
                }
                Err(e) => {
                    self.failing = true;
                    failure = Some(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Whether a write of the window `key` is still running.
    fn writing(&self, key: &(i32, i64)) -> bool {
        self.writes
            .iter()
            .any(|w| w.windows.iter().any(|(k, _)| k == key))
    }

    async fn emit_due(&mut self, partition: i32, out: &mut Emitter) -> Result<(), ProcessError> {
        let Some(&watermark) = self.watermarks.get(&partition) else {
            return Ok(());
        };
        let size = self.pipeline.query.window.size_ms();
        let due: Vec<(i32, i64)> = self
            .windows
            .range((partition, i64::MIN)..=(partition, i64::MAX))
            .filter(|(key, w)| {
                key.1.saturating_add(size) <= watermark
                    && w.emitted != Some(w.records)
                    && !self.writing(key)
            })
            .map(|(key, _)| *key)
            .collect();
        if !due.is_empty() {
            // One query for all due windows; if it fails, each window alone, so a window whose
            // values the query cannot take (a division by zero, say) does not hold up the others.
            let results = match self.query_windows(&due).await {
                Ok(results) => results,
                Err(_) => {
                    let mut results = Vec::new();
                    for key in &due {
                        match self.query_windows(std::slice::from_ref(key)).await {
                            Ok(batches) => results.extend(batches),
                            Err(error) => self.give_up_on(*key, &error),
                        }
                    }
                    results
                }
            };
            let emitted: Vec<((i32, i64), u64)> = due
                .iter()
                .filter_map(|key| self.windows.get(key).map(|w| (*key, w.records)))
                .collect();
            match self
                .output
                .write(&self.pipeline, partition, &results, out)
                .await?
            {
                Written::Done(rows) => {
                    self.rows_out.inc_by(rows as u64);
                    for (key, records) in emitted {
                        if let Some(w) = self.windows.get_mut(&key) {
                            w.emitted = Some(records);
                        }
                    }
                    self.failing = false;
                }
                Written::Pending(write) => {
                    // Rows are counted as written when the store has them, not when the lane
                    // next looks.
                    let rows_out = self.rows_out.clone();
                    let task = tokio::spawn(async move {
                        let written = write.await;
                        if let Ok(rows) = &written {
                            rows_out.inc_by(*rows as u64);
                        }
                        written
                    });
                    self.writes.push_back(InFlight {
                        windows: emitted,
                        task,
                    });
                    // Past the limit, wait for the oldest: the lane slows down with the store.
                    self.finish_writes(false).await?;
                }
            }
        }
        let lateness = self.pipeline.lateness_ms;
        let mut released = 0;
        self.windows.retain(|(p, start), w| {
            let keep = *p != partition
                || purge_at(*start, size, lateness) > watermark
                || w.emitted != Some(w.records);
            if !keep {
                released += w.kept_rows;
            }
            keep
        });
        self.set_held(self.held_rows.saturating_sub(released));
        Ok(())
    }

    /// Runs the query over what the windows `keys` keep. The query runs in memory, so a failure
    /// comes from the values themselves and would come again.
    async fn query_windows(&mut self, keys: &[(i32, i64)]) -> Result<Vec<RecordBatch>> {
        let query = self.query().await?;
        let kept: Vec<RecordBatch> = keys
            .iter()
            .filter_map(|key| self.windows.get(key))
            .flat_map(|w| w.kept.iter().cloned())
            .collect();
        query.finish(kept, &self.models()).await
    }

    /// A window the query cannot compute: logged with where its records are, counted in
    /// `sluice_window_failures_total`, and marked done (no row) at once, so the stream goes on
    /// and a retry of the other windows' write (the store down) does not count it again.
    /// Records it takes later (late records) give it another try.
    fn give_up_on(&mut self, (partition, start): (i32, i64), error: &crate::Error) {
        let first_offset = self.windows.get_mut(&(partition, start)).map(|w| {
            w.emitted = Some(w.records);
            w.first_offset
        });
        tracing::error!(
            pipeline = %self.pipeline.name, partition, window_start_ms = start, first_offset,
            error = %error, "the query failed on this window's values; the window is left out"
        );
        self.failed_windows.inc();
    }
}

impl<T> Drop for SqlOperator<T> {
    /// What this lane's windows kept leaves the stage's gauge with them.
    fn drop(&mut self) {
        self.set_held(0);
    }
}

#[async_trait]
impl<T: Record> Operator for SqlOperator<T> {
    type Input = Row<T>;

    async fn process(
        &mut self,
        batch: &[Input<Row<T>>],
        out: &mut Emitter,
    ) -> Result<(), BatchError> {
        let query = self
            .query()
            .await
            .map_err(|e| BatchError::from(ProcessError::Retriable(e.to_string())))?;
        let window = self.pipeline.query.window;
        let size = window.size_ms();
        self.batch_event_times.clear();
        let latest_allowed = sluice_pipelines::now_ms().saturating_add(MAX_FUTURE_SKEW_MS);
        let mut arrivals: BTreeMap<(i32, i64), Arrivals> = BTreeMap::new();
        for input in batch {
            let partition = input.ctx.partition;
            // After a rebalance hands a partition back, records from the committed offset on
            // come again; those already in a window must not be counted twice.
            if self
                .placed_up_to
                .get(&partition)
                .is_some_and(|last| input.ctx.offset <= *last)
            {
                continue;
            }
            self.placed_up_to.insert(partition, input.ctx.offset);
            let row = input.record.cells.as_slice();
            let Some(&Cell::Int(at)) = row.get(self.pipeline.event_time) else {
                out.reject(&input.ctx, "record has no event time");
                continue;
            };
            // A clock far ahead would drag the partition's watermark along and close every
            // window early: such a record goes to the DLQ instead.
            if at > latest_allowed || at < 0 {
                out.reject(
                    &input.ctx,
                    format!(
                        "event time {at} is before 1970 or more than an hour ahead of the clock"
                    ),
                );
                continue;
            }
            self.batch_event_times
                .insert((partition, input.ctx.offset), at);
            let watermark = self.watermarks.get(&partition).copied();
            let open: Vec<i64> = window
                .starts(at)
                .into_iter()
                .filter(|start| {
                    let purged = purge_at(*start, size, self.pipeline.lateness_ms);
                    watermark.is_none_or(|w| purged > w)
                })
                .collect();
            for start in open.iter().copied() {
                let bound = arrivals.entry((partition, start)).or_insert(Arrivals {
                    rows: Vec::new(),
                    contexts: Vec::new(),
                });
                bound.rows.push(row);
                bound.contexts.push(&input.ctx);
            }
            if open.is_empty() {
                self.late.inc();
                tracing::debug!(
                    pipeline = %self.pipeline.name, partition, offset = input.ctx.offset,
                    event_time_ms = at, "record later than the allowed lateness; left out"
                );
            }
        }
        let mut rejected = HashSet::new();
        for (key, bound) in arrivals {
            self.fold(&query, key, bound, &mut rejected, out).await;
        }
        Ok(())
    }

    /// The event time `process` read (records it rejected or skipped have none, so they do
    /// not move the watermark).
    fn event_time_ms(&self, input: &Input<Row<T>>) -> Option<i64> {
        self.batch_event_times
            .get(&(input.ctx.partition, input.ctx.offset))
            .copied()
    }

    async fn on_watermark(
        &mut self,
        partition: i32,
        watermark_ms: i64,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        self.watermarks.insert(partition, watermark_ms);
        self.emit(partition, out).await
    }

    /// Windows that could not be written (store down) or took late records are emitted on
    /// the next tick.
    async fn on_tick(&mut self, out: &mut Emitter) -> Result<(), ProcessError> {
        let partitions: Vec<i32> = self.watermarks.keys().copied().collect();
        let mut failure = None;
        for partition in partitions {
            if let Err(e) = self.emit(partition, out).await {
                failure = Some(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Window writes still running finish before the stage's last commit.
    async fn on_close(&mut self, _out: &mut Emitter) -> Result<(), ProcessError> {
        self.finish_writes(true).await
    }

    fn saturated(&self) -> bool {
        self.failing && self.held_rows >= self.max_held_rows
    }

    fn retained(&self) -> Vec<(i32, i64)> {
        let mut held: BTreeMap<i32, i64> = BTreeMap::new();
        for ((partition, _), w) in &self.windows {
            let first = held.entry(*partition).or_insert(w.first_offset);
            *first = (*first).min(w.first_offset);
        }
        held.into_iter().collect()
    }
}

/// The watermark at which the window starting at `start` is past its lateness: its rows are
/// let go and records for it are late.
fn purge_at(start: i64, size: i64, lateness: i64) -> i64 {
    start.saturating_add(size).saturating_add(lateness)
}

/// The runtime settings of a SQL stage: lanes by partition (windows are per partition), large
/// batches, a tick to retry refused writes, and the pipeline's watermarks.
pub fn stage_spec(pipeline: &Pipeline, wiring: Wiring, lanes: usize) -> StageSpec {
    let mut spec = StageSpec::new(wiring);
    spec.lanes = lanes;
    spec.lane_by = LaneBy::Partition;
    spec.max_batch = 512;
    // Windows close on watermarks, a minute apart: large fetches cost nothing in latency.
    spec.fetch = sluice_pipelines::kafka::Fetch::BULK;
    spec.lane_capacity = 1024;
    spec.tick = Some(TICK);
    spec.watermarks = Some(pipeline.watermarks);
    spec
}

/// How far ahead of the clock an event time may be before its record goes to the DLQ.
pub const MAX_FUTURE_SKEW_MS: i64 = 3_600_000;

/// Rows an operator holds before it stops taking records while its writes fail.
pub const DEFAULT_MAX_HELD_ROWS: usize = 1_000_000;

/// Default tick of SQL stages: how soon a window refused by its store is tried again.
pub const TICK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{builtin, pipeline::*, plan::WindowQuery, table, OutputConfig, PipelineConfig};
    use sluice_schemas::UsageEvent;
    use sluice_stores::{ModelSpec, ProviderKind};

    fn usage(
        tenant: &str,
        model: &str,
        input: i64,
        output: i64,
        at: i64,
        latency: i64,
    ) -> UsageEvent {
        UsageEvent {
            event_id: format!("{tenant}-{at}:0"),
            request_id: format!("{tenant}-{at}"),
            tenant_id: tenant.into(),
            model: model.into(),
            provider: "sim".into(),
            input_tokens: input,
            output_tokens: output,
            occurred_at_ms: at,
            latency_ms: Some(latency),
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
        }
    }

    fn models() -> Vec<ModelSpec> {
        vec![ModelSpec {
            name: "sim-small".into(),
            provider: ProviderKind::Sim,
            upstream_model: "sim-small".into(),
            base_url: None,
            api_key_env: None,
            context_window: 8192,
            input_price_micros: 100_000,
            output_price_micros: 400_000,
            created_at: 0,
        }]
    }

    /// The query's rows over `events`, folded `per_fold` records at a time and merged as a
    /// window would merge them.
    async fn run_folding(
        pipeline: &Pipeline,
        events: &[UsageEvent],
        per_fold: usize,
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let query = WindowQuery::plan(pipeline).await.unwrap();
        assert!(query.is_incremental());
        fold_and_finish(pipeline, &query, events, per_fold).await
    }

    async fn fold_and_finish(
        pipeline: &Pipeline,
        query: &WindowQuery,
        events: &[UsageEvent],
        per_fold: usize,
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let size = pipeline.query.window.size_ms();
        let models = models();
        let mut kept = Vec::new();
        for chunk in events.chunks(per_fold) {
            let rows: Vec<(Vec<Cell>, i64)> = chunk
                .iter()
                .flat_map(|e| {
                    let row = Row::of(e).unwrap().cells;
                    pipeline
                        .query
                        .window
                        .starts(e.occurred_at_ms)
                        .into_iter()
                        .map(move |start| (row.clone(), start))
                })
                .collect();
            let batch = pipeline
                .columns
                .batch(
                    rows.iter()
                        .map(|(row, start)| (row.as_slice(), *start, start + size)),
                )
                .unwrap();
            kept.extend(query.fold(batch, &models).await.unwrap());
            if kept.len() >= COMPACT_AFTER {
                kept = query.compact(kept).await.unwrap();
            }
        }
        let results = query.finish(kept, &models).await.unwrap();
        let mut out = Vec::new();
        for batch in &results {
            out.extend(table::json_rows(batch).unwrap());
        }
        out.sort_by_key(|r| {
            let group = r.get("tenant_id").or(r.get("model")).map(|v| v.to_string());
            (r["window_start"].as_i64(), group)
        });
        out
    }

    async fn run(
        pipeline: &Pipeline,
        events: &[UsageEvent],
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        run_folding(pipeline, events, events.len().max(1)).await
    }

    #[tokio::test]
    async fn the_builtin_pipelines_plan_and_count_exactly() {
        let [tenants, latency] = <[PipelineConfig; 2]>::try_from(builtin::pipelines()).unwrap();
        let tenants = Pipeline::compile::<UsageEvent>(&tenants).unwrap();
        let latency = Pipeline::compile::<UsageEvent>(&latency).unwrap();
        assert!(tenants.check_query().await.is_ok());
        assert!(latency.check_query().await.is_ok());

        let events = [
            usage("a", "sim-small", 10, 20, 60_000, 100),
            usage("a", "sim-small", 10, 20, 61_000, 200),
            usage("b", "sim-small", 1_000_000, 0, 62_000, 300),
            usage("a", "unknown", 5, 5, 125_000, 400),
        ];
        let rows = run(&tenants, &events).await;
        assert_eq!(rows.len(), 3, "{rows:?}");
        let a1 = &rows[0];
        assert_eq!(
            (a1["tenant_id"].as_str(), a1["records"].as_i64()),
            (Some("a"), Some(2))
        );
        assert_eq!(a1["input_tokens"], 20);
        assert_eq!(a1["output_tokens"], 40);
        // 20 input tokens at 0.1 $/M and 40 output at 0.4 $/M: 18 micro-dollars.
        assert_eq!(a1["cost_micros"].as_f64(), Some(18.0));
        assert_eq!(rows[1]["cost_micros"].as_f64(), Some(100_000.0));
        assert_eq!(
            rows[2]["cost_micros"].as_f64(),
            Some(0.0),
            "unknown model: no price"
        );

        let rows = run(&latency, &events).await;
        let first = &rows[0];
        assert_eq!(
            (first["model"].as_str(), first["records"].as_i64()),
            (Some("sim-small"), Some(3))
        );
        assert_eq!(first["max_ms"], 300);
        assert_eq!(first["p50_ms"].as_f64(), Some(200.0));
    }

    #[tokio::test]
    async fn folding_in_small_batches_counts_what_one_batch_counts() {
        let events: Vec<UsageEvent> = (0..2_000)
            .map(|i| {
                let tenant = ["a", "b", "c"][i % 3];
                let model = ["sim-small", "other"][i % 2];
                let at = 60_000 + (i as i64) * 90;
                let mut event = usage(tenant, model, 10 + i as i64 % 7, i as i64 % 5, at, i as i64);
                // Every other request has two usage events.
                event.request_id = format!("{tenant}-{}", i / 2);
                event
            })
            .collect();
        for config in builtin::pipelines() {
            let pipeline = Pipeline::compile::<UsageEvent>(&config).unwrap();
            let whole = run(&pipeline, &events).await;
            let folded = run_folding(&pipeline, &events, 37).await;
            assert_eq!(whole.len(), folded.len(), "{}", config.name);
            for (one, other) in whole.iter().zip(&folded) {
                for (column, value) in one {
                    // Percentiles are approximate (t-digests, merged): close, not equal.
                    if column.starts_with('p') && column.ends_with("_ms") {
                        let (a, b) = (value.as_f64().unwrap(), other[column].as_f64().unwrap());
                        assert!((a - b).abs() <= a.abs() * 0.01, "{column}: {a} against {b}");
                    } else {
                        assert_eq!(value, &other[column], "{}: {column}", config.name);
                    }
                }
            }
            let records: i64 = whole.iter().map(|r| r["records"].as_i64().unwrap()).sum();
            assert_eq!(records, 2_000, "{}", config.name);
        }
    }

    #[tokio::test]
    async fn a_window_keeps_a_few_rows_per_group_however_many_records_it_takes() {
        let mut operator = operator(builtin::pipelines().remove(0));
        let mut out = idle_emitter();
        for chunk in 0..50 {
            let batch: Vec<Input<Row<UsageEvent>>> = (0..100)
                .map(|i| {
                    let n = chunk * 100 + i;
                    let tenant = ["a", "b", "c"][n as usize % 3];
                    input(usage(tenant, "m", 1, 1, 60_000 + n, 1), 0, n)
                })
                .collect();
            operator.process(&batch, &mut out).await.unwrap();
        }
        let window = &operator.windows[&(0, 60_000)];
        assert_eq!(window.records, 5_000);
        assert_eq!(operator.held.get(), operator.held_rows as i64);
        assert!(
            operator.held_rows <= 3 * COMPACT_AFTER,
            "{}",
            operator.held_rows
        );
        let rows = operator.query_windows(&[(0, 60_000)]).await.unwrap();
        let rows = table::json_rows(&rows[0]).unwrap();
        let requests: i64 = rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
        assert_eq!(requests, 5_000);
    }

    #[tokio::test]
    async fn a_query_over_an_aggregation_keeps_rows_and_still_counts() {
        let mut config = builtin::pipelines().remove(0);
        config.sql = "SELECT window_start, sum(n) AS records, count(*) AS tenants FROM \
                      (SELECT window_start, tenant_id, count(*) AS n FROM usage \
                       GROUP BY tumble(interval '1 minute'), tenant_id) t \
                      GROUP BY window_start"
            .into();
        let pipeline = Pipeline::compile::<UsageEvent>(&config).unwrap();
        let query = WindowQuery::plan(&pipeline).await.unwrap();
        assert!(!query.is_incremental());
        let mut operator = operator(config);
        let batch: Vec<Input<Row<UsageEvent>>> = (0..10)
            .map(|i| input(usage(["a", "b"][i % 2], "m", 1, 1, 60_000, 1), 0, i as i64))
            .collect();
        operator.process(&batch, &mut idle_emitter()).await.unwrap();
        let rows = operator.query_windows(&[(0, 60_000)]).await.unwrap();
        let rows = table::json_rows(&rows[0]).unwrap();
        assert_eq!(
            (rows[0]["records"].as_i64(), rows[0]["tenants"].as_i64()),
            (Some(10), Some(2))
        );
    }

    #[tokio::test]
    async fn a_query_reading_its_source_again_above_the_aggregation_runs_whole() {
        let mut config = builtin::pipelines().remove(0);
        config.sql = "SELECT window_start, count(*) AS records, \
                      (SELECT count(*) FROM usage) AS all_records FROM usage \
                      GROUP BY tumble(interval '1 minute')"
            .into();
        let pipeline = Pipeline::compile::<UsageEvent>(&config).unwrap();
        let query = WindowQuery::plan(&pipeline).await.unwrap();
        assert!(!query.is_incremental());
        let rows = fold_and_finish(&pipeline, &query, &[usage("a", "m", 1, 1, 60_000, 1)], 1).await;
        assert_eq!(rows[0]["all_records"], 1);
    }

    #[tokio::test]
    async fn records_the_query_fails_on_go_to_the_dlq_and_the_others_count() {
        let mut config = builtin::pipelines().remove(0);
        config.sql = "SELECT window_start, count(*) AS records FROM usage \
                      WHERE input_tokens / output_tokens > 0 \
                      GROUP BY tumble(interval '1 minute')"
            .into();
        let mut operator = operator(config);
        let mut out = idle_emitter();
        let batch: Vec<Input<Row<UsageEvent>>> = (0..6)
            .map(|i| input(usage("a", "m", 4, i % 3, 60_000 + i, 1), 0, i))
            .collect();
        operator.process(&batch, &mut out).await.unwrap();
        let rejected: Vec<i64> = out.take_rejected().iter().map(|r| r.offset).collect();
        assert_eq!(rejected, vec![0, 3], "output_tokens 0: division by zero");
        assert_eq!(operator.windows[&(0, 60_000)].records, 4);
        let rows = operator.query_windows(&[(0, 60_000)]).await.unwrap();
        assert_eq!(table::json_rows(&rows[0]).unwrap()[0]["records"], 4);
    }

    #[tokio::test]
    async fn records_are_priced_at_the_catalogue_of_when_they_were_folded_in() {
        let pipeline = Pipeline::compile::<UsageEvent>(&builtin::pipelines()[0]).unwrap();
        let query = WindowQuery::plan(&pipeline).await.unwrap();
        let row = Row::of(&usage("a", "sim-small", 10, 20, 60_000, 1)).unwrap();
        let batch = |row: &Row<UsageEvent>| {
            pipeline
                .columns
                .batch(std::iter::once((row.cells.as_slice(), 60_000, 120_000)))
                .unwrap()
        };
        let mut kept = query.fold(batch(&row), &models()).await.unwrap();
        // The price doubles; a record folded after that pays the new one.
        let mut dearer = models();
        dearer[0].input_price_micros *= 2;
        dearer[0].output_price_micros *= 2;
        kept.extend(query.fold(batch(&row), &dearer).await.unwrap());
        let rows = query.finish(kept, &dearer).await.unwrap();
        // 10 input at 0.1 $/M and 20 output at 0.4 $/M: 9 micro-dollars, then 18.
        assert_eq!(
            table::json_rows(&rows[0]).unwrap()[0]["cost_micros"].as_f64(),
            Some(27.0)
        );
    }

    #[tokio::test]
    async fn hopping_windows_count_a_record_in_each_window_it_falls_in() {
        let config = PipelineConfig {
            name: "hop".into(),
            source: "usage".into(),
            sql: "SELECT window_start, count(*) AS records FROM usage \
                  GROUP BY hop(interval '30 seconds', interval '1 minute')"
                .into(),
            event_time: "occurred_at_ms".into(),
            max_out_of_orderness: default_out_of_orderness(),
            allowed_lateness: default_lateness(),
            idle_after: default_idle_after(),
            output: OutputConfig::Topic("hop".into()),
        };
        let pipeline = Pipeline::compile::<UsageEvent>(&config).unwrap();
        let rows = run(
            &pipeline,
            &[
                usage("a", "m", 1, 1, 45_000, 1),
                usage("a", "m", 1, 1, 75_000, 1),
            ],
        )
        .await;
        let counts: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["window_start"].as_i64().unwrap(),
                    r["records"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(counts, vec![(0, 1), (30_000, 2), (60_000, 1)]);
    }

    fn input(event: UsageEvent, partition: i32, offset: i64) -> Input<Row<UsageEvent>> {
        Input {
            record: Row::of(&event).unwrap(),
            ctx: sluice_pipelines::RecordContext {
                topic: "usage".into(),
                partition,
                offset,
                key: None,
                timestamp_ms: None,
                trace: sluice_pipelines::trace::TraceContext::new_root(),
            },
        }
    }

    /// An emitter that is never asked to send (nothing here reaches a broker).
    fn idle_emitter() -> Emitter {
        let producer = sluice_pipelines::kafka::Producer::new(
            rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1"),
        )
        .unwrap();
        let registry = sluice_schemas::RegistryClient::new("http://127.0.0.1:1").unwrap();
        Emitter::new(
            producer,
            Arc::new(sluice_schemas::Codec::new(registry)),
            sluice_pipelines::trace::TraceContext::new_root(),
        )
    }

    /// An operator for `config` whose output is never reached in these tests.
    fn operator(config: PipelineConfig) -> SqlOperator<UsageEvent> {
        let output = Output::Topic {
            topic: "unused".into(),
        };
        operator_writing_to(config, output)
    }

    fn operator_writing_to(config: PipelineConfig, output: Output) -> SqlOperator<UsageEvent> {
        let pipeline = Arc::new(Pipeline::compile::<UsageEvent>(&config).unwrap());
        SqlOperator::new(
            pipeline,
            Arc::new(output),
            None,
            &Metrics::new().unwrap(),
            "t",
        )
    }

    /// A pipeline dividing input by output tokens, and records for two minutes of which the
    /// first has no output tokens: its division fails.
    fn dividing_by_zero_in_minute_0() -> (PipelineConfig, Vec<Input<Row<UsageEvent>>>) {
        let mut config = builtin::pipelines().remove(0);
        config.sql = "SELECT window_start, count(*) AS records, \
                      sum(input_tokens) / sum(output_tokens) AS per_output \
                      FROM usage GROUP BY tumble(interval '1 minute')"
            .into();
        let batch = vec![
            input(usage("a", "m", 4, 0, 1_000, 1), 0, 1),
            input(usage("a", "m", 4, 2, 61_000, 1), 0, 2),
        ];
        (config, batch)
    }

    #[tokio::test]
    async fn records_read_again_after_a_rebalance_are_not_counted_twice() {
        let mut operator = operator(builtin::pipelines().remove(0));
        let mut out = idle_emitter();
        let batch: Vec<Input<Row<UsageEvent>>> = (0..3)
            .map(|i| input(usage("a", "m", 1, 1, 60_000 + i * 1_000, 1), 2, 10 + i))
            .collect();
        operator.process(&batch, &mut out).await.unwrap();
        assert_eq!(operator.windows[&(2, 60_000)].records, 3);
        assert_eq!(
            operator.retained(),
            vec![(2, 10)],
            "the window holds offset 10 back"
        );
        assert_eq!(operator.event_time_ms(&batch[1]), Some(61_000));
        // The group hands partition 2 back and it is read again from the commit position.
        operator.process(&batch, &mut out).await.unwrap();
        assert_eq!(operator.windows[&(2, 60_000)].records, 3);
        assert!(
            operator.event_time_ms(&batch[1]).is_none(),
            "skipped: no watermark move"
        );
    }

    #[tokio::test]
    async fn event_times_far_ahead_or_before_1970_go_to_the_dlq() {
        let mut operator = operator(builtin::pipelines().remove(0));
        let mut out = idle_emitter();
        let ahead = sluice_pipelines::now_ms() + 2 * 3_600_000;
        let batch = vec![
            input(usage("a", "m", 1, 1, ahead, 1), 0, 1),
            input(usage("a", "m", 1, 1, -5, 1), 0, 2),
            input(usage("a", "m", 1, 1, i64::MAX, 1), 0, 3),
        ];
        operator.process(&batch, &mut out).await.unwrap();
        let rejected: Vec<i64> = out.take_rejected().iter().map(|r| r.offset).collect();
        assert_eq!(rejected, vec![1, 2, 3]);
        assert_eq!(operator.held_rows, 0);
        assert!(operator.retained().is_empty());
    }

    #[tokio::test]
    async fn a_window_the_query_fails_on_does_not_hold_up_the_others() {
        let (config, batch) = dividing_by_zero_in_minute_0();
        let mut operator = operator(config);
        operator.process(&batch, &mut idle_emitter()).await.unwrap();
        assert!(operator
            .query_windows(&[(0, 0), (0, 60_000)])
            .await
            .is_err());
        let error = operator
            .query_windows(&[(0, 0)])
            .await
            .unwrap_err()
            .to_string();
        assert!(error.to_lowercase().contains("divide by zero"), "{error}");
        let rows = operator.query_windows(&[(0, 60_000)]).await.unwrap();
        let rows = table::json_rows(&rows[0]).unwrap();
        assert_eq!(rows[0]["per_output"], 2);
    }

    #[tokio::test]
    async fn a_window_given_up_on_is_counted_once_while_the_store_is_down() {
        let (config, batch) = dividing_by_zero_in_minute_0();
        // Nothing listens on port 1: every write of the other window fails and is retried.
        let unreachable = sluice_stores::ClickHouseConfig {
            url: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let output = Output::clickhouse(sluice_stores::ClickHouse::new(&unreachable), "unused");
        let mut operator = operator_writing_to(config, output);
        let mut out = idle_emitter();
        operator.process(&batch, &mut out).await.unwrap();
        // The write goes out on its own and fails; the next hooks write the window again.
        let _ = operator.on_watermark(0, 200_000, &mut out).await;
        assert!(operator.finish_writes(true).await.is_err());
        for _ in 0..3 {
            let _ = operator.on_tick(&mut out).await;
            assert!(operator.finish_writes(true).await.is_err());
            assert!(operator.failing);
        }
        assert_eq!(operator.failed_windows.get(), 1);
        // The window that can be computed waits for the next try, holding its offsets; the
        // other one is done and let go.
        assert_eq!(operator.windows[&(0, 60_000)].emitted, None);
        assert!(!operator.windows.contains_key(&(0, 0)));
        let first = operator.windows[&(0, 60_000)].first_offset;
        assert_eq!(operator.retained(), vec![(0, first)]);
        // Stopping waits for the write still running, and reports that it failed.
        let _ = operator.on_tick(&mut out).await;
        assert_eq!(operator.writes.len(), 1);
        assert!(operator.on_close(&mut out).await.is_err());
        assert!(operator.writes.is_empty());
    }

    #[tokio::test]
    async fn a_window_being_written_holds_its_offsets_and_is_not_written_twice() {
        // A store that takes connections and never answers: the write stays in flight.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let store = sluice_stores::ClickHouseConfig {
            url: format!("http://{address}"),
            ..Default::default()
        };
        let output = Output::clickhouse(sluice_stores::ClickHouse::new(&store), "unused");
        let mut operator = operator_writing_to(builtin::pipelines().remove(0), output);
        let mut out = idle_emitter();
        let batch: Vec<Input<Row<UsageEvent>>> = (0..3)
            .map(|i| input(usage("a", "m", 1, 1, 60_000 + i, 1), 0, 5 + i))
            .collect();
        operator.process(&batch, &mut out).await.unwrap();
        // The watermark closes the window: its write goes out and the lane goes on at once.
        operator.on_watermark(0, 200_000, &mut out).await.unwrap();
        assert_eq!(operator.writes.len(), 1);
        for _ in 0..3 {
            operator.on_tick(&mut out).await.unwrap();
        }
        assert_eq!(
            operator.writes.len(),
            1,
            "a window being written is not written again"
        );
        assert_eq!(operator.windows[&(0, 60_000)].emitted, None);
        assert_eq!(operator.retained(), vec![(0, 5)]);
    }

    #[test]
    fn broken_definitions_are_refused_with_the_pipeline_name() {
        let mut config = builtin::pipelines().remove(0);
        config.event_time = "tenant_id".into();
        let error = Pipeline::compile::<UsageEvent>(&config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tenant_usage_1m") && error.contains("event_time"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_query_without_records_is_refused_at_start() {
        let mut config = builtin::pipelines().remove(1);
        config.sql =
            "SELECT window_start, model FROM usage GROUP BY tumble(interval '1 minute'), model"
                .into();
        let pipeline = Pipeline::compile::<UsageEvent>(&config).unwrap();
        let error = pipeline.check_query().await.unwrap_err().to_string();
        assert!(error.contains("records"), "{error}");
    }
}
