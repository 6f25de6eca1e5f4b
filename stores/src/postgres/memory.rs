//! Conversation memory (`conversation_turns`): the turns of sessions whose callers asked Sluice
//! to remember them. Each turn is the caller's new messages and the assistant's reply, written
//! once per request; a session's history is its latest turns. Every query names the tenant (and
//! runs in its transaction, under row-level security).

use serde_json::Value;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::Result;

/// Records a turn of `session` (once per `request_id`: a redelivered request adds nothing).
pub async fn record_turn(
    conn: &mut PgConnection,
    tenant: Uuid,
    session: &str,
    request_id: &str,
    messages: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO conversation_turns (tenant_id, session_id, request_id, messages) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, request_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(session)
    .bind(request_id)
    .bind(messages)
    .execute(conn)
    .await?;
    Ok(())
}

/// The latest `turns` turns of `session`, newest first: each its messages (a JSON array).
pub async fn latest_turns(
    conn: &mut PgConnection,
    tenant: Uuid,
    session: &str,
    turns: i64,
) -> Result<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT messages FROM conversation_turns WHERE tenant_id = $1 AND session_id = $2 \
         ORDER BY created_at DESC, request_id DESC LIMIT $3",
    )
    .bind(tenant)
    .bind(session)
    .bind(turns)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}
