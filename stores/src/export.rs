//! A tenant's data export: everything it owns, as one JSON document — its record and plan, its
//! keys (prefixes, never secrets), its users (never password hashes), its CORS origins, its
//! audit log, the business data its tools act on (customers, orders, tickets), its remembered
//! conversations, its documents, its own tools (their settings: a token's variable name, never
//! a token) and workflow runs, and its usage facts. The control-plane part is read at once; the usage facts,
//! which grow with the tenant's traffic, stream from ClickHouse as the document is written, so
//! a large tenant's export never sits whole in memory.

use clickhouse::query::RowCursor;
use futures::Stream;
use serde_json::json;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::{
    clickhouse::usage::{self, UsageRow},
    postgres::{audit, business, keys, knowledge, memory, origins, tools, users, workflow_runs},
    ClickHouse, Error, Result,
};

/// A tenant's export, ready to be written ([`TenantExport::into_stream`]).
pub struct TenantExport {
    /// The document up to its usage facts: every other member, then `"usage_events":[`.
    head: Vec<u8>,
    events: RowCursor<UsageRow>,
}

/// Usage facts written per piece of the document.
const ROWS_PER_PIECE: usize = 1000;

impl TenantExport {
    /// The document in pieces: the head, the usage facts a thousand at a time, the end.
    pub fn into_stream(self) -> impl Stream<Item = Result<Vec<u8>>> + Send + 'static {
        enum Next {
            Head(Vec<u8>, RowCursor<UsageRow>),
            Rows(RowCursor<UsageRow>, bool),
            Done,
        }
        futures::stream::unfold(Next::Head(self.head, self.events), |next| async move {
            match next {
                Next::Head(head, events) => Some((Ok(head), Next::Rows(events, true))),
                Next::Rows(mut events, mut first) => {
                    let mut piece = Vec::new();
                    for _ in 0..ROWS_PER_PIECE {
                        let row = match events.next().await {
                            Ok(Some(row)) => row,
                            Ok(None) => {
                                piece.extend_from_slice(b"]}");
                                return Some((Ok(piece), Next::Done));
                            }
                            Err(e) => return Some((Err(e.into()), Next::Done)),
                        };
                        if !first {
                            piece.push(b',');
                        }
                        first = false;
                        if let Err(e) = serde_json::to_writer(&mut piece, &row) {
                            return Some((Err(Error::Corrupt(e.to_string())), Next::Done));
                        }
                    }
                    Some((Ok(piece), Next::Rows(events, first)))
                }
                Next::Done => None,
            }
        })
    }
}

/// Everything the tenant owns, as of `exported_at_ms`. Run it in the tenant's transaction (the
/// runtime role) or as the owner; the usage facts are read as the export is written.
pub async fn tenant_export(
    conn: &mut PgConnection,
    clickhouse: &ClickHouse,
    tenant_id: Uuid,
    exported_at_ms: i64,
) -> Result<TenantExport> {
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
    let business = business::export(&mut *conn, tenant_id).await?;
    let conversations = memory::export(&mut *conn, tenant_id).await?;
    let documents = knowledge::export(&mut *conn, tenant_id).await?;
    let own_tools = tools::list(&mut *conn, tenant_id).await?;
    let runs = workflow_runs::export(&mut *conn, tenant_id).await?;
    let events = usage::tenant_events(clickhouse, &tenant_id.to_string())?;
    let head = json!({
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
        "customers": business["customers"],
        "orders": business["orders"],
        "tickets": business["tickets"],
        "conversation_turns": conversations,
        "documents": documents,
        "tools": own_tools,
        "workflow_runs": runs,
    });
    let mut head = serde_json::to_vec(&head).map_err(|e| Error::Corrupt(e.to_string()))?;
    // The object stays open for its last member, the usage facts.
    head.pop();
    head.extend_from_slice(br#","usage_events":["#);
    Ok(TenantExport { head, events })
}
