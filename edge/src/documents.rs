//! A tenant's knowledge at the edge: documents (text, Markdown, HTML) uploaded through the API
//! are cut into chunks here and put on `sluice.documents`; the knowledge stage indexes them,
//! and the built-in tool `search_knowledge` (used by the FAQ workflow) searches them.
//!
//! **Chunks.** HTML is read as text first (tags dropped, `script` and `style` with their
//! content, block tags ending lines, headings kept as headings, the common entities decoded).
//! A Markdown or HTML heading starts a new chunk and names the chunks under it; paragraphs
//! (separated by blank lines) are gathered into a chunk while it stays within
//! [`MAX_CHUNK_CHARS`]; a longer paragraph is cut at a space.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_pipelines::{now_ms, trace::TraceContext};
use sluice_schemas::{Document, DocumentChunk};
use sluice_stores::postgres::{knowledge, tenant_transaction};
use utoipa::{IntoParams, ToSchema};

use crate::{auth::Caller, control::parse, error::ApiError, EdgeState};

/// The most characters of one chunk.
pub const MAX_CHUNK_CHARS: usize = 1200;
/// The most bytes of a document's content.
pub const MAX_CONTENT_BYTES: usize = 512 * 1024;
/// The most chunks of one document.
pub const MAX_CHUNKS: usize = 2000;
/// The most characters of a heading (each chunk under it carries it).
pub const MAX_HEADING_CHARS: usize = 200;

/// A document to store (`PUT /v1/documents/{id}`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentForm {
    /// 1 to 500 characters.
    pub title: String,
    /// The document, at most 512 KiB.
    pub content: String,
    /// `text` (the default), `markdown` or `html`.
    #[serde(default)]
    pub format: Option<String>,
}

/// A search (`GET /v1/documents/search`).
#[derive(Debug, Deserialize, IntoParams)]
pub struct SearchQuery {
    /// What to look for.
    pub q: String,
    /// At most this many passages (1–10, default 3).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Whether `id` is a document id: 1 to 200 of letters, digits, `.`, `_` and `-`.
fn valid_id(id: &str) -> bool {
    (1..=200).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "A document id has 1 to 200 letters, digits, dots, underscores or dashes.",
        )
        .with_param("id"))
    }
}

/// Puts `document` on `sluice.documents`, keyed by tenant and document.
async fn send(state: &EdgeState, document: &Document) -> Result<(), ApiError> {
    let mut out = sluice_pipelines::Emitter::new(
        state.producer.clone(),
        state.codec.clone(),
        TraceContext::new_root(),
    );
    let key = format!("{}/{}", document.tenant_id, document.document_id);
    let sent = match out
        .emit(&state.topics.documents, None, key.as_bytes(), document)
        .await
    {
        Ok(()) => out.flush().await.map(|_| ()),
        Err(e) => Err(e),
    };
    sent.map_err(|e| {
        ApiError::unavailable(format!(
            "Sluice could not accept the document right now: {e}"
        ))
    })
}

/// `PUT /v1/documents/{id}`: stores a document in the caller's knowledge (a new version of it
/// if it is there), searchable once indexed (within moments).
#[utoipa::path(put, path = "/v1/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    params(("id" = String, Path, description = "The document's id, chosen by the tenant")),
    request_body = DocumentForm,
    responses((status = 202, description = "`{\"object\": \"document\", \"id\", \"title\", \"format\", \"chunks\": n, \"status\": \"indexing\"}`", body = Object), (status = 400, description = "Invalid document", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "The broker is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn put(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_id(&id)?;
    let form: DocumentForm = parse(&body)?;
    let title = form.title.trim();
    if title.is_empty() || title.chars().count() > 500 {
        return Err(ApiError::invalid("`title` has 1 to 500 characters.").with_param("title"));
    }
    if form.content.len() > MAX_CONTENT_BYTES {
        return Err(
            ApiError::invalid(format!("`content` is at most {MAX_CONTENT_BYTES} bytes."))
                .with_param("content"),
        );
    }
    let format = form.format.as_deref().unwrap_or("text");
    let chunks = match format {
        "text" => chunks(&form.content, false),
        "markdown" => chunks(&form.content, true),
        "html" => chunks(&html_to_markdown(&form.content), true),
        _ => {
            return Err(
                ApiError::invalid("`format` is text, markdown or html.").with_param("format")
            )
        }
    };
    if chunks.len() > MAX_CHUNKS {
        return Err(ApiError::invalid(format!(
            "The document cuts into more than {MAX_CHUNKS} chunks."
        ))
        .with_param("content"));
    }
    let document = Document {
        tenant_id: caller.tenant.0.to_string(),
        document_id: id.clone(),
        title: title.to_owned(),
        format: format.to_owned(),
        version_ms: now_ms(),
        deleted: false,
        chunks,
        trace_id: None,
    };
    send(&state, &document).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "object": "document",
            "id": id,
            "title": document.title,
            "format": document.format,
            "chunks": document.chunks.len(),
            "status": "indexing",
        })),
    ))
}

