//! The workflow registry (`workflows`, `workflow_settings`): every published version of every
//! workflow, built-in (no tenant) or a tenant's own, with the intents it answers; a tenant sees
//! the built-in ones and its own (its own shadowing a built-in one of the same name), and may
//! turn any of them off. Every query names the tenant, so it holds run as the owner (the CLI)
//! as well as in the tenant's transaction.

use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::{Error, Result};

/// The intent whose workflow `workflow/auto` runs: the tenant's entry point that triages a
/// message to the right way (the built-in `customer_support`, unless the tenant has its own).
pub const AUTO_INTENT: &str = "support";

/// What is published: a definition already checked, with what the registry keeps of it.
#[derive(Debug, Clone)]
pub struct Publication<'a> {
    pub name: &'a str,
    /// The definition's own `version`.
    pub version: i32,
    pub description: &'a str,
    pub intents: &'a [String],
    /// The tenant tools its steps call.
    pub tools: &'a [String],
    /// The definition's YAML, as written.
    pub definition: &'a str,
}

/// A workflow as a tenant sees it: its latest version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub version: i32,
    pub description: String,
    pub intents: Vec<String>,
    /// Whether it is the tenant's own (else built-in).
    pub own: bool,
    pub enabled: bool,
    /// The tenant tools it calls, and whether the tenant has each of them (enabled).
    pub tools: Vec<String>,
    pub ready: bool,
}

/// Publishes `publication` for `tenant` (`None`: built-in) under its own version; returns
/// whether that version is new. A version already published with the same text is left alone;
/// with other text, or a version not above the latest, is refused: versions are immutable and
/// only go up, so a run always names exactly what it followed. Publications of one workflow
/// take turns.
pub async fn publish(
    conn: &mut PgConnection,
    tenant: Option<Uuid>,
    publication: &Publication<'_>,
) -> Result<bool> {
    let owner = tenant.map(|t| t.to_string()).unwrap_or_default();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice-workflow:' || $1 || ':' || $2))")
        .bind(&owner)
        .bind(publication.name)
        .execute(&mut *conn)
        .await?;
    let same = sqlx::query_scalar::<_, String>(
        "SELECT definition FROM workflows \
         WHERE tenant_id IS NOT DISTINCT FROM $1 AND name = $2 AND version = $3",
    )
    .bind(tenant)
    .bind(publication.name)
    .bind(publication.version)
    .fetch_optional(&mut *conn)
    .await?;
    match same {
        Some(text) if text == publication.definition => return Ok(false),
        Some(_) => {
            return Err(Error::Invalid(format!(
                "version {} of {} is published with other text: raise `version`",
                publication.version, publication.name
            )))
        }
        None => {}
    }
    let latest: Option<i32> = sqlx::query_scalar(
        "SELECT max(version) FROM workflows WHERE tenant_id IS NOT DISTINCT FROM $1 AND name = $2",
    )
    .bind(tenant)
    .bind(publication.name)
    .fetch_one(&mut *conn)
    .await?;
    if let Some(latest) = latest.filter(|l| *l >= publication.version) {
        return Err(Error::Invalid(format!(
            "{} is at version {latest}: a new version must be above it",
            publication.name
        )));
    }
    sqlx::query(
        "INSERT INTO workflows (tenant_id, name, version, definition, description, intents, tools) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(tenant)
    .bind(publication.name)
    .bind(publication.version)
    .bind(publication.definition)
    .bind(publication.description)
    .bind(publication.intents)
    .bind(publication.tools)
    .execute(conn)
    .await?;
    Ok(true)
}

/// The workflows `tenant` sees (`None`: the built-in ones), each at its latest version, by
/// name.
pub async fn list(conn: &mut PgConnection, tenant: Option<Uuid>) -> Result<Vec<Entry>> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (w.name) w.name, w.version, w.description, w.intents, \
                w.tenant_id IS NOT NULL, coalesce(s.enabled, true), w.tools, \
                NOT EXISTS (SELECT 1 FROM unnest(w.tools) AS needed(name) WHERE NOT EXISTS ( \
                    SELECT 1 FROM tools t WHERE t.name = needed.name AND t.enabled \
                       AND (t.tenant_id IS NULL OR t.tenant_id = $1))) \
           FROM workflows w \
           LEFT JOIN workflow_settings s ON s.tenant_id = $1 AND s.name = w.name \
          WHERE w.tenant_id IS NULL OR w.tenant_id = $1 \
          ORDER BY w.name, (w.tenant_id IS NULL), w.version DESC",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Entry {
                name: row.try_get(0)?,
                version: row.try_get(1)?,
                description: row.try_get(2)?,
                intents: row.try_get(3)?,
                own: row.try_get(4)?,
                enabled: row.try_get(5)?,
                tools: row.try_get(6)?,
                ready: row.try_get(7)?,
            })
        })
        .collect()
}

/// The definition of `name` that `tenant` runs: its own if it has one, else the built-in one;
/// at `version`, or the latest. `(version, YAML)`.
pub async fn definition(
    conn: &mut PgConnection,
    tenant: Uuid,
    name: &str,
    version: Option<i32>,
) -> Result<Option<(i32, String)>> {
    let row = sqlx::query(
        "SELECT version, definition FROM workflows \
          WHERE (tenant_id IS NULL OR tenant_id = $1) AND name = $2 \
            AND ($3::integer IS NULL OR version = $3) \
          ORDER BY (tenant_id IS NULL), version DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .fetch_optional(conn)
    .await?;
    row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .transpose()
}

/// The workflow `tenant` runs for `intent`: one it has on and whose tenant tools it has, its own
/// before built-in ones, then by name.
pub async fn for_intent(
    conn: &mut PgConnection,
    tenant: Uuid,
    intent: &str,
) -> Result<Option<Entry>> {
    let entries = list(conn, Some(tenant)).await?;
    let mut candidates: Vec<Entry> = entries
        .into_iter()
        .filter(|e| e.enabled && e.ready && e.intents.iter().any(|i| i == intent))
        .collect();
    candidates.sort_by(|a, b| b.own.cmp(&a.own).then_with(|| a.name.cmp(&b.name)));
    Ok(candidates.into_iter().next())
}

/// Turns `name` on or off for `tenant`.
pub async fn set_enabled(
    conn: &mut PgConnection,
    tenant: Uuid,
    name: &str,
    enabled: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO workflow_settings (tenant_id, name, enabled) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id, name) DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()",
    )
    .bind(tenant)
    .bind(name)
    .bind(enabled)
    .execute(conn)
    .await?;
    Ok(())
}
