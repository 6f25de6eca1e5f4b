//! The WebSocket protocol (`sluice.chat.v1`): authentication by header or `hello` frame, chats
//! and their frames, ping/pong, resuming a stream on another edge, an edge that drains, and a
//! client that stops reading.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, Message as Frame},
    MaybeTlsStream, WebSocketStream,
};

use crate::harness::*;

/// What a socket gave next.
#[derive(Debug)]
enum Event {
    Frame(Value),
    /// The server closed, with its close code if it sent one.
    Closed(Option<u16>),
}

/// A client of the protocol.
struct Ws<S = MaybeTlsStream<TcpStream>> {
    socket: WebSocketStream<S>,
}

fn ws_url(base: &str) -> String {
    format!("ws://{}/v1/chat/stream", base.trim_start_matches("http://"))
}

impl Ws {
    /// Connects to `base`'s edge, with `key` in the Authorization header if given.
    async fn connect(base: &str, key: Option<&str>) -> Self {
        let mut request = ws_url(base).into_client_request().unwrap();
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Self { socket }
    }

    /// Connects with `key` and reads the server's hello.
    async fn open(base: &str, key: &str) -> Self {
        let mut ws = Self::connect(base, Some(key)).await;
        let hello = ws.frame().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["protocol"], "sluice.chat.v1");
        ws
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Ws<S> {
    async fn send(&mut self, frame: Value) {
        self.socket
            .send(Frame::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends a chat frame for `content`, labelled `reference`.
    async fn chat(&mut self, reference: &str, content: &str, max_tokens: u32) {
        self.send(json!({
            "type": "chat", "ref": reference,
            "request": {"model": "sim-small", "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": content}]},
        }))
        .await;
    }

    /// The next JSON frame or the close, within 30 s (pings do not count).
    async fn event(&mut self) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a frame within 30 s");
            match next {
                Some(Ok(Frame::Text(text))) => {
                    return Event::Frame(serde_json::from_str(&text).unwrap())
                }
                Some(Ok(Frame::Close(close))) => {
                    return Event::Closed(close.map(|c| u16::from(c.code)))
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return Event::Closed(None),
            }
        }
    }

    /// The next JSON frame; panics if the socket closes.
    async fn frame(&mut self) -> Value {
        match self.event().await {
            Event::Frame(frame) => frame,
            Event::Closed(code) => panic!("socket closed ({code:?})"),
        }
    }
}

/// A stream's frames as a client keeps them.
#[derive(Default, Debug)]
struct Received {
    text: String,
    last_seq: Option<i64>,
    done: Option<Value>,
}

impl Received {
    /// Takes a `delta` or `done` frame, checking its sequence number follows the last.
    fn take(&mut self, frame: &Value) {
        let seq = frame["seq"].as_i64().expect("seq");
        assert_eq!(
            seq,
            self.last_seq.map_or(0, |s| s + 1),
            "frames in order, none missing: {frame}"
        );
        self.last_seq = Some(seq);
        self.text
            .push_str(frame["content"].as_str().unwrap_or_default());
        if frame["type"] == "done" {
            self.done = Some(frame.clone());
        }
    }
}

