//! `POST /v1/chat/completions`: a validated request goes to `sluice.requests`, and its reply
//! comes back whole or streamed as server-sent events (with a final usage chunk when
//! `stream_options.include_usage` is set). The wire shapes are in [`openai`](crate::openai),
//! the streaming in [`stream`](crate::stream).

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use sluice_pipelines::{now_ms, trace::TraceContext};
use sluice_schemas::{ChatRequest, ReplyAddress, ReplyKind, ToolCallAssembler};
use sluice_stores::AUTO_MODEL;

use crate::{
    auth::Caller,
    error::ApiError,
    openai::{self, CompletionRequest, Prompt},
    replies::Subscription,
    stream::{chunk_error, next_chunk, sse_body, ReplyStream},
    EdgeState,
};

/// The feature flag that turns chat completions off, for a tenant or for everyone (on unless
/// set).
pub const CHAT_FLAG: &str = "chat";

/// An accepted request, on its way through the pipeline.
pub struct Submitted {
    pub request_id: String,
    /// When it was received (Unix milliseconds).
    pub created_ms: i64,
    /// An offset of the replies partition at or before the reply's first chunk.
    pub replies_offset: i64,
    pub subscription: Subscription,
    /// The `x-ratelimit-*` headers of its admission, if any limit applies.
    pub limit_headers: HeaderMap,
}

impl Submitted {
    /// When it was received, in Unix seconds (as OpenAI's `created`).
    pub fn created(&self) -> i64 {
        self.created_ms / 1000
    }
}

/// Whether `tenant` may run workflow `name`: it is in the tenant's registry (its own or a
/// built-in one), turned on, and the tenant has the tools it calls; for `auto`, whether it has
/// such a workflow for the triage intent.
async fn runnable_workflow(
    state: &EdgeState,
    tenant: uuid::Uuid,
    name: &str,
) -> Result<bool, ApiError> {
    let found = async {
        let mut tx = sluice_stores::postgres::tenant_transaction(&state.app_pool, tenant).await?;
        let runnable = if name == AUTO_MODEL {
            let intent = sluice_stores::postgres::workflows::AUTO_INTENT;
            sluice_stores::postgres::workflows::for_intent(&mut tx, tenant, intent)
                .await?
                .is_some()
        } else {
            let entries = sluice_stores::postgres::workflows::list(&mut tx, Some(tenant)).await?;
            entries
                .into_iter()
                .any(|e| e.name == name && e.enabled && e.ready)
        };
        tx.commit().await?;
        Ok::<_, sluice_stores::Error>(runnable)
    }
    .await;
    found.map_err(|e| {
        tracing::warn!(error = %e, "cannot read the workflow registry");
        ApiError::unavailable("Sluice cannot read the workflow registry right now; try again.")
    })
}

/// Validates the model, admits the request against the caller's limits, sends it to
/// `sluice.requests` and returns its reply stream.
pub async fn submit(
    state: &EdgeState,
    caller: &Caller,
    request: &CompletionRequest,
    prompt: Prompt,
    session_id: Option<String>,
    parent_trace: Option<TraceContext>,
) -> Result<Submitted, ApiError> {
    let tenant = caller.tenant;
    openai::check_workflow_fields(&request.model, &prompt)?;
    if !state.flags.enabled(CHAT_FLAG, Some(tenant.0), true) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "feature_disabled",
            "Chat completions are turned off for your organization.",
        ));
    }
    let unknown = match request.model.strip_prefix(openai::WORKFLOW_PREFIX) {
        Some(name) => {
            !caller.grant.allows(&request.model)
                || !runnable_workflow(state, tenant.0, name).await?
        }
        None => {
            state.catalog.find(&request.model).is_none() || !caller.grant.allows(&request.model)
        }
    };
    if request.model != AUTO_MODEL && unknown {
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
    // A session's memory goes before the new turn (it needs the session named).
    let (messages, remembered) = match (prompt.memory, &session_id) {
        (false, _) => (prompt.messages, 0),
        (true, None) => {
            return Err(ApiError::invalid(
                "Conversation memory needs a session: send X-Session-Id (or `user`).",
            ))
        }
        (true, Some(session)) => {
            crate::memory::check_session(session)?;
            let config = &state.config.memory;
            let owner = sluice_stores::postgres::memory::owner(
                caller.key_id().as_deref(),
                caller.user_id().as_deref(),
            );
            let turns =
                crate::memory::latest_turns(&state.app_pool, tenant.0, &owner, session, config)
                    .await?;
            crate::memory::with_history(prompt.messages, turns, config)
        }
    };
    openai::check_tool_answers(&messages, usize::try_from(remembered).unwrap_or(0))?;
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
        allowed_models: caller.grant.allowed_models(),
        key_id: caller.key_id(),
        user_id: caller.user_id(),
        tools: prompt.tools,
        tool_choice: prompt.tool_choice.as_ref().map(|(mode, _)| mode.clone()),
        tool_choice_function: prompt.tool_choice.and_then(|(_, function)| function),
        parallel_tool_calls: prompt.parallel_tool_calls,
        response_format: prompt.response_format,
        options_json: prompt.options_json,
        memory: prompt.memory,
        remembered,
        workflow_inputs_json: prompt.workflow_inputs_json,
    };
    let admission = state
        .limits
        .admit(
            &caller.grant,
            &request_id,
            (&record.model, &state.catalog),
            record.prompt_tokens(),
            max_tokens,
        )
        .await?;
    let subscription = state.replies.subscribe(&request_id);
    let replies_offset = state.replies.position();
    let trace = parent_trace
        .map(|p| p.child())
        .unwrap_or_else(TraceContext::new_root);
    // Every request is on `sluice.requests` with its trace id; a log line each is for debugging.
    tracing::debug!(%request_id, tenant = %tenant.0, model = %record.model, trace_id = %trace.trace_id_hex(), "request accepted");
    let mut out =
        sluice_pipelines::Emitter::new(state.producer.clone(), state.codec.clone(), trace);
    let key = record.session_id.clone();
    let sent = match out
        .emit(&state.topics.requests, None, key.as_bytes(), &record)
        .await
    {
        Ok(()) => out.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        // Not on the broker: nothing will be used, so the reservation goes back.
        if let Some(admission) = admission {
            admission.settle(sluice_stores::limits::Amounts::default());
        }
        drop(subscription);
        return Err(ApiError::unavailable(format!(
            "Sluice could not accept the request right now: {e}"
        )));
    }
    let mut subscription = subscription;
    subscription.hold(
        admission,
        Duration::from_secs(state.config.reply_timeout_secs),
    );
    Ok(Submitted {
        request_id,
        created_ms: received_at_ms,
        replies_offset,
        limit_headers: subscription.limit_headers(),
        subscription,
    })
}

