//! The model catalogue: which models exist, who serves them (a closed set of provider kinds),
//! their context windows and prices. Global, not tenant-owned: every tenant may call every
//! enabled model.

use std::{
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// The model name that asks the router to choose a model.
pub const AUTO_MODEL: &str = "auto";

/// Who serves a model. The set is closed: each kind is dispatched in one `match` in the
/// orchestrator, and the catalogue refuses a kind not listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Sluice's built-in simulator (demos, tests, benchmarks).
    Sim,
    /// Any OpenAI-compatible upstream, by base URL.
    Openai,
}

impl ProviderKind {
    /// Every kind.
    pub const ALL: [ProviderKind; 2] = [ProviderKind::Sim, ProviderKind::Openai];

    /// The kind's name in the catalogue, the configuration and routing decisions.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Sim => "sim",
            ProviderKind::Openai => "openai",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                Error::Invalid(format!(
                    "unknown provider kind {name:?}; the kinds are: {}",
                    known.join(", ")
                ))
            })
    }
}

/// A model in the catalogue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub provider: ProviderKind,
    pub upstream_model: String,
    /// Base URL of the upstream (provider `openai`).
    pub base_url: Option<String>,
    /// Environment variable holding the upstream's key; the key itself is never stored.
    pub api_key_env: Option<String>,
    pub context_window: i32,
    /// Micro-dollars per million input tokens.
    pub input_price_micros: i64,
    /// Micro-dollars per million output tokens.
    pub output_price_micros: i64,
    /// Unix seconds.
    pub created_at: i64,
}

impl ModelSpec {
    /// Every problem with the model, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name.trim().is_empty() || self.name == AUTO_MODEL {
            problems.push(format!(
                "a model needs a name other than {AUTO_MODEL:?} (which asks the router to choose)"
            ));
        }
        if self.upstream_model.trim().is_empty() {
            problems.push("the upstream model name must not be empty".to_owned());
        }
        if self.provider == ProviderKind::Openai && self.base_url.is_none() {
            problems.push("provider openai needs a base URL".to_owned());
        }
        if self.context_window < 1 {
            problems.push("the context window must be at least 1 token".to_owned());
        }
        if self.input_price_micros < 0 || self.output_price_micros < 0 {
            problems.push("prices must not be negative".to_owned());
        }
        problems
    }
}

/// Every enabled model, cheapest first. A model whose provider kind this build does not know
/// (written by a newer Sluice) is left out, with an error in the log naming it.
pub async fn enabled_models(pool: &PgPool) -> Result<Vec<ModelSpec>> {
    let rows = sqlx::query(
        "SELECT name, provider, upstream_model, base_url, api_key_env, context_window, \
                input_price_micros, output_price_micros, extract(epoch from created_at)::bigint \
           FROM models WHERE enabled ORDER BY input_price_micros + output_price_micros, name",
    )
    .fetch_all(pool)
    .await?;
    let mut models = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get(0)?;
        let provider: String = row.try_get(1)?;
        let provider = match provider.parse::<ProviderKind>() {
            Ok(kind) => kind,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "model left out of the catalogue");
                continue;
            }
        };
        models.push(ModelSpec {
            name,
            provider,
            upstream_model: row.try_get(2)?,
            base_url: row.try_get(3)?,
            api_key_env: row.try_get(4)?,
            context_window: row.try_get(5)?,
            input_price_micros: row.try_get(6)?,
            output_price_micros: row.try_get(7)?,
            created_at: row.try_get(8)?,
        });
    }
    Ok(models)
}