/// The whole reply text of `content` on `sim-small`, asked over HTTP (the simulator answers a
/// request the same way every time).
async fn whole_reply(base: &str, key: &str, content: &str, max_tokens: u32) -> String {
    let response = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "sim-small", "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn websocket_speaks_the_documented_protocol() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let mut ws = Ws::open(&sluice.url, &tenant.key).await;
    ws.chat("first", "first question", 8).await;
    ws.chat("second", "second question", 8).await;
    ws.send(json!({"type": "ping", "data": 7})).await;
    ws.socket
        .send(Frame::Text("not json".into()))
        .await
        .unwrap();
    // A bare chat body is not a frame of this protocol.
    ws.send(json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    let mut streams = std::collections::HashMap::<String, Received>::new();
    let mut refs = std::collections::HashMap::new();
    let (mut errors, mut pongs) = (0, 0);
    while streams.values().filter(|r| r.done.is_some()).count() < 2 || errors < 2 || pongs < 1 {
        let frame = ws.frame().await;
        match frame["type"].as_str().unwrap() {
            "started" => {
                let stream = frame["stream"].as_str().unwrap().to_owned();
                assert!(frame["request_id"]
                    .as_str()
                    .unwrap()
                    .starts_with("chatcmpl-"));
                refs.insert(frame["ref"].as_str().unwrap().to_owned(), stream.clone());
                streams.insert(stream, Received::default());
            }
            "delta" | "done" => streams
                .get_mut(frame["stream"].as_str().unwrap())
                .expect("a started stream")
                .take(&frame),
            "error" => {
                assert_eq!(frame["error"]["type"], "invalid_request_error", "{frame}");
                errors += 1;
            }
            "pong" => {
                assert_eq!(frame["data"], 7);
                pongs += 1;
            }
            other => panic!("unexpected frame {other}: {frame}"),
        }
    }
    assert_eq!(refs.len(), 2);
    for received in streams.values() {
        let done = received.done.as_ref().unwrap();
        assert_eq!(done["usage"]["completion_tokens"], 8);
        assert_eq!(done["model"], "sim-small");
        assert_eq!(done["finish_reason"], "length");
        assert_eq!(sluice_schemas::tokens::count(&received.text), 8);
    }

    // Without credentials on the upgrade, the first frame authenticates.
    let mut browser = Ws::connect(&sluice.url, None).await;
    browser
        .send(json!({"type": "hello", "api_key": tenant.key}))
        .await;
    assert_eq!(browser.frame().await["type"], "hello");
    browser.chat("b", "from a browser", 2).await;
    assert_eq!(browser.frame().await["type"], "started");
    // `?api_key=` works too.
    let (mut by_query, _) =
        tokio_tungstenite::connect_async(format!("{}?api_key={}", ws_url(&sluice.url), tenant.key))
            .await
            .unwrap();
    let Some(Ok(Frame::Text(hello))) = by_query.next().await else {
        panic!("no hello")
    };
    assert_eq!(
        serde_json::from_str::<Value>(&hello).unwrap()["type"],
        "hello"
    );

    // No hello, or a wrong one: an error frame, then close 4401.
    let mut stranger = Ws::connect(&sluice.url, None).await;
    stranger.chat("x", "who am I", 2).await;
    let error = stranger.frame().await;
    assert_eq!(error["error"]["type"], "authentication_error");
    assert!(matches!(stranger.event().await, Event::Closed(Some(4401))));
    let mut wrong = Ws::connect(&sluice.url, None).await;
    wrong
        .send(json!({"type": "hello", "api_key": "sk-sluice-wrong"}))
        .await;
    assert_eq!(wrong.frame().await["type"], "error");
    assert!(matches!(wrong.event().await, Event::Closed(Some(4401))));
    // A wrong key on the upgrade is refused before it, with a 401.
    let mut request = ws_url(&sluice.url).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer sk-sluice-wrong".parse().unwrap());
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn a_stream_resumes_on_another_edge_after_its_edge_drains() {
    // 20 tokens/s, 60 tokens: a whole reply streams for 3 s.
    let mut env = sim_speed(20.0);
    env.push((
        "SLUICE_ORCHESTRATOR__SIM__REPLY_TOKENS".to_owned(),
        "60".to_owned(),
    ));
    // One stream read back at a time on the edge that resumes.
    env.push((
        "SLUICE_EDGE__WEBSOCKET__MAX_RESUMES".to_owned(),
        "1".to_owned(),
    ));
    let sluice = Sluice::start_with(&unique("t"), env);
    let tenant = create_tenant(&sluice.prefix);
    let other = create_tenant(&sluice.prefix);
    let (mut draining, draining_url) =
        sluice.spawn_edge(&[("SLUICE_EDGE__DRAIN_SECS", "1".to_owned())]);
    ready_within(&draining_url).await;

    let mut ws = Ws::open(&draining_url, &tenant.key).await;
    ws.chat("short", "a short one", 4).await;
    ws.chat("long", "a long one", 60).await;
    let mut streams = std::collections::HashMap::<String, (String, Received)>::new();
    while streams
        .values()
        .map(|(_, r)| r.last_seq.unwrap_or(-1))
        .sum::<i64>()
        < 3
        || streams.len() < 2
    {
        let frame = ws.frame().await;
        match frame["type"].as_str().unwrap() {
            "started" => {
                let reference = frame["ref"].as_str().unwrap().to_owned();
                streams.insert(
                    frame["stream"].as_str().unwrap().to_owned(),
                    (reference, Received::default()),
                );
            }
            _ => streams
                .get_mut(frame["stream"].as_str().unwrap())
                .unwrap()
                .1
                .take(&frame),
        }
    }
    // The edge is told to stop: the short stream finishes, the long one is cut by the drain
    // deadline with a resumable close.
    let stopping = tokio::task::spawn_blocking(move || draining.terminate());
    let code = loop {
        match ws.event().await {
            Event::Frame(frame) => streams
                .get_mut(frame["stream"].as_str().unwrap())
                .unwrap()
                .1
                .take(&frame),
            Event::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(1012), "a draining edge closes with 1012");
    assert!(stopping.await.unwrap(), "the edge exits cleanly");
    let (long_id, (_, long)) = streams
        .iter()
        .find(|(_, (r, _))| r == "long")
        .map(|(id, v)| (id.clone(), v))
        .unwrap();
    let (_, (_, short)) = streams.iter().find(|(_, (r, _))| r == "short").unwrap();
    assert!(
        short.done.is_some(),
        "a stream that ends within the drain finishes"
    );
    assert!(long.done.is_none(), "the long stream was cut: {long:?}");

    // On another edge, the long stream resumes where the client left it.
    let mut ws = Ws::open(&sluice.url, &tenant.key).await;
    let after = long.last_seq.unwrap();
    ws.send(json!({"type": "resume", "stream": long_id, "after_seq": after, "ref": "again"}))
        .await;
    let resumed = ws.frame().await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["ref"], "again");
    // While it is read back, the edge has no place for another: a clear 503 to retry.
    let mut second = Ws::open(&sluice.url, &tenant.key).await;
    second
        .send(json!({"type": "resume", "stream": long_id}))
        .await;
    let busy = second.frame().await;
    assert_eq!(busy["error"]["code"], "service_unavailable", "{busy}");
    let mut long = std::mem::take(&mut streams.get_mut(&long_id).unwrap().1);
    while long.done.is_none() {
        long.take(&ws.frame().await);
    }
    assert_eq!(
        long.text,
        whole_reply(&sluice.url, &tenant.key, "a long one", 60).await,
        "what was missed, and nothing twice"
    );
    assert_eq!(
        long.done.as_ref().unwrap()["usage"]["completion_tokens"],
        60
    );

    // Resuming a finished stream from the start replays all of it.
    ws.send(json!({"type": "resume", "stream": long_id})).await;
    assert_eq!(ws.frame().await["type"], "resumed");
    let mut replay = Received::default();
    while replay.done.is_none() {
        replay.take(&ws.frame().await);
    }
    assert_eq!(replay.text, long.text);

    // Another tenant cannot read it; a made-up id is refused.
    let mut intruder = Ws::open(&sluice.url, &other.key).await;
    intruder
        .send(json!({"type": "resume", "stream": long_id}))
        .await;
    assert_eq!(intruder.frame().await["type"], "resumed");
    let refused = intruder.frame().await;
    assert_eq!(refused["error"]["code"], "stream_not_found", "{refused}");
    intruder
        .send(json!({"type": "resume", "stream": "not-a-stream"}))
        .await;
    assert_eq!(intruder.frame().await["error"]["param"], "stream");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_not_buffered() {
    // Replies of 3,000 tokens, streamed at 2,000 a second.
    let sluice = Sluice::start_with(
        &unique("t"),
        vec![
            (
                "SLUICE_EDGE__WEBSOCKET__SLOW_READER_SECS".to_owned(),
                "1".to_owned(),
            ),
            (
                "SLUICE_ORCHESTRATOR__SIM__REPLY_TOKENS".to_owned(),
                "3000".to_owned(),
            ),
        ],
    );
    let tenant = create_tenant(&sluice.prefix);
    // A small receive window, so the server's frames back up quickly.
    let address = sluice.url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(address).await.unwrap();
    let mut request = ws_url(&sluice.url).into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", tenant.key).parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let mut ws = Ws { socket };
    for i in 0..48 {
        ws.chat(&i.to_string(), &format!("a long answer {i}"), 3000)
            .await;
    }
    // The client reads nothing for a while; the server gives up on it.
    let base = sluice.url.clone();
    eventually(
        60,
        "the edge closes the socket of a client that does not read",
        || {
            let base = base.clone();
            async move {
                (metric(&base, "sluice_edge_ws_closes_total{reason=\"slow_reader\"}").await >= 1.0)
                    .then_some(())
            }
        },
    )
    .await;
    // When it reads again it gets what was buffered, then the end of the socket: at most
    // the operating system's buffers and `edge.websocket.buffer_frames`, never every reply.
    let mut frames = 0;
    let code = loop {
        match ws.event().await {
            Event::Frame(_) => frames += 1,
            Event::Closed(code) => break code,
        }
    };
    assert!(matches!(code, None | Some(4008)), "{code:?}");
    assert!(frames < 48 * 1000, "{frames} frames were held for it");
    // The edge serves others on.
    let mut other = Ws::open(&sluice.url, &tenant.key).await;
    other.chat("after", "still here", 3).await;
    assert_eq!(other.frame().await["type"], "started");
}

#[tokio::test]
async fn the_server_pings_and_closes_a_client_that_stops_answering() {
    let sluice = Sluice::start_with(
        &unique("t"),
        vec![(
            "SLUICE_EDGE__WEBSOCKET__HEARTBEAT_SECS".to_owned(),
            "1".to_owned(),
        )],
    );
    let tenant = create_tenant(&sluice.prefix);
    // A client that keeps reading answers the server's pings (tungstenite does it as it
    // reads): after four heartbeats it is still served.
    let mut lively = Ws::open(&sluice.url, &tenant.key).await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, lively.socket.next()).await {
        if matches!(frame, Frame::Ping(_)) {
            pings += 1;
        }
    }
    assert!(pings >= 2, "the server pinged every second: {pings}");
    lively
        .send(json!({"type": "ping", "data": "still here"}))
        .await;
    assert_eq!(lively.frame().await["data"], "still here");
    // One that reads nothing, and so answers nothing, is closed as gone.
    let mut silent = Ws::open(&sluice.url, &tenant.key).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        matches!(silent.event().await, Event::Closed(Some(1001))),
        "closed with 1001 after two silent heartbeats"
    );
}

#[tokio::test]
async fn socket_chats_share_the_edges_places_and_a_revoked_key_closes_its_socket() {
    // One chat in flight per edge, and replies that stream for two seconds.
    let mut env = sim_speed(20.0);
    env.push((
        "SLUICE_ORCHESTRATOR__SIM__REPLY_TOKENS".to_owned(),
        "40".to_owned(),
    ));
    env.push(("SLUICE_EDGE__MAX_IN_FLIGHT".to_owned(), "1".to_owned()));
    let sluice = Sluice::start_with(&unique("t"), env);
    let tenant = create_tenant(&sluice.prefix);
    let mut ws = Ws::open(&sluice.url, &tenant.key).await;
    ws.chat("first", "a long one", 40).await;
    assert_eq!(ws.frame().await["type"], "started");
    ws.chat("second", "and another", 40).await;
    let shed = loop {
        let frame = ws.frame().await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(shed["ref"], "second");
    assert_eq!(shed["error"]["code"], "service_unavailable", "{shed}");

    // The key is revoked while the socket is open: its next request ends the socket.
    sluice.cli(&["key", "revoke", &tenant.key]);
    let mut refused = None;
    for _ in 0..50 {
        ws.chat("after", "am I still welcome", 2).await;
        let frame = loop {
            let frame = match ws.event().await {
                Event::Frame(frame) => frame,
                Event::Closed(code) => panic!("closed before the error frame: {code:?}"),
            };
            if frame["ref"] == "after" || frame["type"] == "started" {
                break frame;
            }
        };
        if frame["type"] == "error" && frame["error"]["type"] == "authentication_error" {
            refused = Some(frame);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused.is_some(),
        "the revoked key was refused on the open socket"
    );
    let code = loop {
        if let Event::Closed(code) = ws.event().await {
            break code;
        }
    };
    assert_eq!(code, Some(4401));
}

#[tokio::test]
async fn a_socket_chat_keeps_its_sessions_memory() {
    use sluice_schemas::{tokens::count_prompt, ChatMessage};
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let mut ws = Ws::open(&sluice.url, &tenant.key).await;
    let session = unique("socket-session-");
    // One remembered turn over the socket: its reply, whole, and its last frame.
    let mut ask = async |content: &str| -> (String, Value) {
        ws.send(json!({
            "type": "chat", "ref": content, "memory": true,
            "request": {"model": "sim-small", "max_tokens": 4, "user": session,
                        "messages": [{"role": "user", "content": content}]},
        }))
        .await;
        let mut received = Received::default();
        loop {
            let frame = ws.frame().await;
            match frame["type"].as_str().unwrap() {
                "started" => {}
                "delta" | "done" => received.take(&frame),
                other => panic!("unexpected frame {other}: {frame}"),
            }
            if let Some(done) = received.done.take() {
                return (received.text, done);
            }
        }
    };
    let (first_reply, _) = ask("My name is Ada.").await;
    let (_, done) = ask("What is my name?").await;
    let seen = [
        ChatMessage::text("user", "My name is Ada."),
        ChatMessage::text("assistant", first_reply),
        ChatMessage::text("user", "What is my name?"),
    ];
    assert_eq!(
        done["usage"]["prompt_tokens"],
        count_prompt(&seen, &[]) as i64,
        "the second turn saw the first"
    );
}

#[tokio::test]
async fn a_socket_runs_a_workflow_like_a_chat() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let mut ws = Ws::open(&sluice.url, &tenant.key).await;
    ws.send(json!({
        "type": "chat", "ref": "track",
        "request": {"model": "workflow/track_order", "inputs": {"order_id": "Z-9"},
                    "messages": [{"role": "user", "content": "Where is my order?"}]},
    }))
    .await;
    let mut received = Received::default();
    let done = loop {
        let frame = ws.frame().await;
        match frame["type"].as_str().unwrap() {
            "started" => {}
            "delta" | "done" => received.take(&frame),
            other => panic!("unexpected frame {other}: {frame}"),
        }
        if let Some(done) = received.done.take() {
            break done;
        }
    };
    assert_eq!(received.text, crate::workflow_runs::UNKNOWN_ORDER_REPLY);
    assert_eq!(done["finish_reason"], "stop", "{done}");
}
