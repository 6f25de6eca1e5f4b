//! `GET /v1/chat/stream`: chat over a WebSocket, protocol `sluice.chat.v1`.
//!
//! Every frame is a JSON text frame with a `type`. The client sends:
//! - `hello` — `{"type": "hello", "api_key": "sk-…"}` or `{"token": "<access token>"}`: needed
//!   first when the upgrade carried no credentials (browsers cannot set headers on a WebSocket;
//!   `?api_key=` works too but lands in access logs); sent again later, it swaps the credential
//!   (a fresh access token for a long-lived socket).
//! - `chat` — `{"type": "chat", "request": {…a chat completion body…}, "ref": "…"}`; several
//!   may be in flight (`edge.websocket.max_streams`). `ref` is the client's own label, echoed.
//! - `resume` — `{"type": "resume", "stream": "<id>", "after_seq": n}`: the stream's chunks after
//!   sequence number `n` (all of them without it), then its end, on any edge instance.
//! - `ping` — answered with `pong` (for clients that cannot send WebSocket pings).
//!
//! The server sends `hello` (once authenticated), `started` (a chat's stream id, with its
//! `ref`), `delta` (`stream`, `seq`, `content`), `done` (`stream`, `seq`, the last `content`,
//! `model`, `finish_reason`, `usage`), `resumed`, `error` (`stream` and `ref` when it concerns
//! one, and OpenAI's `error` object), and `pong`. Sequence numbers count a stream's frames from
//! 0; a client keeps the last it saw to resume. Tool calls will travel as `tool_call` frames.
//!
//! The connection: the server pings every `edge.websocket.heartbeat_secs` and closes a client
//! silent for two of them (1001). A client that leaves its frames unread — the socket's buffers
//! and `edge.websocket.buffer_frames` full for `edge.websocket.slow_reader_secs` — is closed
//! with 4008, never buffered without bound; one that fails to authenticate, with 4401. An edge
//! that stops lets streams finish for `edge.drain_secs`, then closes with 1012; in every case
//! the client resumes its streams on any edge.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
        Query, State,
    },
    http::{request::Parts, StatusCode},
    response::Response,
};
use futures::{
    stream::{SplitSink, SplitStream},
    SinkExt, StreamExt,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_schemas::{ReplyChunk, ReplyKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{self, Caller},
    chat, cors,
    error::ApiError,
    openai::{self, tool_call_deltas_json, usage_json},
    resume::{StreamId, StreamReader},
    stream::{chunk_error, next_chunk, OpenStream},
    EdgeState,
};

/// The reason of the close that ends a drained session.
const DRAINED: &str = "edge restarting; reconnect and resume your streams";

/// The protocol's name, in the server's `hello`.
pub const PROTOCOL: &str = "sluice.chat.v1";

/// Close codes.
pub mod close {
    /// The client closed, or the conversation ended normally.
    pub const NORMAL: u16 = 1000;
    /// The client stopped answering pings.
    pub const GONE: u16 = 1001;
    /// The edge is stopping: reconnect (to any edge) and resume.
    pub const RESTART: u16 = 1012;
    /// The client did not read its frames in time: reconnect and resume.
    pub const SLOW_READER: u16 = 4008;
    /// No valid credentials (the `error` frame before it says why).
    pub const UNAUTHORIZED: u16 = 4401;
}

/// WebSocket settings.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Seconds between the server's pings; a client silent for two of them is closed.
    pub heartbeat_secs: u64,
    /// Seconds a client that connected without credentials has to send its `hello`.
    pub hello_timeout_secs: u64,
    /// Seconds a client may leave its frames unread, with its buffer full, before it is closed.
    pub slow_reader_secs: u64,
    /// Frames held for a socket beyond what the operating system buffers.
    pub buffer_frames: usize,
    /// Streams one socket may have in flight.
    pub max_streams: usize,
    /// Streams this edge reads back for resuming clients at once (each with a consumer of its
    /// own); beyond them, a resume is answered 503 to retry.
    pub max_resumes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: 20,
            hello_timeout_secs: 10,
            slow_reader_secs: 10,
            buffer_frames: 64,
            max_streams: 64,
            max_resumes: 64,
        }
    }
}