/// Adds or replaces a model in the catalogue (owner role); a model with problems is refused
/// with all of them. A new model, or new catalogue prices, become the price book's next version
/// for it, in force from now (unless the book already prices a model new to the catalogue).
pub async fn upsert_model(admin: &PgPool, model: &ModelSpec) -> Result<()> {
    let problems = model.validate();
    if !problems.is_empty() {
        return Err(Error::Invalid(format!(
            "model {}: {}",
            model.name,
            problems.join("; ")
        )));
    }
    let mut tx = admin.begin().await?;
    let previous: Option<(i64, i64)> = sqlx::query_as(
        "SELECT input_price_micros, output_price_micros FROM models WHERE name = $1 FOR UPDATE",
    )
    .bind(&model.name)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO models (name, provider, upstream_model, base_url, api_key_env, context_window, \
                             input_price_micros, output_price_micros, enabled) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true) \
         ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider, upstream_model = EXCLUDED.upstream_model, \
             base_url = EXCLUDED.base_url, api_key_env = EXCLUDED.api_key_env, context_window = EXCLUDED.context_window, \
             input_price_micros = EXCLUDED.input_price_micros, output_price_micros = EXCLUDED.output_price_micros, enabled = true",
    )
    .bind(&model.name)
    .bind(model.provider.as_str())
    .bind(&model.upstream_model)
    .bind(&model.base_url)
    .bind(&model.api_key_env)
    .bind(model.context_window)
    .bind(model.input_price_micros)
    .bind(model.output_price_micros)
    .execute(&mut *tx)
    .await?;
    // The price book follows the catalogue's price changes (not its re-saves): a new model with
    // no price yet, or new catalogue prices, become a version in force from now on, keeping the
    // book's cached-input price. The past keeps the prices it had.
    let changed = match previous {
        Some(prices) => prices != (model.input_price_micros, model.output_price_micros),
        None => true,
    };
    if changed {
        sqlx::query(
            "INSERT INTO price_versions (item, input_per_mtok, output_per_mtok, cached_input_per_mtok, valid_from) \
             SELECT $1, $2, $3, coalesce(( \
                    SELECT cached_input_per_mtok FROM price_versions \
                     WHERE item = $1 AND valid_from <= now() ORDER BY valid_from DESC LIMIT 1), 0), now() \
              WHERE $4 OR NOT EXISTS (SELECT 1 FROM price_versions WHERE item = $1)",
        )
        .bind(crate::billing::prices::model_item(&model.name))
        .bind(model.input_price_micros)
        .bind(model.output_price_micros)
        .bind(previous.is_some())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Disables a model (owner role); callers get 404 for it once catalogues refresh.
pub async fn disable_model(admin: &PgPool, name: &str) -> Result<bool> {
    let result = sqlx::query("UPDATE models SET enabled = false WHERE name = $1 AND enabled")
        .bind(name)
        .execute(admin)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// The model catalogue, held in memory and refreshed from PostgreSQL in the background, so the
/// request path never waits on the database for it.
pub struct ModelCatalog {
    pool: PgPool,
    models: RwLock<Arc<Vec<ModelSpec>>>,
}

impl ModelCatalog {
    /// Loads the catalogue once.
    pub async fn load(pool: PgPool) -> Result<Arc<Self>> {
        let models = enabled_models(&pool).await?;
        Ok(Arc::new(Self {
            pool,
            models: RwLock::new(Arc::new(models)),
        }))
    }

    /// The models as of the last refresh, cheapest first.
    pub fn snapshot(&self) -> Arc<Vec<ModelSpec>> {
        self.models
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// The enabled model called `name`.
    pub fn find(&self, name: &str) -> Option<ModelSpec> {
        self.snapshot().iter().find(|m| m.name == name).cloned()
    }

    /// Reloads from PostgreSQL.
    pub async fn refresh(&self) -> Result<()> {
        let fresh = Arc::new(enabled_models(&self.pool).await?);
        if let Ok(mut models) = self.models.write() {
            *models = fresh;
        }
        Ok(())
    }

    /// Refreshes every `every` until `cancel` fires; failures keep the last good catalogue.
    pub async fn refresh_every(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "model catalogue refresh failed; keeping the last one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(provider: ProviderKind, base_url: Option<&str>) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            provider,
            upstream_model: "m".into(),
            base_url: base_url.map(str::to_owned),
            api_key_env: None,
            context_window: 8,
            input_price_micros: 0,
            output_price_micros: 0,
            created_at: 0,
        }
    }

    #[test]
    fn provider_kinds_are_a_closed_set_named_in_one_place() {
        for kind in ProviderKind::ALL {
            assert_eq!(kind.as_str().parse::<ProviderKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        let error = "anthropic".parse::<ProviderKind>().unwrap_err().to_string();
        assert!(
            error.contains("anthropic") && error.contains("sim, openai"),
            "{error}"
        );
    }

    #[test]
    fn a_model_reports_every_problem() {
        assert!(model(ProviderKind::Sim, None).validate().is_empty());
        assert!(model(ProviderKind::Openai, Some("http://x/v1"))
            .validate()
            .is_empty());
        let mut bad = model(ProviderKind::Openai, None);
        bad.name = AUTO_MODEL.into();
        bad.context_window = 0;
        assert_eq!(bad.validate().len(), 3, "{:?}", bad.validate());
    }
}
