//! The stages Sluice runs as consumer groups: one closed enum, one file per stage. Each file's
//! `build` turns the configuration into runnable stages ([`Runnable`]); `sluice up`, `sluice
//! run <stage>` and `sluice replay <stage>` all go through [`Stage::build`]. A new stage is a
//! variant here and a file beside this one.

mod knowledge;
mod metering;
mod orchestrator;
mod router;
mod sql;
mod webhooks;
mod workflows;

use sluice_pipelines::Runnable;

use crate::{config::Config, process::Process};

/// A stage that runs as its own consumer group (or groups, for SQL: one per pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Chooses a model for each request (`sluice.requests` → `sluice.routed`).
    Router,
    /// Calls the model, streams replies and emits usage (`sluice.routed` → `sluice.replies`,
    /// `sluice.usage`).
    Orchestrator,
    /// Writes usage to ClickHouse exactly once per event (`sluice.usage` → `usage_events`).
    Metering,
    /// The streaming SQL pipelines (`[sql]` in the configuration).
    Sql,
    /// Delivers notifications to tenants' webhook endpoints (`sluice.notifications` → HTTP).
    Webhooks,
    /// Runs workflows one step per event (`sluice.workflow-events` → the next event, tool
    /// calls and results, usage, replies).
    Workflows,
    /// Indexes tenants' documents for their knowledge (`sluice.documents` → PostgreSQL).
    Knowledge,
}

impl Stage {
    /// Every stage, in the order `sluice up` starts them.
    pub const ALL: [Stage; 7] = [
        Stage::Router,
        Stage::Orchestrator,
        Stage::Workflows,
        Stage::Metering,
        Stage::Sql,
        Stage::Webhooks,
        Stage::Knowledge,
    ];

    /// Whether `sluice up` runs the stage with this configuration.
    pub fn runs_in_up(self, config: &Config) -> bool {
        match self {
            Stage::Sql => config.sql.enabled,
            Stage::Router
            | Stage::Orchestrator
            | Stage::Metering
            | Stage::Webhooks
            | Stage::Workflows
            | Stage::Knowledge => true,
        }
    }

    /// Why `sluice replay` refuses the stage, if it does.
    pub fn replay_refusal(self) -> Option<&'static str> {
        match self {
            Stage::Sql => Some(sql::NOT_REPLAYED),
            Stage::Webhooks => Some(webhooks::NOT_REPLAYED),
            Stage::Workflows => Some(workflows::NOT_REPLAYED),
            Stage::Router | Stage::Orchestrator | Stage::Metering | Stage::Knowledge => None,
        }
    }

    /// The stage's runnable parts, built from `config` with what `process` shares (the model
    /// catalogue).
    pub async fn build(
        self,
        config: &Config,
        process: &mut Process,
    ) -> anyhow::Result<Vec<Runnable>> {
        Ok(match self {
            Stage::Router => vec![router::build(config, process).await?],
            Stage::Orchestrator => vec![orchestrator::build(config)?],
            Stage::Metering => vec![metering::build(config)],
            Stage::Sql => sql::build(config, process).await?,
            Stage::Webhooks => vec![webhooks::build(config, process).await?],
            Stage::Workflows => vec![workflows::build(config, process).await?],
            Stage::Knowledge => vec![knowledge::build(config)?],
        })
    }
}
