//! A tenant's data export: everything it owns, as one JSON document — its record and plan, its
//! keys (prefixes, never secrets), its users (never password hashes), its CORS origins, its
//! audit log, and its usage facts.

use serde_json::{json, Value};
use sqlx::{types::Uuid, PgConnection, Row};

use crate::{
    clickhouse::usage,
    postgres::{audit, keys, origins, users},
    ClickHouse, Error, Result,
};

/// Every row the tenant owns, as of `exported_at_ms`. Run it in the tenant's transaction (the
/// runtime role) or as the owner.
pub async fn tenant_export(
    conn: &mut PgConnection,
    clickhouse: &ClickHouse,
    tenant_id: Uuid,
    exported_at_ms: i64,
) -> Result<Value> {
    let tenant = sqlx::query(
        "SELECT name, status, (extract(epoch FROM created_at) * 1000)::bigint FROM tenants WHERE id = $1",
    )
    .bind(tenant_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| Error::NotFound(format!("no tenant {tenant_id}")))?;
    let plan: Option<String> = sqlx::query_scalar(
        "SELECT p.name FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.tenant_id = $1",
    )
    .bind(tenant_id)
    .fetch_optional(&mut *conn)
    .await?;
    let keys = keys::list_keys(&mut *conn, tenant_id).await?;
    let members = users::list_members(&mut *conn, tenant_id).await?;
    let origins = origins::list(&mut *conn, tenant_id).await?;
    let mut log = Vec::new();
    let mut before = None;
    loop {
        let page = audit::entries(&mut *conn, Some(tenant_id), before, 1000).await?;
        before = page.last().map(|e| e.id);
        let done = page.len() < 1000;
        log.extend(page);
        if done {
            break;
        }
    }
    let events = usage::tenant_events(clickhouse, &tenant_id.to_string()).await?;
    Ok(json!({
        "object": "tenant.export",
        "exported_at_ms": exported_at_ms,
        "tenant": {
            "id": tenant_id,
            "name": tenant.try_get::<String, _>(0)?,
            "status": tenant.try_get::<String, _>(1)?,
            "created_at_ms": tenant.try_get::<i64, _>(2)?,
            "plan": plan,
            "cors_origins": origins,
        },
        "api_keys": keys,
        "users": members,
        "audit_log": log,
        "usage_events": events,
    }))
}
