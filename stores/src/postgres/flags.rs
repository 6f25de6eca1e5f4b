//! Feature flags: global settings and a tenant's own, which override them. [`Flags`] keeps
//! them in memory and reloads them whenever PostgreSQL announces a change (`sluice_flags`), so
//! a process applies a flag without a restart.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{types::Uuid, PgPool, Row};

use super::followed::{Followed, Snapshot};
use crate::{Error, Result};

/// The channel flag changes are announced on.
pub const FLAGS_CHANNEL: &str = "sluice_flags";

/// The flag that switches a model off (`model.<name>`, on unless set): the router neither
/// chooses nor serves it, globally or for one tenant.
pub fn model_flag(model: &str) -> String {
    format!("{MODEL_FLAG_PREFIX}{model}")
}

const MODEL_FLAG_PREFIX: &str = "model.";

/// Every flag setting at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagSettings {
    global: HashMap<String, bool>,
    /// Per tenant, its own settings (looked up on every chat request: by borrowed name, with
    /// no allocation).
    tenants: HashMap<Uuid, HashMap<String, bool>>,
    /// Whether any setting is a `model.<name>` switch (the router looks only then).
    model_switches: bool,
}

impl FlagSettings {
    /// Whether any `model.<name>` switch is set, globally or for a tenant.
    pub fn has_model_switches(&self) -> bool {
        self.model_switches
    }

    /// Whether `name` is on for `tenant`: the tenant's own setting, else the global one, else
    /// `default`.
    pub fn enabled(&self, name: &str, tenant: Option<Uuid>, default: bool) -> bool {
        tenant
            .and_then(|t| self.tenants.get(&t))
            .and_then(|own| own.get(name))
            .or_else(|| self.global.get(name))
            .copied()
            .unwrap_or(default)
    }
}

/// Reads every setting (runtime role, through `sluice_feature_flags`).
pub async fn load(app: &PgPool) -> Result<FlagSettings> {
    let rows = sqlx::query("SELECT name, tenant_id, enabled FROM sluice_feature_flags()")
        .fetch_all(app)
        .await?;
    let mut settings = FlagSettings::default();
    for row in rows {
        let name: String = row.try_get(0)?;
        let tenant: Option<Uuid> = row.try_get(1)?;
        let enabled: bool = row.try_get(2)?;
        match tenant {
            Some(tenant) => settings
                .tenants
                .entry(tenant)
                .or_default()
                .insert(name, enabled),
            None => settings.global.insert(name, enabled),
        };
    }
    settings.model_switches = settings
        .global
        .keys()
        .chain(settings.tenants.values().flat_map(HashMap::keys))
        .any(|name| name.starts_with(MODEL_FLAG_PREFIX));
    Ok(settings)
}

/// Sets a flag, globally or for one tenant (owner role).
pub async fn set(admin: &PgPool, name: &str, tenant: Option<Uuid>, enabled: bool) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if !valid {
        return Err(Error::Invalid(format!(
            "{name:?} is not a flag name: lower-case letters, digits, `_`, `.`, `-`"
        )));
    }
    let mut tx = admin.begin().await?;
    sqlx::query("DELETE FROM feature_flags WHERE name = $1 AND tenant_id IS NOT DISTINCT FROM $2")
        .bind(name)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO feature_flags (name, tenant_id, enabled) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(tenant)
        .bind(enabled)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a setting, globally or for one tenant (owner role); whether there was one.
pub async fn unset(admin: &PgPool, name: &str, tenant: Option<Uuid>) -> Result<bool> {
    let removed = sqlx::query(
        "DELETE FROM feature_flags WHERE name = $1 AND tenant_id IS NOT DISTINCT FROM $2",
    )
    .bind(name)
    .bind(tenant)
    .execute(admin)
    .await?;
    Ok(removed.rows_affected() > 0)
}

/// One setting, as operators list them.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub name: String,
    /// The tenant's name; `None` for a global setting.
    pub tenant: Option<String>,
    pub enabled: bool,
}

/// Every setting, by name (owner role).
pub async fn list(admin: &PgPool) -> Result<Vec<Setting>> {
    let rows = sqlx::query(
        "SELECT f.name, t.name, f.enabled FROM feature_flags f LEFT JOIN tenants t ON t.id = f.tenant_id
          ORDER BY f.name, t.name NULLS FIRST",
    )
    .fetch_all(admin)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Setting {
                name: row.try_get(0)?,
                tenant: row.try_get(1)?,
                enabled: row.try_get(2)?,
            })
        })
        .collect()
}

/// The flag settings in force in this process, kept current by [`Followed::follow`].
pub type Flags = Followed<FlagSettings>;

impl Snapshot for FlagSettings {
    const CHANNEL: &'static str = FLAGS_CHANNEL;
    const WHAT: &'static str = "feature flags";

    async fn load(app: &PgPool) -> Result<Self> {
        load(app).await
    }
}

impl Flags {
    /// Whether `name` is on for `tenant` (see [`FlagSettings::enabled`]).
    pub fn enabled(&self, name: &str, tenant: Option<Uuid>, default: bool) -> bool {
        self.get().enabled(name, tenant, default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_setting_overrides_the_global_one() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut settings = FlagSettings::default();
        settings.global.insert("chat".into(), false);
        settings
            .tenants
            .entry(a)
            .or_default()
            .insert("chat".into(), true);
        assert!(settings.enabled("chat", Some(a), true));
        assert!(!settings.enabled("chat", Some(b), true));
        assert!(!settings.enabled("chat", None, true));
        assert!(settings.enabled("other", Some(a), true), "the default");
    }
}
