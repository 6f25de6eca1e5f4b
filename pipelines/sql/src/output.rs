//! Where window results go: a table in Sluice's ClickHouse database (one insert per emission,
//! through the stores' one writer, window bounds as UTC `DateTime`s) or a topic of
//! `WindowResult` records.

use std::{future::Future, pin::Pin};

use datafusion::arrow::array::RecordBatch;
use serde_json::{Map, Value};
use sluice_pipelines::{Emitter, ProcessError};
use sluice_schemas::WindowResult;
use sluice_stores::ClickHouse;

use crate::{table::json_rows, Pipeline};

/// A pipeline's output.
pub enum Output {
    /// A table in Sluice's ClickHouse database.
    ClickHouse {
        clickhouse: ClickHouse,
        table: String,
    },
    /// A topic.
    Topic {
        /// Full topic name.
        topic: String,
    },
}

impl Output {
    /// A ClickHouse table output.
    pub fn clickhouse(clickhouse: ClickHouse, table: &str) -> Self {
        Output::ClickHouse {
            clickhouse,
            table: table.to_owned(),
        }
    }

    /// Writes `results` (rows of windows of source `partition`); returns the rows written.
    /// ClickHouse writes are handed back as a [`Write`] to run on its own, so the lane goes on
    /// folding records meanwhile; topic writes are queued on `out`, whose acknowledgements the
    /// runtime awaits before committing.
    pub(crate) async fn write(
        &self,
        pipeline: &Pipeline,
        partition: i32,
        results: &[RecordBatch],
        out: &mut Emitter,
    ) -> Result<Written, ProcessError> {
        let mut rows = Vec::new();
        for batch in results {
            rows.extend(json_rows(batch).map_err(|e| ProcessError::Poison(e.to_string()))?);
        }
        if rows.is_empty() {
            return Ok(Written::Done(0));
        }
        let size = pipeline.query.window.size_ms();
        match self {
            Output::ClickHouse { clickhouse, table } => {
                let table_rows: Vec<Map<String, Value>> = rows
                    .into_iter()
                    .map(|mut row| {
                        for bound in ["window_start", "window_end"] {
                            if let Some(ms) = row.get(bound).and_then(Value::as_i64) {
                                row.insert(bound.into(), Value::String(datetime(ms)));
                            }
                        }
                        row.insert("source_partition".into(), partition.into());
                        row
                    })
                    .collect();
                let (clickhouse, table) = (clickhouse.clone(), table.clone());
                Ok(Written::Pending(Box::pin(async move {
                    // The store failing is no reason to lose the window: it is kept and
                    // written again.
                    clickhouse
                        .insert_json_rows(&table, &table_rows)
                        .await
                        .map_err(|e| {
                            ProcessError::Retriable(format!("ClickHouse insert into {table}: {e}"))
                        })
                })))
            }
            Output::Topic { topic } => {
                for row in &rows {
                    let start = int(row, "window_start");
                    let result = WindowResult {
                        pipeline: pipeline.name.clone(),
                        source_partition: partition,
                        window_start_ms: start,
                        window_end_ms: row
                            .get("window_end")
                            .and_then(Value::as_i64)
                            .unwrap_or(start + size),
                        records: int(row, "records"),
                        row_json: Value::Object(row.clone()).to_string(),
                    };
                    out.emit(
                        topic,
                        None,
                        key(&pipeline.name, partition, row).as_bytes(),
                        &result,
                    )
                    .await?;
                }
                Ok(Written::Done(rows.len()))
            }
        }
    }
}

/// What [`Output::write`] did: rows queued (a topic), or a write still to run (ClickHouse),
/// which yields the rows written.
pub(crate) enum Written {
    Done(usize),
    Pending(Write),
}

/// A ClickHouse write of window rows, run on its own task.
pub(crate) type Write = Pin<Box<dyn Future<Output = Result<usize, ProcessError>> + Send>>;

fn int(row: &Map<String, Value>, name: &str) -> i64 {
    row.get(name).and_then(Value::as_i64).unwrap_or(0)
}

/// The key of a result row: pipeline, partition, window and the row's text columns (its group
/// values), so a compacted topic keeps the latest row of each group.
fn key(pipeline: &str, partition: i32, row: &Map<String, Value>) -> String {
    let mut key = format!("{pipeline}/{partition}/{}", int(row, "window_start"));
    for value in row.values() {
        if let Value::String(text) = value {
            key.push('/');
            key.push_str(text);
        }
    }
    key
}

/// `ms` since the epoch as ClickHouse's `DateTime` text, in UTC.
fn datetime(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "1970-01-01 00:00:00".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_are_utc_datetimes() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(1_764_118_860_000), "2025-11-26 01:01:00");
    }

    #[test]
    fn keys_name_the_window_and_the_group() {
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"window_start": 60000, "tenant_id": "t1", "records": 3}"#)
                .unwrap();
        assert_eq!(key("rates", 2, &row), "rates/2/60000/t1");
    }
}
