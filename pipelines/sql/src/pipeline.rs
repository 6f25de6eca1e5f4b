//! A pipeline's definition: the query over a topic's records, its window and event-time
//! settings, and where its rows go, checked against the source's record type when it is
//! compiled and planned at start-up, so a broken definition fails there
//! rather than at the first window.

use serde::{Deserialize, Serialize};
use sluice_pipelines::runtime::WatermarkSpec;
use sluice_schemas::Record;

use crate::{
    plan::WindowQuery,
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

    /// Plans the query and checks it returns `window_start` and `records`, so a broken query
    /// fails at start-up rather than at the first window; returns the columns it returns.
    pub async fn check_query(&self) -> Result<Vec<String>> {
        Ok(WindowQuery::plan(self).await?.columns)
    }

    /// `source`, which the SQL engine raised on this pipeline's query.
    pub(crate) fn query_error(&self, source: datafusion::error::DataFusionError) -> Error {
        Error::Query {
            pipeline: self.name.clone(),
            source,
        }
    }
}