impl WebSocketConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("heartbeat_secs", self.heartbeat_secs),
            ("hello_timeout_secs", self.hello_timeout_secs),
            ("slow_reader_secs", self.slow_reader_secs),
        ] {
            if value == 0 {
                problems.push(format!("edge.websocket.{name} must be at least 1"));
            }
        }
        if self.buffer_frames == 0 || self.max_streams == 0 {
            problems
                .push("edge.websocket.buffer_frames and max_streams must be at least 1".to_owned());
        }
        problems
    }
}

/// Query parameters of the upgrade request.
#[derive(Deserialize)]
pub struct WsQuery {
    api_key: Option<String>,
}

/// What a client sends.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Hello {
        api_key: Option<String>,
        token: Option<String>,
    },
    Chat {
        request: Value,
        #[serde(rename = "ref")]
        reference: Option<String>,
        /// Keep the session's memory (as `X-Sluice-Memory: on`); the session is the request's
        /// `user`.
        #[serde(default)]
        memory: bool,
    },
    Resume {
        stream: String,
        after_seq: Option<i32>,
        #[serde(rename = "ref")]
        reference: Option<String>,
    },
    Ping {
        data: Option<Value>,
    },
}

/// The upgrade handler. Credentials on the upgrade are checked before it (a wrong key gets its
/// 401 at once); without them the client authenticates with its first frame.
#[utoipa::path(get, path = "/v1/chat/stream", tag = "openai", security((), ("bearer" = [])),
    params(("api_key" = Option<String>, Query, description = "The key, for clients that cannot set headers (or send it in the `hello` frame)")),
    responses((status = 101, description = "WebSocket, protocol `sluice.chat.v1`: `hello`, `chat`, `resume` and `ping` frames in; `hello`, `started`, `delta`, `done`, `resumed`, `error` and `pong` frames out (see the README)"), (status = 401, description = "Wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "The edge is stopping", body = crate::api_doc::ErrorBody)))]
pub async fn upgrade(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<WsQuery>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let credential = auth::bearer(&parts)
        .map(str::to_owned)
        .or(query.api_key)
        .filter(|c| !c.is_empty());
    // Browsers always send `Origin` on a WebSocket: the tenant must list it (see `cors`).
    let origin = cors::origin(&parts.headers).map(str::to_owned);
    if credential.is_some() {
        let caller = auth::caller_for_key(&state, credential.as_deref()).await?;
        cors::check_origin(&state, origin.as_deref(), caller.tenant.0)?;
    }
    if state.draining.is_cancelled() {
        return Err(ApiError::unavailable("This edge is stopping; connect again.").retry_after(1));
    }
    let sessions = state.ws_sessions.clone();
    Ok(ws
        .max_message_size(state.config.max_body_bytes)
        // Most frames are small: buffers grow for the large ones and start small, so an idle
        // session costs little.
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            sessions.track_future(session(state, credential, origin, socket))
        }))
}

/// How a session ends: the first reason given wins.
#[derive(Default)]
struct SessionEnd {
    token: CancellationToken,
    reason: OnceLock<(u16, &'static str)>,
}

impl SessionEnd {
    fn end(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        self.token.cancel();
    }

    fn reason(&self) -> (u16, &'static str) {
        self.reason.get().copied().unwrap_or((close::NORMAL, ""))
    }
}

/// Frames to a socket, bounded: a sender waits for room at most `slow_reader`, then ends the
/// session (the client is not reading).
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Value>,
    end: Arc<SessionEnd>,
    slow_reader: Duration,
}

impl Outbox {
    /// Queues `frame`; false if the session is over.
    async fn send(&self, frame: Value) -> bool {
        tokio::select! {
            sent = self.tx.send_timeout(frame, self.slow_reader) => match sent {
                Ok(()) => true,
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    self.end.end(close::SLOW_READER, "not reading fast enough; reconnect and resume");
                    false
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
            },
            _ = self.end.token.cancelled() => false,
        }
    }

