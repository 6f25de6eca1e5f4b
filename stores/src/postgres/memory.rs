//! Conversation memory (`conversation_turns`): the turns of sessions whose callers asked Sluice
//! to remember them. Each turn is the caller's new messages and the assistant's reply, written
//! once per request; a session's history is its latest turns. A session is its caller's (the
//! key or user, [`owner`]): another caller of the tenant naming the same id has its own. Every
//! query names the tenant (and runs in its transaction, under row-level security).

use serde_json::Value;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::Result;

/// The longest session id memory keeps.
pub const MAX_SESSION_CHARS: usize = 200;

/// Whose sessions a request's are: its API key's, else its user's.
pub fn owner(key_id: Option<&str>, user_id: Option<&str>) -> String {
    match (key_id, user_id) {
        (Some(key), _) => format!("key:{key}"),
        (None, Some(user)) => format!("user:{user}"),
        (None, None) => "tenant".to_owned(),
    }
}

/// Records a turn of `caller`'s `session` (once per `request_id`: a redelivered request adds
/// nothing).
pub async fn record_turn(
    conn: &mut PgConnection,
    tenant: Uuid,
    caller: &str,
    session: &str,
    request_id: &str,
    messages: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO conversation_turns (tenant_id, caller, session_id, request_id, messages) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, request_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(caller)
    .bind(session)
    .bind(request_id)
    .bind(messages)
    .execute(conn)
    .await?;
    Ok(())
}

/// The latest `turns` turns of `caller`'s `session`, newest first: each its messages (a JSON
/// array).
pub async fn latest_turns(
    conn: &mut PgConnection,
    tenant: Uuid,
    caller: &str,
    session: &str,
    turns: i64,
) -> Result<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT messages FROM conversation_turns \
         WHERE tenant_id = $1 AND caller = $2 AND session_id = $3 \
         ORDER BY created_at DESC, request_id DESC LIMIT $4",
    )
    .bind(tenant)
    .bind(caller)
    .bind(session)
    .bind(turns)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}

/// Forgets `caller`'s `session`: deletes its turns, and returns how many there were.
pub async fn forget(
    conn: &mut PgConnection,
    tenant: Uuid,
    caller: &str,
    session: &str,
) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM conversation_turns WHERE tenant_id = $1 AND caller = $2 AND session_id = $3",
    )
    .bind(tenant)
    .bind(caller)
    .bind(session)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Every remembered turn of the tenant, for its export: caller, session, request, messages and
/// when, oldest first.
pub async fn export(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT caller, session_id, request_id, messages, \
                (extract(epoch FROM created_at) * 1000)::bigint \
           FROM conversation_turns WHERE tenant_id = $1 ORDER BY created_at, request_id",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(serde_json::json!({
                "caller": row.try_get::<String, _>(0)?,
                "session": row.try_get::<String, _>(1)?,
                "request_id": row.try_get::<String, _>(2)?,
                "messages": row.try_get::<Value, _>(3)?,
                "created_at_ms": row.try_get::<i64, _>(4)?,
            }))
        })
        .collect()
}
