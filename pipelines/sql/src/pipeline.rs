//! A pipeline's definition: the query over a topic's records, its window and event-time
//! settings, and where its rows go, checked against the source's record type when it is
//! compiled and planned over an empty window at start-up, so a broken definition fails there
//! rather than at the first window.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Int64Array, RecordBatch, StringArray},
        datatypes::{DataType, Field, Schema as ArrowSchema},
    },
    prelude::{SessionConfig, SessionContext},
};
use serde::{Deserialize, Serialize};
use sluice_pipelines::runtime::WatermarkSpec;
use sluice_schemas::Record;
use sluice_stores::ModelSpec;

use crate::{
    table::Columns,
    window::{self, WindowedQuery},
    Error, Result,
};

/// A streaming SQL pipeline as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name: the stage is `sql.<name>`, its consumer group `<prefix>.sql.<name>`.
    pub name: String,
    /// The topic read (`usage`: `sluice.usage` as UsageEvent rows); also the table name in the
    /// query.
    pub source: String,
    /// The query; must group by `tumble(...)` or `hop(...)` and select `window_start` and
    /// `count(*) AS records`.
    pub sql: String,
    /// The integer column (ms since the epoch) that is the event time.
    pub event_time: String,
    /// How far out of order records arrive; the watermark trails the latest event time by it.
    #[serde(default = "default_out_of_orderness")]
    pub max_out_of_orderness: String,
    /// How long after its end a window still takes late records (and is emitted again).
    #[serde(default = "default_lateness")]
    pub allowed_lateness: String,
    /// After this long without records, a partition's watermark follows the wall clock.
    #[serde(default = "default_idle_after")]
    pub idle_after: String,
    /// Where results go.
    pub output: OutputConfig,
}

pub(crate) fn default_out_of_orderness() -> String {
    "2 seconds".into()
}
pub(crate) fn default_lateness() -> String {
    "30 seconds".into()
}
pub(crate) fn default_idle_after() -> String {
    "5 seconds".into()
}

/// Where a pipeline's rows go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum OutputConfig {
    /// A ClickHouse table in Sluice's database (`ReplacingMergeTree(records)`).
    Clickhouse(String),
    /// A topic (name without the prefix) of `WindowResult` records.
    Topic(String),
}

/// A pipeline ready to run: query parsed, columns known, durations read.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub source: String,
    pub query: WindowedQuery,
    pub columns: Columns,
    pub(crate) event_time: usize,
    pub lateness_ms: i64,
    pub watermarks: WatermarkSpec,
    pub output: OutputConfig,
}

impl Pipeline {
    /// Checks `config` against the source's record type `T`; the query itself is checked by
    /// [`Pipeline::check_query`].
    pub fn compile<T: Record>(config: &PipelineConfig) -> Result<Self> {
        let context = |problem: String| Error::Definition {
            pipeline: config.name.clone(),
            problem,
        };
        let schema = T::schema().map_err(|e| context(e.to_string()))?;
        let columns = Columns::of(schema).map_err(|e| context(e.to_string()))?;
        let event_time = columns.int_column(&config.event_time).ok_or_else(|| {
            context(format!(
                "event_time {} is not an integer column of {}",
                config.event_time,
                T::NAME
            ))
        })?;
        let duration = |what: &str, text: &str| {
            window::parse_duration(text)
                .ok_or_else(|| context(format!("cannot read {what} {text:?}")))
        };
        let lateness = duration("allowed_lateness", &config.allowed_lateness)?;
        Ok(Self {
            name: config.name.clone(),
            source: config.source.clone(),
            query: window::parse(&config.sql).map_err(|e| context(e.to_string()))?,
            columns,
            event_time,
            lateness_ms: i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX),
            watermarks: WatermarkSpec {
                max_out_of_orderness: duration(
                    "max_out_of_orderness",
                    &config.max_out_of_orderness,
                )?,
                idle_after: duration("idle_after", &config.idle_after)?,
            },
            output: config.output.clone(),
        })
    }

    /// Plans the query over an empty window and checks it returns `window_start` and
    /// `records`, so a broken query fails at start-up rather than at the first window.
    pub async fn check_query(&self, models: &[ModelSpec]) -> Result<Vec<String>> {
        let empty = self.columns.batch(std::iter::empty())?;
        let session = session(&self.source, empty, models)?;
        let frame = session
            .sql(&self.query.sql)
            .await
            .map_err(|source| self.query_error(source))?;
        let names: Vec<String> = frame
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for required in ["window_start", "records"] {
            if !names.iter().any(|n| n == required) {
                return Err(Error::Definition {
                    pipeline: self.name.clone(),
                    problem: format!("the query must select {required} (window rows are keyed by window_start and versioned by records = count(*))"),
                });
            }
        }
        Ok(names)
    }

    /// `source`, which the SQL engine raised on this pipeline's query.
    pub(crate) fn query_error(&self, source: datafusion::error::DataFusionError) -> Error {
        Error::Query {
            pipeline: self.name.clone(),
            source,
        }
    }
}

/// A DataFusion session with `table` holding `batch`, and `models` holding the catalogue's
/// models (name, provider, input_price_micros, output_price_micros; prices per million tokens).
pub(crate) fn session(
    table: &str,
    batch: RecordBatch,
    models: &[ModelSpec],
) -> Result<SessionContext> {
    let session = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    session
        .register_batch(table, batch)
        .map_err(Error::Models)?;
    let schema = Arc::new(ArrowSchema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("provider", DataType::Utf8, false),
        Field::new("input_price_micros", DataType::Int64, false),
        Field::new("output_price_micros", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                models.iter().map(|m| m.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                models.iter().map(|m| m.provider.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                models.iter().map(|m| m.input_price_micros),
            )),
            Arc::new(Int64Array::from_iter_values(
                models.iter().map(|m| m.output_price_micros),
            )),
        ],
    )?;
    session
        .register_batch("models", batch)
        .map_err(Error::Models)?;
    Ok(session)
}