    async fn error(&self, stream: Option<&str>, reference: Option<&str>, e: &ApiError) -> bool {
        let mut frame = json!({ "type": "error", "error": e.body()["error"] });
        if let Some(stream) = stream {
            frame["stream"] = json!(stream);
        }
        if let Some(reference) = reference {
            frame["ref"] = json!(reference);
        }
        self.send(frame).await
    }
}

/// One socket: a reader and a writer task, ending together.
async fn session(
    state: Arc<EdgeState>,
    credential: Option<String>,
    origin: Option<String>,
    socket: WebSocket,
) {
    let _open = OpenStream::new(&state, "websocket");
    let config = &state.config.websocket;
    let (sink, source) = socket.split();
    let (tx, outgoing) = mpsc::channel::<Value>(config.buffer_frames);
    let end = Arc::new(SessionEnd::default());
    let outbox = Outbox {
        tx,
        end: end.clone(),
        slow_reader: Duration::from_secs(config.slow_reader_secs),
    };
    let heard = Arc::new(Heard::new());
    tokio::join!(
        write_frames(sink, outgoing, end.clone(), heard.clone(), &state),
        read_frames(&state, source, credential, origin.as_deref(), outbox, heard)
    );
    let (code, _) = end.reason();
    state
        .metrics
        .ws_closes
        .with_label_values(&[close_label(code)])
        .inc();
}

fn close_label(code: u16) -> &'static str {
    match code {
        close::GONE => "heartbeat",
        close::RESTART => "drain",
        close::SLOW_READER => "slow_reader",
        close::UNAUTHORIZED => "unauthorized",
        _ => "normal",
    }
}

/// When the client was last heard from.
struct Heard {
    started: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Writes queued frames and pings; when the session ends, what is queued (unless the client is
/// too slow for it) and a close frame with the reason.
async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Value>,
    end: Arc<SessionEnd>,
    heard: Arc<Heard>,
    state: &EdgeState,
) {
    let config = &state.config.websocket;
    let heartbeat = Duration::from_secs(config.heartbeat_secs);
    // A write that does not complete in this time means the client reads nothing at all.
    let stuck = Duration::from_secs(config.slow_reader_secs.saturating_mul(2));
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        let message = tokio::select! {
            biased;
            _ = end.token.cancelled() => break,
            frame = outgoing.recv() => match frame {
                Some(frame) => Message::Text(frame.to_string().into()),
                None => break,
            },
            _ = pings.tick() => {
                if heard.silent_for() > heartbeat * 2 {
                    end.end(close::GONE, "no answer to pings");
                    break;
                }
                Message::Ping(Default::default())
            }
        };
        match tokio::time::timeout(stuck, sink.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                end.end(close::NORMAL, "");
                return;
            }
            Err(_) => {
                end.end(close::SLOW_READER, "not reading");
                return;
            }
        }
    }
    end.end(close::NORMAL, "");
    let (code, reason) = end.reason();
    let flush = async {
        if code != close::SLOW_READER {
            while let Ok(frame) = outgoing.try_recv() {
                sink.send(Message::Text(frame.to_string().into())).await?;
            }
        }
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
}

