//! A tenant's knowledge (`documents`, `document_chunks`): its documents in chunks, indexed for
//! full-text search with PostgreSQL's text search, and the search the built-in tool
//! `search_knowledge` runs. Every query names the tenant, so it holds run as the owner as well
//! as in the tenant's transaction (row-level security).

use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, Row};

use crate::Result;

/// The text search configuration documents are indexed and searched with.
const LANGUAGE: &str = "english";

/// A document as its tenant sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocumentEntry {
    pub id: String,
    pub title: String,
    pub format: String,
    pub chunks: i32,
    /// When the edge accepted the version indexed (Unix milliseconds).
    pub version_ms: i64,
}

/// A chunk found by a search, with what a citation needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Passage {
    pub document_id: String,
    pub title: String,
    pub chunk: i32,
    pub heading: Option<String>,
    pub text: String,
    pub score: f32,
}

/// A version of a document: its chunks as `(heading, text)`, or none when it is deleted.
pub struct Version<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub format: &'a str,
    pub version_ms: i64,
    pub deleted: bool,
    pub chunks: Vec<(Option<&'a str>, &'a str)>,
}

/// Replaces `tenant`'s document with `version`, unless a newer version is indexed already;
/// whether it was applied. The caller commits.
pub async fn apply(conn: &mut PgConnection, tenant: Uuid, version: &Version<'_>) -> Result<bool> {
    let applied: Option<bool> = sqlx::query_scalar(
        "INSERT INTO documents (tenant_id, id, title, format, version_ms, chunks, deleted) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET title = EXCLUDED.title, \
             format = EXCLUDED.format, version_ms = EXCLUDED.version_ms, \
             chunks = EXCLUDED.chunks, deleted = EXCLUDED.deleted, updated_at = now() \
           WHERE documents.version_ms <= EXCLUDED.version_ms \
         RETURNING true",
    )
    .bind(tenant)
    .bind(version.id)
    .bind(version.title)
    .bind(version.format)
    .bind(version.version_ms)
    .bind(i32::try_from(version.chunks.len()).unwrap_or(i32::MAX))
    .bind(version.deleted)
    .fetch_optional(&mut *conn)
    .await?;
    if applied.is_none() {
        return Ok(false);
    }
    sqlx::query("DELETE FROM document_chunks WHERE tenant_id = $1 AND document_id = $2")
        .bind(tenant)
        .bind(version.id)
        .execute(&mut *conn)
        .await?;
    if version.chunks.is_empty() {
        return Ok(true);
    }
    let (headings, texts): (Vec<Option<&str>>, Vec<&str>) = version.chunks.iter().copied().unzip();
    sqlx::query(&format!(
        "INSERT INTO document_chunks (tenant_id, document_id, chunk, heading, body, search) \
         SELECT $1, $2, c.n::integer - 1, c.heading, c.body, \
                setweight(to_tsvector('{LANGUAGE}', $3), 'A') \
                || setweight(to_tsvector('{LANGUAGE}', coalesce(c.heading, '')), 'B') \
                || to_tsvector('{LANGUAGE}', c.body) \
           FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS c(heading, body, n)"
    ))
    .bind(tenant)
    .bind(version.id)
    .bind(version.title)
    .bind(&headings)
    .bind(&texts)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// `tenant`'s documents (not deleted), by id.
pub async fn list(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<DocumentEntry>> {
    let rows = sqlx::query(
        "SELECT id, title, format, chunks, version_ms FROM documents \
          WHERE tenant_id = $1 AND NOT deleted ORDER BY id",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(DocumentEntry {
                id: row.try_get(0)?,
                title: row.try_get(1)?,
                format: row.try_get(2)?,
                chunks: row.try_get(3)?,
                version_ms: row.try_get(4)?,
            })
        })
        .collect()
}

/// The chunks of `tenant`'s documents that best match `query`, best first, at most `limit`.
/// Any of the query's words may match (a question rarely shares all its words with the answer);
/// chunks matching more of them, and in their title or heading, rank higher.
pub async fn search(
    conn: &mut PgConnection,
    tenant: Uuid,
    query: &str,
    limit: i64,
) -> Result<Vec<Passage>> {
    let rows = sqlx::query(&format!(
        "WITH q AS (SELECT nullif(replace(plainto_tsquery('{LANGUAGE}', $2)::text, ' & ', ' | '), '')::tsquery AS q) \
         SELECT c.document_id, d.title, c.chunk, c.heading, c.body, ts_rank(c.search, q.q) AS score \
           FROM q, document_chunks c \
           JOIN documents d ON d.tenant_id = c.tenant_id AND d.id = c.document_id \
          WHERE c.tenant_id = $1 AND q.q IS NOT NULL AND c.search @@ q.q \
          ORDER BY score DESC, c.document_id, c.chunk LIMIT $3"
    ))
    .bind(tenant)
    .bind(query)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Passage {
                document_id: row.try_get(0)?,
                title: row.try_get(1)?,
                chunk: row.try_get(2)?,
                heading: row.try_get(3)?,
                text: row.try_get(4)?,
                score: row.try_get(5)?,
            })
        })
        .collect()
}

/// `tenant`'s documents with their chunks, for its export.
pub async fn export(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<serde_json::Value>> {
    let rows = sqlx::query(
        "SELECT d.id, d.title, d.format, d.version_ms, \
                coalesce(jsonb_agg(jsonb_build_object('heading', c.heading, 'text', c.body) \
                         ORDER BY c.chunk) FILTER (WHERE c.chunk IS NOT NULL), '[]'::jsonb) \
           FROM documents d \
           LEFT JOIN document_chunks c ON c.tenant_id = d.tenant_id AND c.document_id = d.id \
          WHERE d.tenant_id = $1 AND NOT d.deleted \
          GROUP BY d.id, d.title, d.format, d.version_ms ORDER BY d.id",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(serde_json::json!({
                "id": row.try_get::<String, _>(0)?,
                "title": row.try_get::<String, _>(1)?,
                "format": row.try_get::<String, _>(2)?,
                "version_ms": row.try_get::<i64, _>(3)?,
                "chunks": row.try_get::<serde_json::Value, _>(4)?,
            }))
        })
        .collect()
}
