//! `GET /v1/chat/stream`: chat over a WebSocket.
//!
//! The client sends text frames, each a chat completion request body (as for
//! `/v1/chat/completions`; `stream` is implied). Several requests may be in flight on one
//! socket. The server answers each with `chat.completion.chunk` frames (the same objects SSE
//! carries, `id` telling requests apart): deltas, a chunk with `finish_reason`, then a usage
//! chunk with no choices. Errors come as `{"id": ..., "error": {...}}` frames. Authentication: the `Authorization` header,
//! or `?api_key=` for browsers, which cannot set headers on a WebSocket.
//!
//! One task reads the socket and one writes it; they end together. Outgoing frames pass through
//! a bounded queue, so a client that stops reading slows its own replies instead of growing the
//! server's memory.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{
        ws::{Message, WebSocket, WebSocketUpgrade},
        Query, State,
    },
    http::request::Parts,
    response::Response,
};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{self, Caller},
    chat,
    error::ApiError,
    openai,
    stream::{OpenStream, ReplyStream, Translated},
    EdgeState,
};

/// Frames queued for a socket before its request tasks wait.
const OUTBOX: usize = 256;
/// Requests one socket may have in flight.
const MAX_IN_FLIGHT: usize = 64;

/// Query parameters of the upgrade request.
#[derive(Deserialize)]
pub struct WsQuery {
    api_key: Option<String>,
}

/// The upgrade handler.
#[utoipa::path(get, path = "/v1/chat/stream", tag = "openai", security(("bearer" = [])),
    params(("api_key" = Option<String>, Query, description = "The key, for browsers, which cannot set headers on a WebSocket")),
    responses((status = 101, description = "WebSocket: send chat completion request bodies as text frames; receive `chat.completion.chunk` frames"), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody)))]
pub async fn upgrade(
    State(state): State<Arc<EdgeState>>,
    Query(query): Query<WsQuery>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let key = auth::bearer(&parts).map(str::to_owned).or(query.api_key);
    auth::caller_for_key(&state, key.as_deref()).await?;
    let max = state.config.max_body_bytes;
    Ok(ws
        .max_message_size(max)
        .on_upgrade(move |socket| session(state, key.unwrap_or_default(), socket)))
}

/// One socket. The caller is checked again for every request it sends (from the cache, so
/// cheaply): a key revoked, a token expired or a tenant deleted while the socket is open stops
/// it there, with an error frame and a close.
async fn session(state: Arc<EdgeState>, key: String, socket: WebSocket) {
    let _open = OpenStream::new(&state, "websocket");
    let (mut sink, mut source) = socket.split();
    let (outbox, mut outgoing) = mpsc::channel::<Value>(OUTBOX);
    let done = CancellationToken::new();

    let writer_done = done.clone();
    let writer = async move {
        while let Some(frame) = outgoing.recv().await {
            if sink
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
        writer_done.cancel();
    };

    let reader_state = state.clone();
    let reader_done = done.clone();
    let reader = async move {
        let mut requests = tokio::task::JoinSet::new();
        loop {
            let frame = tokio::select! {
                _ = reader_done.cancelled() => break,
                frame = source.next() => frame,
            };
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(_))) => {
                    let e = ApiError::invalid("Send requests as text frames holding JSON.");
                    if outbox
                        .send(json!({ "id": Value::Null, "error": e.body()["error"] }))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            };
            while requests.len() >= MAX_IN_FLIGHT {
                requests.join_next().await;
            }
            let caller = match auth::caller_for_key(&reader_state, Some(&key)).await {
                Ok(caller) => caller,
                Err(e) => {
                    let _ = outbox
                        .send(json!({ "id": Value::Null, "error": e.body()["error"] }))
                        .await;
                    break;
                }
            };
            let state = reader_state.clone();
            let outbox = outbox.clone();
            requests
                .spawn(async move { run_request(&state, &caller, text.as_bytes(), &outbox).await });
        }
        // Let requests in flight finish writing, then stop the writer.
        while requests.join_next().await.is_some() {}
        drop(outbox);
    };

    tokio::join!(writer, reader);
}

async fn run_request(
    state: &EdgeState,
    caller: &Caller,
    body: &[u8],
    outbox: &mpsc::Sender<Value>,
) {
    let error_frame =
        |id: Option<&str>, e: &ApiError| json!({ "id": id, "error": e.body()["error"] });
    let (request, messages) = match openai::parse(body) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = outbox.send(error_frame(None, &e)).await;
            return;
        }
    };
    let submitted = match chat::submit(
        state,
        caller,
        &request,
        messages,
        request.user.clone(),
        None,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = outbox.send(error_frame(None, &e)).await;
            return;
        }
    };
    let id = submitted.request_id.clone();
    let mut reply = ReplyStream::new(
        &id,
        submitted.created,
        submitted.subscription,
        None,
        true,
        Duration::from_secs(state.config.reply_timeout_secs),
    );
    while let Some(translated) = reply.next().await {
        let objects = match translated {
            Translated::More(objects) | Translated::Finished(objects) => objects,
            Translated::Failed(e) => {
                let _ = outbox.send(error_frame(Some(&id), &e)).await;
                return;
            }
        };
        for object in objects {
            if outbox.send(object).await.is_err() {
                return;
            }
        }
    }
}
