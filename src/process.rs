//! A Sluice process: the parts it runs (edge, registry, stages, the operations endpoint), what
//! they share (metrics, readiness, the model catalogue), and how it shuts down.
//!
//! Shutdown order: stop accepting HTTP, then let each stage drain its in-flight records, flush
//! its sink and commit its offsets.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use sluice_edge::EdgeDeps;
use sluice_pipelines::{
    kafka::Producers,
    metrics::Metrics,
    ops::{self, Readiness},
    replay::{ReplayDeps, ReplayReport},
    runtime::StageDeps,
    ReplayRange,
};
use sluice_schemas::{Codec, RegistryClient};
use sluice_stores::{
    postgres::{self, flags::Flags},
    ModelCatalog,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, stages::Stage};

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
pub struct Process {
    pub metrics: Arc<Metrics>,
    readiness: Readiness,
    /// Stops the parts that accept work from outside (the edge); fired first.
    front_cancel: CancellationToken,
    front_tasks: JoinSet<(String, anyhow::Result<()>)>,
    /// Stops the stages, the registry and background loops, once the front has drained.
    cancel: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    /// The model catalogue, loaded once and kept fresh for every part that needs it.
    catalog: Option<Arc<ModelCatalog>>,
    flags: Option<Arc<Flags>>,
    /// The producers every part of the process sends through, made on first use.
    producers: Option<Producers>,
}

/// A part of a process: runs until it stops or fails.
trait Part: std::future::Future<Output = anyhow::Result<()>> + Send + 'static {}
impl<F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static> Part for F {}

/// Spawns `task` in `set` under `name`, so its outcome is reported with its name.
fn spawn_named(set: &mut JoinSet<(String, anyhow::Result<()>)>, name: &str, task: impl Part) {
    let name = name.to_owned();
    set.spawn(async move { (name, task.await) });
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
        Err(e) => Some(anyhow::Error::new(e).context("a part's task panicked")),
    }
}

