//! A tenant's own tools (`tools`): endpoints its workflows call, each with a name the workflow
//! steps use, a kind (`http`) and its settings. Every query names the tenant, so it holds run
//! as the owner (the CLI) as well as in the tenant's transaction.

use serde::Serialize;
use serde_json::Value;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::Result;

/// A tool as its tenant sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tool {
    pub name: String,
    pub kind: String,
    pub config: Value,
    pub enabled: bool,
}

/// Adds tool `name` of `kind` for `tenant`, or changes its settings (turning it on); returns
/// whether it is new.
pub async fn put(
    conn: &mut PgConnection,
    tenant: Uuid,
    name: &str,
    kind: &str,
    config: &Value,
) -> Result<bool> {
    let new: bool = sqlx::query_scalar(
        "INSERT INTO tools (tenant_id, name, kind, config) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name) \
         DO UPDATE SET kind = EXCLUDED.kind, config = EXCLUDED.config, enabled = true \
         RETURNING xmax = 0",
    )
    .bind(tenant)
    .bind(name)
    .bind(kind)
    .bind(config)
    .fetch_one(conn)
    .await?;
    Ok(new)
}

/// The tenant's own tools, by name.
pub async fn list(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<Tool>> {
    let rows = sqlx::query(
        "SELECT name, kind, config, enabled FROM tools WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Tool {
                name: row.try_get(0)?,
                kind: row.try_get(1)?,
                config: row.try_get(2)?,
                enabled: row.try_get(3)?,
            })
        })
        .collect()
}

/// The enabled tool `name` a run of `tenant` calls: the tenant's own, else a platform-wide one.
pub async fn find(conn: &mut PgConnection, tenant: Uuid, name: &str) -> Result<Option<Tool>> {
    let row = sqlx::query(
        "SELECT name, kind, config, enabled FROM tools \
          WHERE name = $1 AND enabled AND (tenant_id = $2 OR tenant_id IS NULL) \
          ORDER BY tenant_id IS NULL LIMIT 1",
    )
    .bind(name)
    .bind(tenant)
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(Tool {
            name: row.try_get(0)?,
            kind: row.try_get(1)?,
            config: row.try_get(2)?,
            enabled: row.try_get(3)?,
        })
    })
    .transpose()
}

/// Turns the tenant's tool `name` on or off; whether it has one.
pub async fn set_enabled(
    conn: &mut PgConnection,
    tenant: Uuid,
    name: &str,
    enabled: bool,
) -> Result<bool> {
    let changed = sqlx::query("UPDATE tools SET enabled = $3 WHERE tenant_id = $1 AND name = $2")
        .bind(tenant)
        .bind(name)
        .bind(enabled)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(changed > 0)
}
