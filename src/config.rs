//! Sluice's configuration: defaults in code, then a TOML file (`--config` or `SLUICE_CONFIG`),
//! then environment variables `SLUICE_<SECTION>__<FIELD>` (e.g. `SLUICE_KAFKA__BOOTSTRAP`,
//! `SLUICE_EDGE__LISTEN`, `SLUICE_ORCHESTRATOR__SIM__TOKENS_PER_SECOND`).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sluice_edge::EdgeConfig;
use sluice_orchestrator::OrchestratorConfig;
use sluice_pipelines::KafkaConfig;
use sluice_router::RouterConfig;
use sluice_schemas::UsageEvent;
use sluice_sql::{Pipeline, PipelineConfig};
use sluice_stores::{limits::RedisConfig, ClickHouseConfig};
use sluice_webhooks::WebhookConfig;

/// Every setting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Kafka-protocol broker and topic layout.
    pub kafka: KafkaConfig,
    /// The schema registry (served by `sluice registry` / `sluice up`, or an external one).
    pub registry: RegistryConfig,
    /// PostgreSQL, the control plane.
    pub postgres: PostgresConfig,
    /// ClickHouse, the facts.
    pub clickhouse: ClickHouseConfig,
    /// Redis, the counters behind rate limits and quotas that every edge shares.
    pub redis: RedisConfig,
    /// The HTTP API.
    pub edge: EdgeConfig,
    /// Model choice.
    pub router: RouterConfig,
    /// Model calls.
    pub orchestrator: OrchestratorConfig,
    /// Parallelism and batching of the stages.
    pub stages: StagesConfig,
    /// Streaming SQL pipelines (stage `sql`).
    pub sql: SqlConfig,
    /// Webhook delivery (stage `webhooks`).
    pub webhooks: WebhookConfig,
    /// Where stage-only processes serve `/metrics`, `/healthz` and `/readyz`.
    pub ops: OpsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Schema registry settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Address Sluice's own registry listens on.
    pub listen: String,
    /// URL clients use to reach the registry (Sluice's own or an external one).
    pub url: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".into(),
            url: "http://127.0.0.1:8081".into(),
        }
    }
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// The runtime role (subject to row-level security).
    pub url: String,
    /// The owning role, for migrations and administrative commands.
    pub admin_url: String,
    /// Connections per pool.
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://sluice_app@127.0.0.1:5432/sluice".into(),
            admin_url: "postgres://sluice@127.0.0.1:5432/sluice".into(),
            max_connections: 16,
        }
    }
}

/// Stage parallelism and batching.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    /// Requests the router works on at once (one session's in order, different sessions
    /// concurrently); beyond it the router takes no more until some are done.
    pub router_max_in_flight: usize,
    /// Requests the orchestrator works on at once, most of them waiting on a model: one
    /// session's turns in order, different sessions' calls concurrently.
    pub orchestrator_max_in_flight: usize,
    /// Workflow steps the workflow stage runs at once: one run's steps in order, different
    /// runs' steps concurrently.
    pub workflows_max_in_flight: usize,
    /// Largest batch the metering sink takes from the topic at once; under light traffic
    /// `metering_linger_ms` closes a batch first.
    pub metering_max_batch: usize,
    /// Largest batch of the metering sink in bytes of records (a bound on its memory whatever
    /// the records' size).
    pub metering_max_batch_bytes: usize,
    /// Longest a usage event waits for its batch (milliseconds).
    pub metering_linger_ms: u64,
    /// Most usage events one ClickHouse insert of the metering sink spans: batches join the
    /// open insert until it holds this many (1: an insert per batch). Few large inserts are
    /// what ClickHouse wants (each costs a part of the table and one of each rollup view,
    /// whatever its size); the sink keeps only the ids of an open insert's events, not the
    /// events, so this bounds memory far less than the batch does. The batch that reaches it
    /// joins the insert, so with `metering_max_batch` it may hold at most one ClickHouse insert
    /// block (`max_insert_block_size`, 1,048,576 rows by default): only an insert within one
    /// block is all or nothing when it is given up.
    pub metering_max_insert_events: usize,
    /// Longest an insert of the metering sink stays open before it ends (milliseconds): with
    /// the linger, how long usage takes to reach ClickHouse under steady traffic. An insert
    /// also ends as soon as the usage stops coming.
    pub metering_max_insert_ms: u64,
    /// How long after a month ends the metering stage merges that month's usage facts into one
    /// part, so invoices and reports read it without `FINAL` (seconds; 0: never). Late usage
    /// for the month is merged in the same way at the next look.
    pub metering_compact_after_s: u32,
    /// How often the metering stage looks for closed months to merge (seconds).
    pub metering_compact_every_s: u32,
}