/// Authenticates the client, then reads its frames and runs its streams until the session
/// ends, the client leaves, or the edge drains.
async fn read_frames(
    state: &Arc<EdgeState>,
    mut source: SplitStream<WebSocket>,
    credential: Option<String>,
    origin: Option<&str>,
    outbox: Outbox,
    heard: Arc<Heard>,
) {
    let end = outbox.end.clone();
    let config = &state.config.websocket;
    let credential = match credential {
        Some(credential) => Some(credential),
        None => {
            let wait = Duration::from_secs(config.hello_timeout_secs);
            match tokio::time::timeout(wait, source.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
                    Ok(ClientFrame::Hello { api_key, token }) => api_key.or(token),
                    _ => None,
                },
                _ => None,
            }
        }
    };
    let Some(mut credential) = credential else {
        let e = ApiError::unauthorized(
            "Authenticate first: send {\"type\": \"hello\", \"api_key\": \"…\"} (or \"token\").",
        );
        outbox.error(None, None, &e).await;
        end.end(close::UNAUTHORIZED, "unauthorized");
        return;
    };
    if !authenticate(state, &credential, origin, &outbox).await {
        return;
    }
    let mut streams = tokio::task::JoinSet::new();
    // Once the edge drains: no new requests; the socket is still read (pongs, pings, a close)
    // until its streams finish or the drain deadline comes, then it is closed resumably.
    let mut draining = false;
    loop {
        if draining && streams.is_empty() {
            end.end(close::RESTART, DRAINED);
            break;
        }
        let frame = tokio::select! {
            biased;
            _ = end.token.cancelled() => break,
            _ = state.closing.cancelled(), if draining => {
                end.end(close::RESTART, DRAINED);
                break;
            }
            _ = state.draining.cancelled(), if !draining => {
                draining = true;
                continue;
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            frame = source.next() => frame,
        };
        heard.now();
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                let e = ApiError::invalid("Send JSON text frames.");
                outbox.error(None, None, &e).await;
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                end.end(close::NORMAL, "");
                break;
            }
            Some(Ok(_)) => continue,
        };
        let frame = match serde_json::from_str::<ClientFrame>(&text) {
            Ok(frame) => frame,
            Err(e) => {
                let e = ApiError::invalid(format!(
                    "Not a {PROTOCOL} frame ({e}); frames are JSON objects with a `type` of hello, chat, resume or ping."
                ));
                outbox.error(None, None, &e).await;
                continue;
            }
        };
        let reference = match &frame {
            ClientFrame::Chat { reference, .. } | ClientFrame::Resume { reference, .. } => {
                reference.clone()
            }
            _ => None,
        };
        match frame {
            ClientFrame::Ping { data } => {
                outbox.send(json!({ "type": "pong", "data": data })).await;
                continue;
            }
            ClientFrame::Hello { api_key, token } => {
                credential = api_key.or(token).unwrap_or_default();
                if !authenticate(state, &credential, origin, &outbox).await {
                    break;
                }
                continue;
            }
            _ if draining => {
                let e = ApiError::unavailable(
                    "This edge is stopping: connect again (to any edge) and send it there.",
                )
                .retry_after(1);
                outbox.error(None, reference.as_deref(), &e).await;
                continue;
            }
            _ if streams.len() >= config.max_streams => {
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "At most {} streams may be in flight on one socket.",
                        config.max_streams
                    ),
                );
                outbox.error(None, reference.as_deref(), &e).await;
                continue;
            }
            _ => {}
        }
        // The caller is checked again for every request (from the cache, so cheaply): a key
        // revoked, a token expired or a tenant deleted while the socket is open stops it here.
        let caller = match caller(state, &credential, origin).await {
            Ok(caller) => caller,
            Err(e) => {
                outbox.error(None, reference.as_deref(), &e).await;
                end.end(close::UNAUTHORIZED, "unauthorized");
                break;
            }
        };
        let (state, outbox) = (state.clone(), outbox.clone());
        match frame {
            ClientFrame::Chat {
                request,
                reference,
                memory,
            } => {
                streams.spawn(async move {
                    run_chat(&state, &caller, request, reference, memory, &outbox).await
                });
            }
            ClientFrame::Resume {
                stream,
                after_seq,
                reference,
            } => {
                streams.spawn(async move {
                    run_resume(&state, &caller, &stream, after_seq, reference, &outbox).await;
                });
            }
            ClientFrame::Hello { .. } | ClientFrame::Ping { .. } => {}
        }
    }
    // Streams still running end with the session (their frames have nowhere to go); a chat's
    // reply is still read to its end in the background and settled.
    streams.shutdown().await;
}

/// The caller `credential` names, if it may connect from `origin`.
async fn caller(
    state: &EdgeState,
    credential: &str,
    origin: Option<&str>,
) -> Result<Caller, ApiError> {
    let caller = auth::caller_for_key(state, Some(credential)).await?;
    cors::check_origin(state, origin, caller.tenant.0)?;
    Ok(caller)
}