impl Process {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            metrics: Arc::new(Metrics::new()?),
            readiness: Readiness::default(),
            front_cancel: CancellationToken::new(),
            front_tasks: JoinSet::new(),
            cancel: CancellationToken::new(),
            tasks: JoinSet::new(),
            catalog: None,
            flags: None,
            producers: None,
        })
    }

    /// The process's producers, one per profile, shared by its edge and stages.
    pub(crate) fn producers(&mut self, config: &Config) -> anyhow::Result<Producers> {
        if let Some(producers) = &self.producers {
            return Ok(producers.clone());
        }
        let producers = Producers::new(&config.kafka).context("starting the producers")?;
        self.producers = Some(producers.clone());
        Ok(producers)
    }

    /// The process's model catalogue: loaded on first use, then refreshed in the background.
    /// The feature flags, loaded once per process and followed live.
    pub async fn flags(&mut self, config: &Config) -> anyhow::Result<Arc<Flags>> {
        if let Some(flags) = &self.flags {
            return Ok(flags.clone());
        }
        let pool = postgres::connect(&config.postgres.url, 2).await?;
        let flags = Flags::load(&pool).await?;
        self.spawn("flags", {
            let (flags, cancel) = (flags.clone(), self.cancel.clone());
            async move {
                flags.follow(pool, cancel).await;
                Ok(())
            }
        });
        self.flags = Some(flags.clone());
        Ok(flags)
    }

    pub async fn catalog(&mut self, config: &Config) -> anyhow::Result<Arc<ModelCatalog>> {
        if let Some(catalog) = &self.catalog {
            return Ok(catalog.clone());
        }
        let pool = postgres::connect(&config.postgres.url, 2).await?;
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

    fn spawn(&mut self, name: &str, task: impl Part) {
        spawn_named(&mut self.tasks, name, task);
    }

    /// Runs `task` beside the stages (a loop a stage keeps, such as a timeout sweep); it is
    /// given the token that stops the stages.
    pub(crate) fn spawn_beside<F>(&mut self, name: &str, task: impl FnOnce(CancellationToken) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let running = task(self.cancel.clone());
        self.spawn(name, async move {
            running.await;
            Ok(())
        });
    }

    /// Spawns a part that accepts work from outside; it stops first at shutdown.
    fn spawn_front(&mut self, name: &str, task: impl Part) {
        spawn_named(&mut self.front_tasks, name, task);
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

impl Process {
    /// Builds `stages` and starts every runnable part in this process.
    async fn start_stages(
        &mut self,
        config: &Config,
        codec: Arc<Codec>,
        stages: &[Stage],
    ) -> anyhow::Result<()> {
        let deps = StageDeps {
            kafka: config.kafka.clone(),
            producers: self.producers(config)?,
            codec,
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
        };
        for stage in stages {
            for runnable in stage.build(config, self).await? {
                let name = runnable.name().to_owned();
                self.readiness.register(&name);
                let (deps, cancel) = (deps.clone(), self.cancel.clone());
                self.spawn(&name, async move { Ok(runnable.run(deps, cancel).await?) });
            }
        }
        Ok(())
    }

    fn start_registry(&mut self, listener: TcpListener, app_pool: sqlx::PgPool) {
        self.readiness.set("registry", true);
        let cancel = self.cancel.clone();
        self.spawn("registry", async move {
            Ok(ops::serve(listener, sluice_edge::registry::router(app_pool), cancel).await?)
        });
    }

    async fn start_edge(&mut self, config: &Config, codec: Arc<Codec>) -> anyhow::Result<()> {
        let app_pool =
            postgres::connect(&config.postgres.url, config.postgres.max_connections).await?;
        let catalog = self.catalog(config).await?;
        let listener = bind(&config.edge.listen, "edge").await?;
        let deps = EdgeDeps {
            kafka: config.kafka.clone(),
            producers: self.producers(config)?,
            clickhouse: config.clickhouse.clone(),
            app_pool,
            catalog,
            codec,
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            limiter: sluice_stores::limits::Limiter::new(&config.redis)?,
        };
        self.readiness.register("edge");
        let edge_config = config.edge.clone();
        let cancel = self.front_cancel.clone();
        self.spawn_front("edge", async move {
            Ok(sluice_edge::run(edge_config, deps, listener, cancel).await?)
        });
        tracing::info!(listen = %config.edge.listen, "edge listening");
        Ok(())
    }

    /// `/metrics`, `/healthz` and `/readyz` on `ops.listen`, for processes without an edge.
    async fn serve_ops(&mut self, config: &Config) -> anyhow::Result<()> {
        let listener = bind(&config.ops.listen, "metrics endpoint").await?;
        let app = ops::router(self.metrics.clone(), self.readiness.clone());
        let cancel = self.cancel.clone();
        self.spawn("ops", async move {
            Ok(ops::serve(listener, app, cancel).await?)
        });
        Ok(())
    }
}

async fn bind(address: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the {what}"))
}

/// `sluice up`: everything in one process.
pub async fn up(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    let stages: Vec<Stage> = Stage::ALL
        .into_iter()
        .filter(|stage| stage.runs_in_up(&config))
        .collect();
    for part in ["registry", "edge"] {
        process.readiness.register(part);
    }
    let app_pool = postgres::connect(&config.postgres.url, 4).await?;
    let registry_listener = bind(&config.registry.listen, "schema registry").await?;
    process.start_registry(registry_listener, app_pool);
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    process
        .start_stages(&config, codec.clone(), &stages)
        .await?;
    process.start_edge(&config, codec).await?;
    process.run_until_shutdown().await
}

/// `sluice edge`.
pub async fn edge_only(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    process.start_edge(&config, codec).await?;
    process.run_until_shutdown().await
}

/// `sluice registry`.
pub async fn registry_only(config: Config) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    process.readiness.register("registry");
    let app_pool = postgres::connect(&config.postgres.url, 8).await?;
    let listener = bind(&config.registry.listen, "schema registry").await?;
    process.start_registry(listener, app_pool);
    process.serve_ops(&config).await?;
    process.run_until_shutdown().await
}

/// `sluice run <stage>`.
pub async fn stage_only(config: Config, stage: Stage) -> anyhow::Result<()> {
    let mut process = Process::new()?;
    let codec = codec(&config)?;
    register_schemas(&codec).await?;
    process.start_stages(&config, codec, &[stage]).await?;
    process.serve_ops(&config).await?;
    process.run_until_shutdown().await
}

/// `sluice replay`: the records of the stage's input topic (or `range.topic`) with timestamps
/// in the range, through the stage, outside its consumer group.
pub async fn replay(
    config: &Config,
    stage: Stage,
    range: ReplayRange,
) -> anyhow::Result<ReplayReport> {
    if let Some(why) = stage.replay_refusal() {
        anyhow::bail!(why);
    }
    let codec = codec(config)?;
    register_schemas(&codec).await?;
    let mut process = Process::new()?;
    let deps = ReplayDeps {
        kafka: config.kafka.clone(),
        codec,
        metrics: process.metrics.clone(),
        dlq_topic: config.kafka.topics().dlq,
    };
    let mut runnables = stage.build(config, &mut process).await?.into_iter();
    let (Some(runnable), None) = (runnables.next(), runnables.next()) else {
        anyhow::bail!("{stage:?} does not run as one stage and cannot be replayed");
    };
    Ok(runnable.replay(range, &deps).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The autoscaling manifests name the groups Sluice's stages really use (with the default
    /// prefix), one scaled object per stage.
    #[test]
    fn keda_manifests_scale_every_stage_on_its_real_group() {
        let config = Config::default();
        let mut groups: Vec<String> = ["router", "orchestrator", "metering", "webhooks"]
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
