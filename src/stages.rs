//! Wiring: builds each part from the configuration and runs it until a shutdown signal.
//!
//! Shutdown order: stop accepting HTTP, then let each stage drain its in-flight records, flush
//! its sink and commit its offsets.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use sluice_clickhouse_sink::UsageSink;
use sluice_edge::EdgeDeps;
use sluice_orchestrator::Orchestrator;
use sluice_pipelines::{
    control::{self, ModelCatalog},
    kafka,
    metrics::Metrics,
    ops::{self, Readiness},
    runtime::{self, PerRecord, StageDeps, StageSpec},
    sink::{self, SinkSpec},
};
use sluice_router::Router;
use sluice_schemas::{registry, Codec, RegistryClient, UsageEvent};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The stages that run as consumer groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Router,
    Orchestrator,
    Metering,
    /// Every configured streaming SQL pipeline, each its own consumer group.
    Sql,
}

impl StageKind {
    fn name(self) -> &'static str {
        match self {
            StageKind::Router => "router",
            StageKind::Orchestrator => "orchestrator",
            StageKind::Metering => "metering",
            StageKind::Sql => "sql",
        }
    }
}

/// A codec talking to the configured registry.
pub fn codec(config: &Config) -> anyhow::Result<Arc<Codec>> {
    Ok(Arc::new(Codec::new(RegistryClient::new(
        &config.registry.url,
    )?)))
}

/// Registers our schemas, waiting for the registry to come up (bounded).
async fn register_schemas(codec: &Codec) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        match codec.register_all().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retriable() && attempt < 30 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "schema registry not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("registering schemas"),
        }
    }
}

/// Applies PostgreSQL migrations and ClickHouse DDL.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let admin = control::connect(&config.postgres.admin_url, 2)
        .await
        .context("connecting to PostgreSQL as the owner")?;
    let applied = control::migrate(&admin).await?;
    println!("postgres: {} migration(s) applied", applied.len());
    sluice_clickhouse_sink::schema::migrate(&config.clickhouse)
        .await
        .context("creating ClickHouse tables")?;
    println!("clickhouse: database {} ready", config.clickhouse.database);
    Ok(())
}

/// Creates the topics.
pub async fn create_topics(config: &Config) -> anyhow::Result<()> {
    let topics = config.kafka.topics();
    let created = kafka::ensure_topics(&config.kafka, &topics.all()).await?;
    println!(
        "kafka: {} topic(s) created, {} already there",
        created.len(),
        topics.all().len() - created.len()
    );
    Ok(())
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Shared pieces of a process.
struct Process {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    /// Stops the parts that accept work from outside (the edge); fired first.
    front_cancel: CancellationToken,
    front_tasks: JoinSet<(String, anyhow::Result<()>)>,
    /// Stops the stages, the registry and background loops, once the front has drained.
    cancel: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    /// The model catalogue, loaded once and kept fresh for every part that needs it.
    catalog: Option<Arc<ModelCatalog>>,
}

/// How long the edge may take to finish the requests in flight at shutdown.
const FRONT_DRAIN: Duration = Duration::from_secs(30);

fn report(
    joined: Result<(String, anyhow::Result<()>), tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::info!(part = %name, "part stopped");
            None
        }
        Ok((name, Err(e))) => {
            tracing::error!(part = %name, error = %format!("{e:#}"), "part failed");
            Some(e.context(name))
        }
        Err(e) => Some(anyhow::anyhow!("task panicked: {e}")),
    }
}

