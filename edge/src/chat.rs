//! `POST /v1/chat/completions`: OpenAI's request and response shapes, plain or streamed as
//! server-sent events (with a final usage chunk when `stream_options.include_usage` is set).

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use futures::{stream, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_pipelines::{control, now_ms, trace::TraceContext};
use sluice_schemas::{ChatMessage, ChatRequest, ReplyAddress, ReplyChunk, ReplyKind};

use crate::{auth::TenantId, error::ApiError, replies::Subscription, EdgeState};

/// A chat completion request as OpenAI's API takes it (the fields Sluice uses; others are
/// accepted and ignored, as OpenAI's SDKs send some by default).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One input message.
#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A content part; only text parts are supported.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Parses and validates a request body into a [`CompletionRequest`] and its messages.
pub fn parse(body: &[u8]) -> Result<(CompletionRequest, Vec<ChatMessage>), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    }
    let request: CompletionRequest = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let error = ApiError::invalid(format!("Invalid request: {}", e.inner()));
        if path == "." {
            error
        } else {
            error.with_param(path)
        }
    })?;
    if request.model.trim().is_empty() {
        return Err(ApiError::invalid("`model` must not be empty.").with_param("model"));
    }
    if request.messages.is_empty() {
        return Err(
            ApiError::invalid("`messages` must hold at least one message.").with_param("messages"),
        );
    }
    if let Some(n) = request.n {
        if n != 1 {
            return Err(ApiError::invalid("Only n=1 is supported.").with_param("n"));
        }
    }
    if let Some(t) = request.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid("`temperature` must be between 0 and 2.")
                .with_param("temperature"));
        }
    }
    if request.max_tokens == Some(0) || request.max_completion_tokens == Some(0) {
        return Err(ApiError::invalid("`max_tokens` must be at least 1.").with_param("max_tokens"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(format!(
                "Invalid role {:?}; expected one of {}.",
                m.role,
                ROLES.join(", ")
            ))
            .with_param(format!("messages[{i}].role")));
        }
        let content = match &m.content {
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid("Only text content parts are supported.")
                                .with_param(format!("messages[{i}].content[{j}]")))
                        }
                    }
                }
                text
            }
            None => {
                return Err(ApiError::invalid("Each message needs `content`.")
                    .with_param(format!("messages[{i}].content")))
            }
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
        });
    }
    Ok((request, messages))
}

/// Checks the `Content-Type` is JSON (415 otherwise).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be application/json, not {content_type:?}."),
        ))
    }
}

/// Accepted request, on its way through the pipeline.
pub struct Submitted {
    pub request_id: String,
    pub created: i64,
    pub subscription: Subscription,
}

/// Validates the model, sends the request to `sluice.requests` and returns its reply stream.
pub async fn submit(
    state: &EdgeState,
    tenant: TenantId,
    request: &CompletionRequest,
    messages: Vec<ChatMessage>,
    session_id: Option<String>,
    parent_trace: Option<TraceContext>,
) -> Result<Submitted, ApiError> {
    if request.model != control::AUTO_MODEL && state.catalog.find(&request.model).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                request.model
            ),
        )
        .with_param("model"));
    }
    let request_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let received_at_ms = now_ms();
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .map(|m| i32::try_from(m).unwrap_or(i32::MAX));
    let record = ChatRequest {
        request_id: request_id.clone(),
        tenant_id: tenant.0.to_string(),
        session_id: session_id.unwrap_or_else(|| request_id.clone()),
        model: request.model.clone(),
        messages,
        max_tokens,
        temperature: request.temperature,
        stream: request.stream.unwrap_or(false),
        reply_to: ReplyAddress {
            topic: state.replies.topic().to_owned(),
            partition: state.replies.partition(),
        },
        received_at_ms,
    };
    let subscription = state.replies.subscribe(&request_id);
    let trace = parent_trace
        .map(|p| p.child())
        .unwrap_or_else(TraceContext::new_root);
    tracing::info!(%request_id, tenant = %tenant.0, model = %record.model, trace_id = %trace.trace_id_hex(), "request accepted");
    let mut out =
        sluice_pipelines::Emitter::new(state.producer.clone(), state.codec.clone(), trace);
    let key = record.session_id.clone();
    out.emit(&state.topics.requests, None, key.as_bytes(), &record)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!(
                "Sluice could not accept the request right now: {e}"
            ))
        })?;
    out.flush().await.map_err(|e| {
        ApiError::unavailable(format!(
            "Sluice could not accept the request right now: {e}"
        ))
    })?;
    Ok(Submitted {
        request_id,
        created: received_at_ms / 1000,
        subscription,
    })
}