/// Rows of one ClickHouse insert block (`max_insert_block_size`'s default): the most one insert
/// of the metering sink may hold, so that giving it up stores none of it.
const INSERT_BLOCK_ROWS: usize = 1_048_576;

impl Default for StagesConfig {
    fn default() -> Self {
        Self {
            router_max_in_flight: 1024,
            orchestrator_max_in_flight: 4096,
            workflows_max_in_flight: 256,
            metering_max_batch: 50_000,
            metering_max_batch_bytes: 2 << 20,
            metering_linger_ms: 200,
            metering_max_insert_events: 100_000,
            metering_max_insert_ms: 1000,
            metering_compact_after_s: 3600,
            metering_compact_every_s: 300,
        }
    }
}

/// Streaming SQL pipelines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// Whether `sluice up` runs the pipelines (`sluice run sql` always does).
    pub enabled: bool,
    /// Lanes per pipeline (each owns the windows of the partitions it is given).
    pub lanes: usize,
    /// Rows a lane keeps in windows (partial aggregate states, or records' rows for a query
    /// kept whole) beyond which, while window writes fail, it takes no more records (they wait
    /// in the topic) until writes succeed again.
    pub max_held_rows: usize,
    /// The pipelines; by default per-tenant usage rates and per-model latency percentiles per
    /// minute. A `[[sql.pipelines]]` list in the file replaces them.
    pub pipelines: Vec<PipelineConfig>,
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lanes: 4,
            max_held_rows: sluice_sql::DEFAULT_MAX_HELD_ROWS,
            pipelines: sluice_sql::builtin::pipelines(),
        }
    }
}

impl SqlConfig {
    /// Problems with the pipelines' definitions (queries are planned when the stage starts).
    fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.lanes == 0 {
            problems.push("sql.lanes must be at least 1".to_owned());
        }
        let mut names = std::collections::BTreeSet::new();
        for pipeline in &self.pipelines {
            if !names.insert(pipeline.name.as_str()) {
                problems.push(format!("sql.pipelines: {} is defined twice", pipeline.name));
            }
            if pipeline.source != "usage" {
                problems.push(format!(
                    "sql.pipelines: {} reads {:?}; the SQL sources are: usage",
                    pipeline.name, pipeline.source
                ));
            } else if let Err(e) = Pipeline::compile::<UsageEvent>(pipeline) {
                problems.push(e.to_string());
            }
        }
        problems
    }
}