/// The handler.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("bearer" = [])),
    request_body = crate::openai::CompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` a `text/event-stream` of `chat.completion.chunk` objects ending in `data: [DONE]`", body = Object),
        (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 404, description = "Not found, or not the caller's", body = crate::api_doc::ErrorBody), (status = 413, description = "Body too large", body = crate::api_doc::ErrorBody),
        (status = 429, description = "Over a rate limit or quota (with Retry-After)", body = crate::api_doc::ErrorBody), (status = 503, description = "A store or the broker is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody), (status = 504, description = "The model did not answer in time", body = crate::api_doc::ErrorBody)))]
pub async fn completions(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    openai::require_json(&headers)?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let (mut request, mut prompt) = openai::parse(&body)?;
    if let Some(name) = headers.get(openai::WORKFLOW_HEADER) {
        let name = name
            .to_str()
            .ok()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::invalid("X-Sluice-Workflow names a workflow.").with_param("model")
            })?;
        request.model = format!("{}{name}", openai::WORKFLOW_PREFIX);
    }
    prompt.memory = crate::memory::requested(
        headers
            .get(crate::memory::HEADER)
            .and_then(|v| v.to_str().ok()),
    )?;
    let session = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.user.clone());
    let trace = headers
        .get(sluice_pipelines::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let mut submitted = submit(&state, &caller, &request, prompt, session, trace).await?;
    let timeout = Duration::from_secs(state.config.reply_timeout_secs);
    let mut limit_headers = submitted.limit_headers.clone();
    limit_headers.insert(
        "x-request-id",
        HeaderValue::from_str(&submitted.request_id)
            .map_err(|e| ApiError::internal("a request id that is no header value", e))?,
    );
    // Wait for the first chunk before answering, so a refusal gets its own status code.
    let first = next_chunk(&mut submitted.subscription, timeout).await?;
    if first.kind == ReplyKind::Error {
        return Err(chunk_error(&first).with_headers(limit_headers));
    }
    if request.stream.unwrap_or(false) {
        let include_usage = request
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let reply = ReplyStream::new(
            &submitted.request_id,
            submitted.created(),
            submitted.subscription,
            Some(first),
            include_usage,
            timeout,
        );
        let mut response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(sse_body(reply, &state))
            .map_err(|e| ApiError::internal("cannot build the stream response", e))?;
        response.headers_mut().extend(limit_headers);
        return Ok(response);
    }
    let mut text = String::new();
    let mut tool_calls = ToolCallAssembler::default();
    let mut chunk = first;
    loop {
        match chunk.kind {
            ReplyKind::Delta => {
                text.push_str(&chunk.delta);
                tool_calls.push(&chunk.tool_calls);
            }
            ReplyKind::Error => return Err(chunk_error(&chunk).with_headers(limit_headers)),
            ReplyKind::Done => {
                text.push_str(&chunk.delta);
                tool_calls.push(&chunk.tool_calls);
                let body = openai::completion_json(
                    &submitted.request_id,
                    submitted.created(),
                    &chunk.model,
                    (&text, tool_calls.calls()),
                    chunk.finish_reason.as_deref().unwrap_or("stop"),
                    (chunk.input_tokens, chunk.output_tokens),
                );
                return Ok((limit_headers, Json(body)).into_response());
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
