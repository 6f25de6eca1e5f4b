//! A reply as it streams back: chunks read from the request's [`Subscription`] and turned into
//! OpenAI's streaming objects, for SSE and WebSocket alike. [`ReplyStream`] is the small API
//! both use; [`sse_body`] frames it as server-sent events.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::StatusCode,
};
use futures::stream;
use serde_json::{json, Value};
use sluice_schemas::{ReplyChunk, ReplyKind};

use crate::{
    error::ApiError,
    openai::{chunk_json, tool_call_deltas_json, usage_json},
    replies::Subscription,
    EdgeState,
};

/// The next chunk of a reply, or a timeout error.
pub async fn next_chunk(sub: &mut Subscription, timeout: Duration) -> Result<ReplyChunk, ApiError> {
    match tokio::time::timeout(timeout, sub.rx.recv()).await {
        Ok(Some(chunk)) => {
            sub.observe(&chunk);
            Ok(chunk)
        }
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

/// Turns one request's reply chunks into OpenAI's streaming objects: a first chunk with the
/// assistant role, one per delta, a last one with `finish_reason`, then (when asked for) a
/// usage chunk with no choices.
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
            // A reply that opens with tool calls has no content, as OpenAI streams it.
            let content = if chunk.delta.is_empty() && !chunk.tool_calls.is_empty() {
                Value::Null
            } else {
                json!("")
            };
            out.push(self.object(
                chunk,
                json!({ "role": "assistant", "content": content }),
                None,
            ));
        }
        // A DONE chunk may carry the reply's last text (the orchestrator joins text that
        // arrives together into one chunk).
        if !chunk.delta.is_empty() {
            out.push(self.object(chunk, json!({ "content": chunk.delta }), None));
        }
        // Each piece of a tool call in an object of its own, as OpenAI streams them.
        for piece in &chunk.tool_calls {
            let pieces = tool_call_deltas_json(std::slice::from_ref(piece));
            out.push(self.object(chunk, json!({ "tool_calls": pieces }), None));
        }
        if chunk.kind == ReplyKind::Delta {
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

/// One request's reply, as OpenAI streaming objects: what SSE and the WebSocket send.
pub struct ReplyStream {
    subscription: Subscription,
    translator: StreamTranslator,
    timeout: Duration,
    /// A chunk already read (the first, which the handler waits for before answering).
    pending: Option<ReplyChunk>,
    finished: bool,
}

impl ReplyStream {
    /// The reply of request `id` (created at `created`), read from `subscription`; `first` is
    /// a chunk already read from it, if any.
    pub fn new(
        id: &str,
        created: i64,
        subscription: Subscription,
        first: Option<ReplyChunk>,
        include_usage: bool,
        timeout: Duration,
    ) -> Self {
        Self {
            subscription,
            translator: StreamTranslator::new(id, created, include_usage),
            timeout,
            pending: first,
            finished: false,
        }
    }

    /// The next objects of the reply, or `None` once it has ended (after `Finished` or
    /// `Failed`). A missing chunk within the timeout fails the stream.
    pub async fn next(&mut self) -> Option<Translated> {
        if self.finished {
            return None;
        }
        let chunk = match self.pending.take() {
            Some(chunk) => Ok(chunk),
            None => next_chunk(&mut self.subscription, self.timeout).await,
        };
        let translated = match chunk {
            Ok(chunk) => self.translator.translate(&chunk),
            Err(e) => Translated::Failed(e),
        };
        self.finished = !matches!(translated, Translated::More(_));
        Some(translated)
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `reply` as a server-sent-events body: one `data:` event per object, an error object if the
/// reply fails, and `data: [DONE]` last.
pub fn sse_body(reply: ReplyStream, state: &EdgeState) -> Body {
    const DONE: &[u8] = b"data: [DONE]\n\n";
    let open = OpenStream::new(state, "sse");
    let events = stream::unfold((reply, open), |(mut reply, open)| async move {
        let bytes: Bytes = match reply.next().await? {
            Translated::More(objects) => objects.iter().map(sse).collect::<Vec<_>>().concat(),
            Translated::Finished(objects) => {
                let mut out: Vec<Bytes> = objects.iter().map(sse).collect();
                out.push(Bytes::from_static(DONE));
                out.concat()
            }
            Translated::Failed(e) => [sse(&e.body()), Bytes::from_static(DONE)].concat(),
        }
        .into();
        Some((Ok::<_, Infallible>(bytes), (reply, open)))
    });
    Body::from_stream(events)
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
        // Tool calls: each piece in an object of its own, then finish_reason tool_calls.
        let mut t = StreamTranslator::new("chatcmpl-2", 7, false);
        let mut call = ReplyChunk::new(&request, "sim-small", 0, ReplyKind::Done);
        call.finish_reason = Some("tool_calls".into());
        for (id, arguments) in [(Some("call_1"), ""), (None, "{}")] {
            call.tool_calls.push(sluice_schemas::ToolCallDelta {
                index: 0,
                id: id.map(str::to_owned),
                name: id.map(|_| "lookup".to_owned()),
                arguments: arguments.into(),
            });
        }
        let Translated::Finished(objects) = t.translate(&call) else {
            panic!("finished")
        };
        assert_eq!(objects.len(), 4, "role, two pieces, finish");
        assert_eq!(objects[0]["choices"][0]["delta"]["content"], Value::Null);
        let first = &objects[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (first["id"].as_str(), first["function"]["name"].as_str()),
            (Some("call_1"), Some("lookup"))
        );
        let second = &objects[2]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            second,
            &json!({"index": 0, "function": {"arguments": "{}"}})
        );
        assert_eq!(objects[3]["choices"][0]["finish_reason"], "tool_calls");

        let error = ReplyChunk::error(&request, "m", 0, 429, "upstream_rate_limited", "slow down");
        let Translated::Failed(e) = StreamTranslator::new("x", 0, false).translate(&error) else {
            panic!("failed")
        };
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
    }
}