impl Process {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            metrics: Arc::new(Metrics::new()?),
            readiness: Readiness::default(),
            front_cancel: CancellationToken::new(),
            front_tasks: JoinSet::new(),
            cancel: CancellationToken::new(),
            tasks: JoinSet::new(),
            catalog: None,
        })
    }

    /// The process's model catalogue: loaded on first use, then refreshed in the background.
    async fn catalog(&mut self, config: &Config) -> anyhow::Result<Arc<ModelCatalog>> {
        if let Some(catalog) = &self.catalog {
            return Ok(catalog.clone());
        }
        let pool = control::connect(&config.postgres.url, 2).await?;
        let catalog = ModelCatalog::load(pool).await?;
        let refresh = Duration::from_secs(config.router.catalog_refresh_secs);
        self.spawn("catalog", {
            let (catalog, cancel) = (catalog.clone(), self.cancel.clone());
            async move {
                catalog.refresh_every(refresh, cancel).await;
                Ok(())
            }
        });
        self.catalog = Some(catalog.clone());
        Ok(catalog)
    }

    fn spawn(
        &mut self,
        name: &str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let name = name.to_owned();
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Spawns a part that accepts work from outside; it stops first at shutdown.
    fn spawn_front(
        &mut self,
        name: &str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let name = name.to_owned();
        self.front_tasks.spawn(async move { (name, task.await) });
    }

    /// Waits for a signal or for any part to end, then shuts down in order: stop accepting
    /// (the edge finishes the requests in flight, while the stages still run to answer them),
    /// then stop the stages, which drain their lanes, flush their sinks and commit offsets.
    async fn run_until_shutdown(mut self) -> anyhow::Result<()> {
        let mut failure = None;
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutting down"),
            Some(joined) = self.tasks.join_next() => failure = report(joined),
            Some(joined) = self.front_tasks.join_next() => failure = report(joined),
        }
        self.front_cancel.cancel();
        let drained = tokio::time::timeout(FRONT_DRAIN, async {
            while let Some(joined) = self.front_tasks.join_next().await {
                if let Some(e) = report(joined) {
                    failure.get_or_insert(e);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("requests still in flight after {FRONT_DRAIN:?}; stopping anyway");
            self.front_tasks.abort_all();
        }
        self.cancel.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Some(e) = report(joined) {
                failure.get_or_insert(e);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn stage_deps(config: &Config, codec: Arc<Codec>, process: &Process) -> StageDeps {
    StageDeps {
        kafka: config.kafka.clone(),
        codec,
        metrics: process.metrics.clone(),
        readiness: process.readiness.clone(),
    }
}

fn build_router(config: &Config, catalog: Arc<ModelCatalog>) -> Router {
    Router::new(catalog, config.router.clone(), config.kafka.topics())
}

fn build_orchestrator(config: &Config) -> anyhow::Result<Orchestrator> {
    Orchestrator::new(config.orchestrator.clone(), config.kafka.topics())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Why `sluice replay sql` is refused.
const SQL_NOT_REPLAYED: &str = "SQL pipelines rebuild their windows from their consumer \
     group's position; to recompute a range, reset the group `<prefix>.sql.<name>` to the \
     range's start";

/// `sluice replay`: the records of the stage's input topic (or `topic`) with timestamps in
/// `[from_ms, to_ms)`, through the stage, outside its consumer group.
pub async fn replay(
    config: &Config,
    kind: StageKind,
    topic: Option<String>,
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<sluice_pipelines::replay::ReplayReport> {
    use sluice_pipelines::replay::{self, ReplayDeps};
    if kind == StageKind::Sql {
        anyhow::bail!(SQL_NOT_REPLAYED);
    }
    let topics = config.kafka.topics();
    let codec = codec(config)?;
    register_schemas(&codec).await?;
    let deps = ReplayDeps {
        kafka: config.kafka.clone(),
        codec,
        metrics: Arc::new(Metrics::new()?),
        dlq_topic: topics.dlq.clone(),
    };
    let stage = kind.name();
    Ok(match kind {
        StageKind::Router => {
            let app_pool = control::connect(&config.postgres.url, 2).await?;
            let router = build_router(config, ModelCatalog::load(app_pool).await?);
            let topic = topic.unwrap_or(topics.requests);
            replay::replay_operator(
                &mut PerRecord(Arc::new(router)),
                stage,
                &topic,
                from_ms,
                to_ms,
                &deps,
            )
            .await?
        }
        StageKind::Orchestrator => {
            let topic = topic.unwrap_or(topics.routed);
            replay::replay_operator(
                &mut PerRecord(Arc::new(build_orchestrator(config)?)),
                stage,
                &topic,
                from_ms,
                to_ms,
                &deps,
            )
            .await?
        }
        StageKind::Metering => {
            let mut sink = UsageSink::new(config.clickhouse.client());
            let topic = topic.unwrap_or(topics.usage);
            let batch = config.stages.metering_max_batch;
            replay::replay_sink(&mut sink, stage, &topic, from_ms, to_ms, batch, &deps).await?
        }
        StageKind::Sql => anyhow::bail!(SQL_NOT_REPLAYED),
    })
}

/// Starts one stage in `process`.
async fn start_stage(
    config: &Config,
    kind: StageKind,
    codec: Arc<Codec>,
    process: &mut Process,
) -> anyhow::Result<()> {
    let topics = config.kafka.topics();
    let deps = stage_deps(config, codec, process);
    let cancel = process.cancel.clone();
    let group = |stage: &str| config.kafka.group(stage);
    if kind != StageKind::Sql {
        process.readiness.register(kind.name());
    }
    match kind {
        StageKind::Router => {
            let catalog = process.catalog(config).await?;
            let router = Arc::new(build_router(config, catalog));
            let mut spec =
                StageSpec::new("router", &group("router"), &topics.requests, &topics.dlq);
            spec.lanes = config.stages.router_lanes;
            process.spawn("router", async move {
                Ok(
                    runtime::run_operator(|_| PerRecord(router.clone()), spec, deps, cancel)
                        .await?,
                )
            });
        }
        StageKind::Orchestrator => {
            let orchestrator = Arc::new(build_orchestrator(config)?);
            let mut spec = StageSpec::new(
                "orchestrator",
                &group("orchestrator"),
                &topics.routed,
                &topics.dlq,
            );
            spec.lanes = config.stages.orchestrator_lanes;
            process.spawn("orchestrator", async move {
                Ok(
                    runtime::run_operator(|_| PerRecord(orchestrator.clone()), spec, deps, cancel)
                        .await?,
                )
            });
        }
        StageKind::Metering => {
            let sink = UsageSink::new(config.clickhouse.client());
            let mut spec =
                SinkSpec::new("metering", &group("metering"), &topics.usage, &topics.dlq);
            spec.max_batch = config.stages.metering_max_batch;
            spec.linger = Duration::from_millis(config.stages.metering_linger_ms);
            process.spawn("metering", async move {
                Ok(sink::run_effectively_once(sink, spec, deps, cancel).await?)
            });
        }
        StageKind::Sql => start_sql(config, deps, process).await?,
    }
    Ok(())
}

/// Starts every configured SQL pipeline as its own stage (`sql.<name>`), lanes by partition.
async fn start_sql(config: &Config, deps: StageDeps, process: &mut Process) -> anyhow::Result<()> {
    use sluice_sql::{ClickHouseTarget, Output, OutputConfig, Pipeline, SqlOperator};
    if config.sql.pipelines.is_empty() {
        return Ok(());
    }
    let topics = config.kafka.topics();
    let catalog = process.catalog(config).await?;
    for definition in &config.sql.pipelines {
        let pipeline =
            Arc::new(Pipeline::compile::<UsageEvent>(definition).map_err(anyhow::Error::msg)?);
        pipeline
            .check_query(&catalog.snapshot())
            .await
            .map_err(anyhow::Error::msg)?;
        let output = Arc::new(match &pipeline.output {
            OutputConfig::Clickhouse(table) => Output::clickhouse(ClickHouseTarget {
                clickhouse: config.clickhouse.clone(),
                table: table.clone(),
            }),
            OutputConfig::Topic(name) => {
                let topic = format!("{}.{name}", config.kafka.topic_prefix);
                kafka::ensure_topics(&config.kafka, &[topic.as_str()]).await?;
                Output::Topic { topic }
            }
        });
        let stage = format!("sql.{}", pipeline.name);
        let group = config.kafka.group(&stage);
        process.readiness.register(&stage);
        let spec = sluice_sql::stage_spec(
            &pipeline,
            &stage,
            &group,
            &topics.usage,
            &topics.dlq,
            config.sql.lanes,
        );
        let max_held_rows = config.sql.max_held_rows;
        let (deps, cancel) = (deps.clone(), process.cancel.clone());
        let catalog = catalog.clone();
        let name = stage.clone();
        process.spawn(&stage, async move {
            let metrics = deps.metrics.clone();
            let make = |_| {
                SqlOperator::<UsageEvent>::new(
                    pipeline.clone(),
                    output.clone(),
                    Some(catalog.clone()),
                    &metrics,
                    &name,
                )
                .with_max_held_rows(max_held_rows)
            };
            Ok(runtime::run_operator(make, spec, deps, cancel).await?)
        });
    }
    Ok(())
}

async fn bind(address: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the {what}"))
}

fn start_registry(process: &mut Process, listener: TcpListener, app_pool: sqlx::PgPool) {
    process.readiness.set("registry", true);
    let cancel = process.cancel.clone();
    process.spawn("registry", async move {
        Ok(ops::serve(listener, registry::service::router(app_pool), cancel).await?)
    });
}

async fn start_edge(
    config: &Config,
    codec: Arc<Codec>,
    process: &mut Process,
) -> anyhow::Result<()> {
    let app_pool = control::connect(&config.postgres.url, config.postgres.max_connections).await?;
    let catalog = process.catalog(config).await?;
    let listener = bind(&config.edge.listen, "edge").await?;
    let deps = EdgeDeps {
        kafka: config.kafka.clone(),
        clickhouse: config.clickhouse.clone(),
        app_pool,
        catalog,
        codec,
        metrics: process.metrics.clone(),
        readiness: process.readiness.clone(),
    };
    process.readiness.register("edge");
    let edge_config = config.edge.clone();
    let cancel = process.front_cancel.clone();
    process.spawn_front("edge", async move {
        sluice_edge::run(edge_config, deps, listener, cancel).await
    });
    tracing::info!(listen = %config.edge.listen, "edge listening");
    Ok(())
}

/// `sluice up`: everything in one process.
pub async fn up(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    for part in ["registry", "router", "orchestrator", "metering", "edge"] {
        process.readiness.register(part);
    }
    let app_pool = control::connect(&config.postgres.url, 4).await?;
    let registry_listener = bind(&config.registry.listen, "schema registry").await?;
    start_registry(&mut process, registry_listener, app_pool);
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    for kind in [
        StageKind::Router,
        StageKind::Orchestrator,
        StageKind::Metering,
        StageKind::Sql,
    ] {
        if kind == StageKind::Sql && !config.sql.enabled {
            continue;
        }
        start_stage(&config, kind, codec.clone(), &mut process).await?;
    }
    start_edge(&config, codec, &mut process).await?;
    process.run_until_shutdown().await
}

/// `sluice edge`.
pub async fn edge_only(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    start_edge(&config, codec, &mut process).await?;
    process.run_until_shutdown().await
}

/// `sluice registry`.
pub async fn registry_only(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    process.readiness.register("registry");
    let app_pool = control::connect(&config.postgres.url, 8).await?;
    let listener = bind(&config.registry.listen, "schema registry").await?;
    start_registry(&mut process, listener, app_pool);
    serve_ops(&config, &mut process).await?;
    process.run_until_shutdown().await
}

/// `sluice run <stage>`.
pub async fn stage_only(config: Config, kind: StageKind) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    start_stage(&config, kind, codec, &mut process).await?;
    serve_ops(&config, &mut process).await?;
    process.run_until_shutdown().await
}

async fn serve_ops(config: &Config, process: &mut Process) -> anyhow::Result<()> {
    let listener = bind(&config.ops.listen, "metrics endpoint").await?;
    let app = ops::router(process.metrics.clone(), process.readiness.clone());
    let cancel = process.cancel.clone();
    process.spawn("ops", async move {
        Ok(ops::serve(listener, app, cancel).await?)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The autoscaling manifests name the groups Sluice's stages really use (with the default
    /// prefix), one scaled object per stage.
    #[test]
    fn keda_manifests_scale_every_stage_on_its_real_group() {
        let config = Config::default();
        let mut groups: Vec<String> = ["router", "orchestrator", "metering"]
            .iter()
            .map(|stage| config.kafka.group(stage))
            .collect();
        groups.extend(
            config
                .sql
                .pipelines
                .iter()
                .map(|p| config.kafka.group(&format!("sql.{}", p.name))),
        );
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/k8s/keda-scaledobjects.yaml"
        );
        let manifest = std::fs::read_to_string(path).unwrap();
        let mut named: Vec<String> = manifest
            .split("group=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect();
        named.sort();
        groups.sort();
        assert_eq!(named, groups);
    }
}