/// `DELETE /v1/documents/{id}`: takes a document out of the caller's knowledge.
#[utoipa::path(delete, path = "/v1/documents/{id}", tag = "knowledge", security(("bearer" = [])),
    params(("id" = String, Path, description = "The document's id")),
    responses((status = 202, description = "`{\"object\": \"document.deleted\", \"id\"}`", body = Object), (status = 400, description = "Invalid id", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "The broker is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn delete(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_id(&id)?;
    let document = Document {
        tenant_id: caller.tenant.0.to_string(),
        document_id: id.clone(),
        title: id.clone(),
        format: "text".into(),
        version_ms: now_ms(),
        deleted: true,
        chunks: Vec::new(),
        trace_id: None,
    };
    send(&state, &document).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "object": "document.deleted", "id": id })),
    ))
}

fn unavailable(e: sluice_stores::Error) -> ApiError {
    ApiError::unavailable(format!("Sluice cannot read the knowledge right now: {e}"))
}

/// `GET /v1/documents`: the caller's documents as indexed.
#[utoipa::path(get, path = "/v1/documents", tag = "knowledge", security(("bearer" = [])),
    responses((status = 200, description = "`{\"object\": \"list\", \"data\": [{\"id\", \"title\", \"format\", \"chunks\", \"version_ms\"}…]}`", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "PostgreSQL is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let tenant = caller.tenant.0;
    let mut tx = tenant_transaction(&state.app_pool, tenant)
        .await
        .map_err(unavailable)?;
    let documents = knowledge::list(&mut tx, tenant)
        .await
        .map_err(unavailable)?;
    tx.commit()
        .await
        .map_err(|e| unavailable(sluice_stores::Error::from(e)))?;
    Ok(Json(json!({ "object": "list", "data": documents })))
}

/// `GET /v1/documents/search?q=…`: the passages of the caller's documents that best match,
/// as the `search_knowledge` tool finds them.
#[utoipa::path(get, path = "/v1/documents/search", tag = "knowledge", security(("bearer" = [])),
    params(SearchQuery),
    responses((status = 200, description = "`{\"object\": \"list\", \"data\": [{\"document_id\", \"title\", \"chunk\", \"heading\", \"text\", \"score\"}…]}`, best first", body = Object), (status = 400, description = "Invalid query", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "PostgreSQL is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn search(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(3);
    if !(1..=10).contains(&limit) {
        return Err(ApiError::invalid("`limit` is from 1 to 10.").with_param("limit"));
    }
    if query.q.trim().is_empty() || query.q.len() > 2000 {
        return Err(ApiError::invalid("`q` has 1 to 2000 characters.").with_param("q"));
    }
    let tenant = caller.tenant.0;
    let mut tx = tenant_transaction(&state.app_pool, tenant)
        .await
        .map_err(unavailable)?;
    let passages = knowledge::search(&mut tx, tenant, &query.q, limit)
        .await
        .map_err(unavailable)?;
    tx.commit()
        .await
        .map_err(|e| unavailable(sluice_stores::Error::from(e)))?;
    Ok(Json(json!({ "object": "list", "data": passages })))
}

/// Cuts `content` into chunks; `markdown`: `#` lines are headings.
pub fn chunks(content: &str, markdown: bool) -> Vec<DocumentChunk> {
    let mut out = Vec::new();
    let mut heading: Option<String> = None;
    let mut current = String::new();
    let mut paragraph = String::new();
    let flush_chunk =
        |current: &mut String, heading: &Option<String>, out: &mut Vec<DocumentChunk>| {
            let text = current.trim();
            if !text.is_empty() {
                out.push(DocumentChunk {
                    heading: heading.clone(),
                    text: text.to_owned(),
                });
            }
            current.clear();
        };
    let add_paragraph = |paragraph: &mut String,
                         current: &mut String,
                         heading: &Option<String>,
                         out: &mut Vec<DocumentChunk>| {
        let text = paragraph.trim().to_owned();
        paragraph.clear();
        if text.is_empty() {
            return;
        }
        for piece in split_long(&text) {
            if !current.is_empty()
                && current.chars().count() + 2 + piece.chars().count() > MAX_CHUNK_CHARS
            {
                flush_chunk(current, heading, out);
            }
            if !current.is_empty() {
                current.push_str("\n\n");
            }
            current.push_str(piece);
        }
    };
    for line in content.lines() {
        let trimmed = line.trim();
        let title = markdown.then(|| markdown_heading(trimmed)).flatten();
        if let Some(title) = title {
            add_paragraph(&mut paragraph, &mut current, &heading, &mut out);
            flush_chunk(&mut current, &heading, &mut out);
            heading = Some(title.chars().take(MAX_HEADING_CHARS).collect());
        } else if trimmed.is_empty() {
            add_paragraph(&mut paragraph, &mut current, &heading, &mut out);
        } else {
            if !paragraph.is_empty() {
                paragraph.push(' ');
            }
            paragraph.push_str(trimmed);
        }
    }
    add_paragraph(&mut paragraph, &mut current, &heading, &mut out);
    flush_chunk(&mut current, &heading, &mut out);
    out
}

/// The text of a Markdown heading line (`# Title`), if it is one.
fn markdown_heading(line: &str) -> Option<&str> {
    let hashes = line.bytes().take_while(|b| *b == b'#').count();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = line.get(hashes..)?;
    rest.starts_with(' ')
        .then(|| rest.trim().trim_end_matches('#').trim())
        .filter(|t| !t.is_empty())
}

/// `text` in pieces of at most [`MAX_CHUNK_CHARS`] characters, cut at a space where there is one.
fn split_long(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.chars().count() > MAX_CHUNK_CHARS {
        let limit = rest
            .char_indices()
            .nth(MAX_CHUNK_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        let cut = rest[..limit].rfind(' ').filter(|&i| i > 0).unwrap_or(limit);
        pieces.push(rest[..cut].trim());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    pieces
}

/// HTML read as Markdown-like text: tags dropped (`script` and `style` with their content),
/// block elements ending lines, `h1`–`h6` as `#` headings, the common entities decoded.
pub fn html_to_markdown(html: &str) -> String {
    // ASCII lowercasing keeps every byte offset, so one lowered copy serves every search.
    let lowered = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        out.push_str(&decode_entities(&rest[..open]));
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else {
            rest = "";
            break;
        };
        let tag = after[..close].trim().to_ascii_lowercase();
        rest = &after[close + 1..];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let closing = tag.starts_with('/');
        match name.as_str() {
            "script" | "style" if !closing => {
                let end = format!("</{name}");
                let offset = html.len() - rest.len();
                rest = match lowered.get(offset..).and_then(|l| l.find(&end)) {
                    Some(at) => rest.get(at..).unwrap_or(""),
                    None => "",
                };
            }
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" if !closing => out.push_str("\n\n# "),
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "p" | "div" | "section" | "article"
            | "ul" | "ol" | "table" | "blockquote" | "pre" => out.push_str("\n\n"),
            "br" | "li" | "tr" => out.push('\n'),
            _ => {}
        }
    }
    out.push_str(&decode_entities(rest));
    out
}

fn decode_entities(text: &str) -> String {
    text.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_cuts_at_headings_and_gathers_paragraphs() {
        let doc = "Intro line one\nline two\n\n# Descaling\n\nFill with water.\n\nAdd citric acid.\n\n## Filters ##\nRinse the filter.";
        let chunks = chunks(doc, true);
        let got: Vec<(Option<&str>, &str)> = chunks
            .iter()
            .map(|c| (c.heading.as_deref(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (None, "Intro line one line two"),
                (Some("Descaling"), "Fill with water.\n\nAdd citric acid."),
                (Some("Filters"), "Rinse the filter."),
            ]
        );
        // As text, `#` lines are text.
        assert_eq!(
            super::chunks("# not a heading", false)[0].text,
            "# not a heading"
        );
    }

    #[test]
    fn long_text_is_cut_within_the_limit_at_spaces() {
        let paragraph = "word ".repeat(1000);
        let chunks = chunks(&format!("{paragraph}\n\n{paragraph}"), false);
        assert!(chunks.len() >= 8, "{}", chunks.len());
        for chunk in &chunks {
            assert!(chunk.text.chars().count() <= MAX_CHUNK_CHARS);
            assert!(chunk.text.starts_with("word") && chunk.text.ends_with("word"));
        }
        let unbroken = "x".repeat(3000);
        assert!(super::chunks(&unbroken, false)
            .iter()
            .all(|c| c.text.chars().count() <= MAX_CHUNK_CHARS));
    }

    #[test]
    fn html_reads_as_headings_and_paragraphs() {
        let html = "<html><head><style>p { color: red }</style><script>alert('x')</script></head>\
                    <body><h1>Returns</h1><p>Within 30 days &amp; unused.</p><p>Keep the<br>receipt.</p></body></html>";
        let chunks = chunks(&html_to_markdown(html), true);
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].heading.as_deref(), Some("Returns"));
        assert_eq!(
            chunks[0].text,
            "Within 30 days & unused.\n\nKeep the receipt."
        );
    }

    #[test]
    fn a_long_heading_is_cut() {
        let doc = format!("# {}\n\ntext", "h".repeat(5000));
        let chunks = chunks(&doc, true);
        assert_eq!(chunks[0].heading.as_ref().unwrap().len(), MAX_HEADING_CHARS);
    }

    #[test]
    fn document_ids_are_checked() {
        assert!(valid_id("faq-returns_v2.md"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(201)));
    }
}