/// The next chunk of a reply, or a timeout error.
pub async fn next_chunk(sub: &mut Subscription, timeout: Duration) -> Result<ReplyChunk, ApiError> {
    match tokio::time::timeout(timeout, sub.rx.recv()).await {
        Ok(Some(chunk)) => Ok(chunk),
        Ok(None) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_dropped",
            "The reply stream was dropped because it was not read fast enough.",
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "The model did not answer in time.",
        )),
    }
}

/// The error an ERROR chunk carries.
pub fn chunk_error(chunk: &ReplyChunk) -> ApiError {
    let status = u16::try_from(chunk.error_status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    ApiError::new(
        status,
        chunk.error_code.as_deref().unwrap_or("upstream_error"),
        chunk
            .error_message
            .clone()
            .unwrap_or_else(|| "The model call failed.".into()),
    )
}

/// `usage` in OpenAI's shape.
pub fn usage_json(input: i64, output: i64) -> Value {
    json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output })
}

/// A `chat.completion.chunk` object.
pub fn chunk_json(
    id: &str,
    created: i64,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish_reason }],
    })
}

/// Turns one request's reply chunks into OpenAI's streaming objects, for SSE and WebSocket
/// alike: a first chunk with the assistant role, one per delta, a last one with
/// `finish_reason`, then (when asked for) a usage chunk with no choices.
pub struct StreamTranslator {
    id: String,
    created: i64,
    include_usage: bool,
    started: bool,
}

/// What one reply chunk becomes.
pub enum Translated {
    /// More objects; the stream goes on.
    More(Vec<Value>),
    /// The last objects; the stream is complete.
    Finished(Vec<Value>),
    /// The model call failed; send this error and end.
    Failed(ApiError),
}

impl StreamTranslator {
    /// A translator for the request `id`, created at `created` (Unix seconds).
    pub fn new(id: &str, created: i64, include_usage: bool) -> Self {
        Self {
            id: id.to_owned(),
            created,
            include_usage,
            started: false,
        }
    }

    /// Translates the next chunk.
    pub fn translate(&mut self, chunk: &ReplyChunk) -> Translated {
        if chunk.kind == ReplyKind::Error {
            return Translated::Failed(chunk_error(chunk));
        }
        let mut out = Vec::with_capacity(3);
        if !self.started {
            self.started = true;
            out.push(self.object(chunk, json!({ "role": "assistant", "content": "" }), None));
        }
        if chunk.kind == ReplyKind::Delta {
            out.push(self.object(chunk, json!({ "content": chunk.delta }), None));
            return Translated::More(out);
        }
        let finish = chunk.finish_reason.as_deref().unwrap_or("stop");
        out.push(self.object(chunk, json!({}), Some(finish)));
        if self.include_usage {
            let mut usage = self.object(chunk, json!({}), None);
            usage["choices"] = json!([]);
            usage["usage"] = usage_json(chunk.input_tokens, chunk.output_tokens);
            out.push(usage);
        }
        Translated::Finished(out)
    }

    fn object(&self, chunk: &ReplyChunk, delta: Value, finish_reason: Option<&str>) -> Value {
        chunk_json(&self.id, self.created, &chunk.model, delta, finish_reason)
    }
}

/// The handler.
pub async fn completions(
    State(state): State<Arc<EdgeState>>,
    tenant: TenantId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let (request, messages) = parse(&body)?;
    let session = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.user.clone());
    let trace = headers
        .get(sluice_pipelines::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let mut submitted = submit(&state, tenant, &request, messages, session, trace).await?;
    let timeout = Duration::from_secs(state.config.reply_timeout_secs);
    // Wait for the first chunk before answering, so a refusal gets its own status code.
    let first = next_chunk(&mut submitted.subscription, timeout).await?;
    if first.kind == ReplyKind::Error {
        return Err(chunk_error(&first));
    }
    let request_id_header = [("x-request-id", submitted.request_id.clone())];
    if request.stream.unwrap_or(false) {
        let include_usage = request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let events = sse_events(submitted, first, include_usage, timeout, state.clone());
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-request-id", request_id_header[0].1.clone())
            .body(Body::from_stream(events))
            .map_err(|e| ApiError::internal("cannot build the stream response", e))?;
        return Ok(response);
    }
    let mut text = String::new();
    let mut chunk = first;
    loop {
        match chunk.kind {
            ReplyKind::Delta => text.push_str(&chunk.delta),
            ReplyKind::Error => return Err(chunk_error(&chunk)),
            ReplyKind::Done => {
                let body = json!({
                    "id": submitted.request_id,
                    "object": "chat.completion",
                    "created": submitted.created,
                    "model": chunk.model,
                    "system_fingerprint": Value::Null,
                    "choices": [{
                        "index": 0,
                        "message": { "role": "assistant", "content": text, "refusal": Value::Null },
                        "logprobs": Value::Null,
                        "finish_reason": chunk.finish_reason.as_deref().unwrap_or("stop"),
                    }],
                    "usage": usage_json(chunk.input_tokens, chunk.output_tokens),
                });
                return Ok((request_id_header, Json(body)).into_response());
            }
        }
        chunk = next_chunk(&mut submitted.subscription, timeout).await?;
    }
}

