//! A local OpenAI-compatible upstream for `sluice bench gateway`: `POST /v1/chat/completions`
//! answers at once with a fixed reply, whole or as server-sent events (one chunk per word, then
//! the finish, the usage when asked for, and `[DONE]`), so what is measured is the path to it.
//!
//! It runs on its own thread and runtime, so the load generator's tasks do not queue behind it.

use axum::{
    body::Bytes,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The reply every request gets.
pub const REPLY: &str = "Sluice carries this reply through every hop.";
/// What the upstream reports as the prompt's size.
const PROMPT_TOKENS: usize = 12;

/// A running upstream; stops when dropped.
pub struct Upstream {
    /// Base URL of its OpenAI API (`http://127.0.0.1:<port>/v1`).
    pub base_url: String,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Starts the upstream on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let app = Router::new().route("/v1/chat/completions", post(complete));
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            if let Err(e) = sluice_pipelines::ops::serve(listener, app, stop).await
                            {
                                tracing::error!(error = %e, "the benchmark's upstream stopped");
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the benchmark's upstream cannot listen")
                        }
                    }
                })
            })?;
        Ok(Self {
            base_url,
            cancel,
            thread: Some(thread),
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn complete(body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        let error = json!({"error": {"message": "invalid JSON", "type": "invalid_request_error"}});
        return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
    };
    let model = request["model"].as_str().unwrap_or("bench").to_owned();
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    let usage = json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": words.len(),
        "total_tokens": PROMPT_TOKENS + words.len(),
    });
    if request["stream"].as_bool() != Some(true) {
        let reply = json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": REPLY}}],
            "usage": usage,
        });
        return axum::Json(reply).into_response();
    }
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = Vec::with_capacity(words.len() + 4);
    events.push(chunk(json!({"role": "assistant", "content": ""}), None));
    events.extend(
        words
            .iter()
            .map(|word| chunk(json!({"content": word}), None)),
    );
    events.push(chunk(json!({}), Some("stop")));
    if request["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [], "usage": usage,
        }));
    }
    let mut body = String::new();
    for event in events {
        body.push_str("data: ");
        body.push_str(&event.to_string());
        body.push_str("\n\n");
    }
    body.push_str("data: [DONE]\n\n");
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}