/// Operations endpoint of stage-only processes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    pub listen: String,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Logging settings (the level comes from `RUST_LOG`, default `info`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `pretty`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "json".into(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then `SLUICE_…` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let mut tree = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<toml::Table>(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(path) = name.strip_prefix("SLUICE_") else {
                continue;
            };
            if !path.contains("__") {
                continue;
            }
            let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            set_path(&mut tree, &keys, scalar(&value));
        }
        let config: Config = toml::Value::Table(tree)
            .try_into()
            .context("invalid configuration")?;
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
        }
        Ok(config)
    }

    /// Every problem with the configuration, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = self.kafka.validate();
        problems.extend(self.clickhouse.validate());
        problems.extend(self.edge.validate());
        problems.extend(self.router.validate());
        problems.extend(self.orchestrator.validate());
        problems.extend(self.webhooks.validate());
        problems.extend(self.sql.validate());
        if !["json", "pretty"].contains(&self.log.format.as_str()) {
            problems.push("log.format must be json or pretty".to_owned());
        }
        if self.stages.router_max_in_flight == 0
            || self.stages.orchestrator_max_in_flight == 0
            || self.stages.workflows_max_in_flight == 0
            || self.stages.metering_max_batch == 0
            || self.stages.metering_max_batch_bytes == 0
            || self.stages.metering_max_insert_events == 0
            || self.stages.metering_compact_every_s == 0
        {
            problems.push("stages: in-flight limits and batch sizes must be at least 1".to_owned());
        }
        let largest_insert = self
            .stages
            .metering_max_insert_events
            .saturating_add(self.stages.metering_max_batch);
        if largest_insert > INSERT_BLOCK_ROWS {
            problems.push(format!(
                "stages.metering_max_insert_events plus stages.metering_max_batch must be at most {INSERT_BLOCK_ROWS} (one ClickHouse insert block)"
            ));
        }
        problems
    }
}

/// An environment value as a TOML scalar: integer, float or boolean when it parses as one.
fn scalar(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = value.parse::<f64>() {
        if value.contains('.') {
            return toml::Value::Float(f);
        }
    }
    match value {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(value.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    match keys {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                set_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_then_environment() {
        let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sluice.toml");
        std::fs::write(&file, "[kafka]\nbootstrap = \"file:9092\"\npartitions = 3\n[edge]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let env = [
            ("SLUICE_KAFKA__BOOTSTRAP".to_owned(), "env:9092".to_owned()),
            (
                "SLUICE_ORCHESTRATOR__SIM__TOKENS_PER_SECOND".to_owned(),
                "0.5".to_owned(),
            ),
            ("SLUICE_EDGE__REPLY_TIMEOUT_SECS".to_owned(), "7".to_owned()),
            ("SLUICE_URL".to_owned(), "ignored: no section".to_owned()),
            ("OTHER__X".to_owned(), "ignored".to_owned()),
        ];
        let config = Config::load(Some(&file), env).unwrap();
        assert_eq!(config.kafka.bootstrap, "env:9092");
        assert_eq!(config.kafka.partitions, 3);
        assert_eq!(config.edge.listen, "127.0.0.1:1");
        assert_eq!(config.edge.reply_timeout_secs, 7);
        assert_eq!(config.orchestrator.sim.tokens_per_second, 0.5);
        assert_eq!(config.registry, RegistryConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_every_problem() {
        let env = [("SLUICE_KAFKA__BOOTSTRAPP".to_owned(), "x".to_owned())];
        assert!(Config::load(None, env).is_err());
        let env = [
            ("SLUICE_KAFKA__PARTITIONS".to_owned(), "0".to_owned()),
            ("SLUICE_LOG__FORMAT".to_owned(), "xml".to_owned()),
        ];
        let message = format!("{:#}", Config::load(None, env).unwrap_err());
        assert!(
            message.contains("partitions") && message.contains("log.format"),
            "{message}"
        );
        // The sink's insert, with the batch that reaches its bound, must fit one ClickHouse
        // insert block.
        let env = [(
            "SLUICE_STAGES__METERING_MAX_INSERT_EVENTS".to_owned(),
            "1000000".to_owned(),
        )];
        let message = format!("{:#}", Config::load(None, env).unwrap_err());
        assert!(message.contains("metering_max_insert_events"), "{message}");
        let env = [(
            "SLUICE_STAGES__METERING_MAX_INSERT_EVENTS".to_owned(),
            "998576".to_owned(),
        )];
        assert!(Config::load(None, env).is_ok());
    }
}