/// Checks `credential` and greets the client; on failure sends the error and ends the session.
async fn authenticate(
    state: &EdgeState,
    credential: &str,
    origin: Option<&str>,
    outbox: &Outbox,
) -> bool {
    match caller(state, credential, origin).await {
        Ok(_) => {
            let config = &state.config.websocket;
            outbox
                .send(json!({
                    "type": "hello",
                    "protocol": PROTOCOL,
                    "heartbeat_secs": config.heartbeat_secs,
                    "max_streams": config.max_streams,
                }))
                .await
        }
        Err(e) => {
            outbox.error(None, None, &e).await;
            outbox.end.end(close::UNAUTHORIZED, "unauthorized");
            false
        }
    }
}

/// The frame for one reply chunk of `stream`; pieces of tool calls travel in `tool_calls`, in
/// the shape of OpenAI's streamed `delta.tool_calls`.
fn chunk_frame(stream: &str, chunk: &ReplyChunk) -> Value {
    let mut frame = match chunk.kind {
        ReplyKind::Delta => json!({
            "type": "delta", "stream": stream, "seq": chunk.seq, "content": chunk.delta,
        }),
        ReplyKind::Done => json!({
            "type": "done", "stream": stream, "seq": chunk.seq, "content": chunk.delta,
            "model": chunk.model,
            "finish_reason": chunk.finish_reason.as_deref().unwrap_or("stop"),
            "usage": usage_json(chunk.input_tokens, chunk.output_tokens),
        }),
        ReplyKind::Error => {
            return json!({
                "type": "error", "stream": stream, "seq": chunk.seq,
                "error": chunk_error(chunk).body()["error"],
            })
        }
    };
    if !chunk.tool_calls.is_empty() {
        frame["tool_calls"] = tool_call_deltas_json(&chunk.tool_calls);
    }
    frame
}

/// A `chat` frame: submits the request and streams its reply.
async fn run_chat(
    state: &EdgeState,
    caller: &Caller,
    request: Value,
    reference: Option<String>,
    memory: bool,
    outbox: &Outbox,
) {
    let reference = reference.as_deref();
    let Ok(_place) = state.in_flight.clone().try_acquire_owned() else {
        state.metrics.edge_shed.inc();
        let e =
            ApiError::unavailable("Sluice is serving as many requests as it can; retry shortly.");
        outbox.error(None, reference, &e).await;
        return;
    };
    let parsed = serde_json::to_vec(&request)
        .map_err(|e| ApiError::invalid(format!("`request` is not a JSON object: {e}")))
        .and_then(|body| openai::parse(&body));
    let (mut request, mut prompt) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            outbox.error(None, reference, &e).await;
            return;
        }
    };
    // Over a socket every reply streams.
    request.stream = Some(true);
    prompt.memory = memory;
    let session = request.user.clone();
    let submitted = match chat::submit(state, caller, &request, prompt, session, None).await {
        Ok(submitted) => submitted,
        Err(e) => {
            outbox.error(None, reference, &e).await;
            return;
        }
    };
    let stream = state.stream_ids.sign(&StreamId {
        request_id: submitted.request_id.clone(),
        partition: state.replies.partition(),
        offset: submitted.replies_offset,
        created_ms: submitted.created_ms,
    });
    let started = json!({
        "type": "started", "stream": stream, "request_id": submitted.request_id, "ref": reference,
    });
    if !outbox.send(started).await {
        return;
    }
    let mut subscription = submitted.subscription;
    let timeout = Duration::from_secs(state.config.reply_timeout_secs);
    loop {
        match next_chunk(&mut subscription, timeout).await {
            Ok(chunk) => {
                let last = chunk.kind != ReplyKind::Delta;
                if !outbox.send(chunk_frame(&stream, &chunk)).await || last {
                    return;
                }
            }
            Err(e) => {
                outbox.error(Some(&stream), None, &e).await;
                return;
            }
        }
    }
}

