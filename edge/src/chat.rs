//! `POST /v1/chat/completions`: a validated request goes to `sluice.requests`, and its reply
//! comes back whole or streamed as server-sent events (with a final usage chunk when
//! `stream_options.include_usage` is set). The wire shapes are in [`openai`](crate::openai),
//! the streaming in [`stream`](crate::stream).

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use sluice_pipelines::{now_ms, trace::TraceContext};
use sluice_schemas::{ChatMessage, ChatRequest, ReplyAddress, ReplyKind};
use sluice_stores::AUTO_MODEL;

use crate::{
    auth::TenantId,
    error::ApiError,
    openai::{self, CompletionRequest},
    replies::Subscription,
    stream::{chunk_error, next_chunk, sse_body, ReplyStream},
    EdgeState,
};

/// An accepted request, on its way through the pipeline.
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
    if request.model != AUTO_MODEL && state.catalog.find(&request.model).is_none() {
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
    // Every request is on `sluice.requests` with its trace id; a log line each is for debugging.
    tracing::debug!(%request_id, tenant = %tenant.0, model = %record.model, trace_id = %trace.trace_id_hex(), "request accepted");
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

/// The handler.
pub async fn completions(
    State(state): State<Arc<EdgeState>>,
    tenant: TenantId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    openai::require_json(&headers)?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let (request, messages) = openai::parse(&body)?;
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
        let reply = ReplyStream::new(
            &submitted.request_id,
            submitted.created,
            submitted.subscription,
            Some(first),
            include_usage,
            timeout,
        );
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-request-id", request_id_header[0].1.clone())
            .body(sse_body(reply, &state))
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
                text.push_str(&chunk.delta);
                let body = openai::completion_json(
                    &submitted.request_id,
                    submitted.created,
                    &chunk.model,
                    &text,
                    chunk.finish_reason.as_deref().unwrap_or("stop"),
                    (chunk.input_tokens, chunk.output_tokens),
                );
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
