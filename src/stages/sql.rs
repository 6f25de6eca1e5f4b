//! The streaming SQL stages: every configured pipeline (`[[sql.pipelines]]`) as its own stage
//! `sql.<name>` in its own consumer group, lanes by partition.

use std::sync::Arc;

use sluice_pipelines::{kafka, Runnable};
use sluice_schemas::UsageEvent;
use sluice_sql::{Output, OutputConfig, Pipeline, SqlOperator};
use sluice_stores::ClickHouse;

use crate::{config::Config, process::Process};

/// Why `sluice replay sql` is refused.
pub const NOT_REPLAYED: &str = "SQL pipelines rebuild their windows from their consumer \
     group's position; to recompute a range, reset the group `<prefix>.sql.<name>` to the \
     range's start";

pub async fn build(config: &Config, process: &mut Process) -> anyhow::Result<Vec<Runnable>> {
    if config.sql.pipelines.is_empty() {
        return Ok(Vec::new());
    }
    let topics = config.kafka.topics();
    let catalog = process.catalog(config).await?;
    let clickhouse = ClickHouse::new(&config.clickhouse);
    let mut stages = Vec::with_capacity(config.sql.pipelines.len());
    for definition in &config.sql.pipelines {
        let pipeline = Arc::new(Pipeline::compile::<UsageEvent>(definition)?);
        pipeline.check_query().await?;
        let output = Arc::new(match &pipeline.output {
            OutputConfig::Clickhouse(table) => Output::clickhouse(clickhouse.clone(), table),
            OutputConfig::Topic(name) => {
                let topic = format!("{}.{name}", config.kafka.topic_prefix);
                kafka::ensure_topics(&config.kafka, &[topic.as_str()]).await?;
                Output::Topic { topic }
            }
        });
        let stage = format!("sql.{}", pipeline.name);
        let wiring = config.kafka.wiring(&stage, &topics.usage);
        let spec = sluice_sql::stage_spec(&pipeline, wiring, config.sql.lanes);
        let (catalog, metrics) = (catalog.clone(), process.metrics.clone());
        let max_held_rows = config.sql.max_held_rows;
        let make = move |_| {
            SqlOperator::<UsageEvent>::new(
                pipeline.clone(),
                output.clone(),
                Some(catalog.clone()),
                &metrics,
                &stage,
            )
            .with_max_held_rows(max_held_rows)
        };
        stages.push(Runnable::operator(make, spec));
    }
    Ok(stages)
}