/// A `resume` frame: the stream's chunks after `after_seq`, read back from the replies topic.
async fn run_resume(
    state: &EdgeState,
    caller: &Caller,
    stream: &str,
    after_seq: Option<i32>,
    reference: Option<String>,
    outbox: &Outbox,
) {
    let reference = reference.as_deref();
    let after_seq = after_seq.unwrap_or(-1);
    let tenant = caller.tenant.0.to_string();
    let opened = state
        .stream_ids
        .verify(stream)
        .and_then(|id| StreamReader::open(state, id, &tenant, after_seq));
    let mut reader = match opened {
        Ok(reader) => reader,
        Err(e) => {
            outcome(state, "refused");
            outbox.error(Some(stream), reference, &e).await;
            return;
        }
    };
    let resumed = json!({
        "type": "resumed", "stream": stream, "after_seq": after_seq, "ref": reference,
    });
    if !outbox.send(resumed).await {
        return;
    }
    loop {
        match reader.next().await {
            Ok(Some(chunk)) => {
                if !outbox.send(chunk_frame(stream, &chunk)).await {
                    return;
                }
            }
            Ok(None) => {
                outcome(state, "complete");
                return;
            }
            Err(e) => {
                outcome(state, e.code.as_deref().unwrap_or("failed"));
                outbox.error(Some(stream), reference, &e).await;
                return;
            }
        }
    }
}

fn outcome(state: &EdgeState, outcome: &str) {
    let outcome = match outcome {
        "complete" | "refused" | "stream_not_found" | "timeout" => outcome,
        _ => "failed",
    };
    state.metrics.ws_resumes.with_label_values(&[outcome]).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_by_type() {
        let hello: ClientFrame = serde_json::from_str(r#"{"type":"hello","api_key":"k"}"#).unwrap();
        assert!(matches!(hello, ClientFrame::Hello { api_key: Some(k), token: None } if k == "k"));
        let chat: ClientFrame =
            serde_json::from_str(r#"{"type":"chat","request":{"model":"auto"},"ref":"a"}"#)
                .unwrap();
        assert!(matches!(chat, ClientFrame::Chat { reference: Some(r), .. } if r == "a"));
        let resume: ClientFrame =
            serde_json::from_str(r#"{"type":"resume","stream":"s","after_seq":3}"#).unwrap();
        assert!(matches!(
            resume,
            ClientFrame::Resume {
                after_seq: Some(3),
                ..
            }
        ));
        // A bare chat body (no type) is not a frame.
        assert!(serde_json::from_str::<ClientFrame>(r#"{"model":"auto","messages":[]}"#).is_err());
    }

    #[test]
    fn chunks_become_frames_with_their_sequence() {
        let request = crate::test_support::request("chatcmpl-1");
        let mut delta = ReplyChunk::new(&request, "sim-small", 0, ReplyKind::Delta);
        delta.delta = "Hi".into();
        let frame = chunk_frame("s", &delta);
        assert_eq!(
            frame,
            json!({"type": "delta", "stream": "s", "seq": 0, "content": "Hi"})
        );
        let mut done = ReplyChunk::new(&request, "sim-small", 1, ReplyKind::Done);
        done.input_tokens = 3;
        done.output_tokens = 1;
        let frame = chunk_frame("s", &done);
        assert_eq!(frame["type"], "done");
        assert_eq!(frame["finish_reason"], "stop");
        assert_eq!(frame["usage"]["total_tokens"], 4);
        assert!(
            frame.get("tool_calls").is_none(),
            "only when there are some"
        );
        done.finish_reason = Some("tool_calls".into());
        done.tool_calls.push(sluice_schemas::ToolCallDelta {
            index: 0,
            id: Some("call_1".into()),
            name: Some("lookup".into()),
            arguments: "{}".into(),
        });
        let frame = chunk_frame("s", &done);
        assert_eq!(frame["finish_reason"], "tool_calls");
        assert_eq!(
            frame["tool_calls"],
            json!([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}])
        );
        let error = ReplyChunk::error(&request, "m", 2, 429, "upstream_rate_limited", "slow down");
        let frame = chunk_frame("s", &error);
        assert_eq!(frame["error"]["code"], "upstream_rate_limited");
        assert_eq!(frame["seq"], 2);
    }
}
