//! The audit log: every admin and key action, who did it, when and from where. Append-only (no
//! role may update an entry), readable by the tenant's admins through row-level security and
//! by operators.

use serde::Serialize;
use serde_json::Value;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::Result;

/// One action to record.
#[derive(Debug, Clone)]
pub struct Action<'a> {
    /// The tenant it concerns; `None` for a platform-level action.
    pub tenant_id: Option<Uuid>,
    /// `user:<email>`, `key:<prefix>`, `cli:<operator>`.
    pub actor: &'a str,
    /// `key.create`, `key.revoke`, `member.add`, ...
    pub action: &'a str,
    /// What it was done to (a key's prefix, a member's email, a plan's name).
    pub target: Option<&'a str>,
    pub detail: Value,
    /// The caller's address, or the operator's host.
    pub source: Option<&'a str>,
}

/// Records `action` (in the same transaction as the change, so neither happens alone).
pub async fn record(conn: &mut PgConnection, action: &Action<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, target, detail, source) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(action.tenant_id)
    .bind(action.actor)
    .bind(action.action)
    .bind(action.target)
    .bind(&action.detail)
    .bind(action.source)
    .execute(conn)
    .await?;
    Ok(())
}

/// A recorded action.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    pub id: i64,
    pub tenant_id: Option<Uuid>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    #[schema(value_type = Object)]
    pub detail: Value,
    pub source: Option<String>,
    pub at_ms: i64,
}

/// A tenant's entries (`None`: platform-level ones), newest first, at most `limit`, older than
/// `before` (an entry id) when given.
pub async fn entries(
    conn: &mut PgConnection,
    tenant_id: Option<Uuid>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Entry>> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, actor, action, target, detail, source,
                (extract(epoch FROM at) * 1000)::bigint
           FROM audit_log
          WHERE tenant_id IS NOT DISTINCT FROM $1 AND ($2::bigint IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3",
    )
    .bind(tenant_id)
    .bind(before)
    .bind(limit.clamp(1, 1000))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Entry {
                id: row.try_get(0)?,
                tenant_id: row.try_get(1)?,
                actor: row.try_get(2)?,
                action: row.try_get(3)?,
                target: row.try_get(4)?,
                detail: row.try_get(5)?,
                source: row.try_get(6)?,
                at_ms: row.try_get(7)?,
            })
        })
        .collect()
}