/// Reads the body up to `limit` bytes (413 beyond).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("The request body is larger than {limit} bytes."),
        )
        .closing()
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The SSE byte stream of a reply whose first chunk has arrived.
fn sse_events(
    submitted: Submitted,
    first: ReplyChunk,
    include_usage: bool,
    timeout: Duration,
    state: Arc<EdgeState>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    struct Cursor {
        translator: StreamTranslator,
        submitted: Submitted,
        pending: Option<ReplyChunk>,
        finished: bool,
        _open: OpenStream,
    }
    const DONE: &[u8] = b"data: [DONE]\n\n";
    let cursor = Cursor {
        translator: StreamTranslator::new(&submitted.request_id, submitted.created, include_usage),
        submitted,
        pending: Some(first),
        finished: false,
        _open: OpenStream::new(&state, "sse"),
    };
    stream::unfold(cursor, move |mut c| async move {
        if c.finished {
            return None;
        }
        let chunk = match c.pending.take() {
            Some(chunk) => Ok(chunk),
            None => next_chunk(&mut c.submitted.subscription, timeout).await,
        };
        let mut out = Vec::new();
        match chunk.map(|chunk| c.translator.translate(&chunk)) {
            Ok(Translated::More(objects)) => out.extend(objects.iter().map(sse)),
            Ok(Translated::Finished(objects)) => {
                out.extend(objects.iter().map(sse));
                out.push(Bytes::from_static(DONE));
                c.finished = true;
            }
            Ok(Translated::Failed(e)) | Err(e) => {
                out.push(sse(&e.body()));
                out.push(Bytes::from_static(DONE));
                c.finished = true;
            }
        }
        let bytes: Bytes = out.concat().into();
        Some((Ok(bytes), c))
    })
}

/// Counts an open stream in the metrics while it lives.
pub struct OpenStream {
    gauge: prometheus::IntGauge,
}

impl OpenStream {
    /// Marks a stream of `kind` open.
    pub fn new(state: &EdgeState, kind: &str) -> Self {
        let gauge = state.metrics.open_streams.with_label_values(&[kind]);
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_requests_and_rejects_bad_ones() {
        let (req, messages) = parse(br#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"seed":1}"#).unwrap();
        assert_eq!(req.model, "auto");
        assert_eq!(messages[0].content, "hi");
        let (_, messages) = parse(br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(messages[0].content, "ab");

        for (body, param) in [
            (&br#"{"model":"m""#[..], None),
            (br#"[1,2]"#, None),
            (br#"{"messages":[]}"#, None),
            (br#"{"model":"m","messages":[]}"#, Some("messages")),
            (
                br#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                Some("temperature"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                Some("max_tokens"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                Some("stream"),
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(
                err.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(body)
            );
            if let Some(param) = param {
                assert_eq!(
                    err.param.as_deref(),
                    Some(param),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn translator_frames_a_reply_like_openai() {
        let request = crate::test_support::request("chatcmpl-1");
        let mut t = StreamTranslator::new("chatcmpl-1", 7, true);
        let mut delta = ReplyChunk::new(&request, "sim-small", 0, ReplyKind::Delta);
        delta.delta = "Hi".into();
        let Translated::More(first) = t.translate(&delta) else {
            panic!("more")
        };
        assert_eq!(first.len(), 2, "role chunk, then the delta");
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first[1]["choices"][0]["delta"]["content"], "Hi");
        let mut done = ReplyChunk::new(&request, "sim-small", 1, ReplyKind::Done);
        done.finish_reason = Some("length".into());
        done.input_tokens = 3;
        done.output_tokens = 1;
        let Translated::Finished(last) = t.translate(&done) else {
            panic!("finished")
        };
        assert_eq!(last[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(last[1]["choices"], json!([]));
        assert_eq!(last[1]["usage"]["total_tokens"], 4);
        assert!(last
            .iter()
            .all(|o| o["id"] == "chatcmpl-1" && o["created"] == 7 && o["model"] == "sim-small"));
        let error = ReplyChunk::error(&request, "m", 0, 429, "upstream_rate_limited", "slow down");
        let Translated::Failed(e) = StreamTranslator::new("x", 0, false).translate(&error) else {
            panic!("failed")
        };
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn content_type_must_be_json() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            require_json(&headers).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(require_json(&headers).is_err());
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(require_json(&headers).is_ok());
    }
}
