//! `sluice bench websocket`: how many streaming WebSocket sessions one edge holds, and what each
//! costs in resident memory, against a bare WebSocket server on the same stack in the same run.
//!
//! 1. The limit: a bare axum WebSocket server (the edge's HTTP and WebSocket stack, the same
//!    buffer sizes, echoing frames and nothing else) starts as its own process; the sessions
//!    open against it, each exchanging one frame; its resident memory grows by so much per
//!    session.
//! 2. A full `sluice up` starts on fresh topics (`bench-ws-<id>.*`, deleted at the end), with a
//!    simulated model that streams slowly, and beside it a second edge (`sluice edge`): the one
//!    measured, holding nothing but these sessions.
//! 3. The sessions open against that edge and authenticate (its memory with idle sessions),
//!    then each starts one chat whose reply streams for the rest of the run (its memory with
//!    every session streaming), all read by the benchmark as they come.
//!
//! The last line is `sessions=<n> rss_mib=<edge, all sessions streaming>
//! per_session_kib=<its growth per session> ratio=<per session ÷ the bare server's>`.
//! Goal: 10,000 streaming sessions in under 1 GiB.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sluice_pipelines::now_ms;
use sluice_stores::postgres::{self, tenants};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_tungstenite::tungstenite::{
    client::IntoClientRequest, protocol::WebSocketConfig, Message,
};

use super::under_test::{free_port, rss_kib, SluiceUnderTest};
use crate::config::Config;

/// What to run.
#[derive(Debug, Clone)]
pub struct WebSocketOptions {
    /// Sessions to open.
    pub sessions: usize,
    /// Sessions opening at once.
    pub connecting: usize,
    /// Seconds every session streams before the memory is read.
    pub stream_seconds: u64,
}

/// The client side of the sessions: small buffers, as the servers use.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// The open sessions, each read by its own task until the benchmark ends.
struct Sessions {
    /// The sessions' tasks: dropping them closes the sessions.
    _tasks: JoinSet<()>,
    /// Frames read after the first answer.
    frames: Arc<AtomicU64>,
    /// Sessions that opened.
    open: usize,
    /// Sessions still open.
    live: Arc<AtomicUsize>,
    /// Sessions that have read a `delta` frame (their reply is streaming).
    streaming: Arc<AtomicUsize>,
}

/// Opens `n` sessions to `url`: each sends `hello` (when `key` is given, as a Bearer header,
/// and waits for the server's `hello`), then `first` and waits for one frame back; then its task
/// reads what comes until the end. Prints progress.
async fn open_sessions(
    url: &str,
    key: Option<&str>,
    first: Value,
    n: usize,
    connecting: usize,
    what: &str,
) -> anyhow::Result<Sessions> {
    let gate = Arc::new(Semaphore::new(connecting));
    let frames = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let streaming = Arc::new(AtomicUsize::new(0));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(connecting);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (url, key, first) = (url.to_owned(), key.map(str::to_owned), first.to_string());
        let (gate, frames, opened) = (gate.clone(), frames.clone(), opened_tx.clone());
        let (live, streaming) = (live.clone(), streaming.clone());
        tasks.spawn(async move {
            let connected = async {
                let _place = gate.acquire().await?;
                let mut request = url.into_client_request()?;
                if let Some(key) = &key {
                    request
                        .headers_mut()
                        .insert("authorization", format!("Bearer {key}").parse()?);
                }
                let (mut socket, _) = tokio_tungstenite::connect_async_with_config(
                    request,
                    Some(client_config()),
                    false,
                )
                .await?;
                if key.is_some() {
                    socket.next().await.context("no hello")??;
                }
                socket.send(Message::Text(first.into())).await?;
                socket.next().await.context("no first frame")??;
                anyhow::Ok(socket)
            }
            .await;
            let mut socket = match connected {
                Ok(socket) => {
                    let _ = opened.send(Ok(())).await;
                    socket
                }
                Err(e) => {
                    let _ = opened.send(Err(e)).await;
                    return;
                }
            };
            drop(opened);
            live.fetch_add(1, Ordering::Relaxed);
            let mut streamed = false;
            while let Some(Ok(message)) = socket.next().await {
                frames.fetch_add(1, Ordering::Relaxed);
                if !streamed {
                    if let Message::Text(text) = &message {
                        if text.contains("\"type\":\"delta\"") {
                            streamed = true;
                            streaming.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(opened_tx);
    let (mut open, mut failed, mut first_error) = (0, 0, None);
    let started = Instant::now();
    while let Some(result) = opened_rx.recv().await {
        match result {
            Ok(()) => open += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        let done = open + failed;
        if done % 1000 == 0 || done == n {
            eprintln!(
                "  {what}: {open} of {n} sessions open ({failed} failed), {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if done == n {
            break;
        }
    }
    if let Some(e) = first_error {
        eprintln!("  {what}: first failure: {e:#}");
    }
    Ok(Sessions {
        _tasks: tasks,
        frames,
        open,
        live,
        streaming,
    })
}

/// The process's resident memory once it has settled (two readings a second apart agree
/// within 1%), KiB.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut last = rss_kib(pid).context("reading the process's memory")?;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_kib(pid).context("reading the process's memory")?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// KiB per session of a growth from `before` to `after`.
fn per_session(before: u64, after: u64, sessions: usize) -> f64 {
    after.saturating_sub(before) as f64 / sessions.max(1) as f64
}

/// Runs the benchmark and prints its report, the summary line last.
pub async fn run(config: &Config, options: &WebSocketOptions) -> anyhow::Result<()> {
    let n = options.sessions;
    println!("sessions: {n}, opening {} at a time", options.connecting);

    // 1. The bare server.
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut bare = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "websocket-bare-server", "--listen", &listen])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the bare WebSocket server")?;
    let bare_pid = bare.id();
    let bare_result = async {
        let url = format!("ws://{listen}/");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the bare server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = settled_rss(bare_pid).await?;
        let sessions = open_sessions(
            &url,
            None,
            json!({"type": "ping"}),
            n,
            options.connecting,
            "bare server",
        )
        .await?;
        let after = settled_rss(bare_pid).await?;
        let open = sessions.open;
        drop(sessions);
        anyhow::Ok((before, after, open))
    }
    .await;
    let _ = bare.kill();
    let _ = bare.wait();
    let (bare_before, bare_after, bare_open) = bare_result?;
    let bare_per_session = per_session(bare_before, bare_after, bare_open);
    println!(
        "bare WebSocket server: {bare_open} sessions, {:.1} -> {:.1} MiB, {bare_per_session:.1} KiB per session",
        mib(bare_before),
        mib(bare_after)
    );

    // 2. Sluice, with a model that streams one token every five seconds.
    let id = format!("bench-ws-{}", now_ms());
    println!("topics: {id}.* (deleted when the run ended)");
    let mut sluice_config = config.clone();
    sluice_config.orchestrator.sim.first_token_ms = 0;
    sluice_config.orchestrator.sim.tokens_per_second = 0.2;
    sluice_config.edge.max_in_flight = n + 64;
    // Every session's model call runs at once (they stream for the whole run).
    sluice_config.stages.orchestrator_max_in_flight =
        sluice_config.stages.orchestrator_max_in_flight.max(n + 64);
    let outcome = measure_edge(&sluice_config, options, &id, bare_per_session).await;
    super::remove_topics(config, &id, &[]).await;
    outcome
}

async fn measure_edge(
    config: &Config,
    options: &WebSocketOptions,
    id: &str,
    bare_per_session: f64,
) -> anyhow::Result<()> {
    let n = options.sessions;
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let (_, api_key) = tenants::create_tenant(&admin, id).await?;
    eprintln!("starting sluice up on topics {id}.*, and a second edge ...");
    let sluice = SluiceUnderTest::start(config, id).await?;
    // Each phase on a fresh edge, so one's memory does not stay in the other's figures.
    let edge = sluice.start_edge().await?;
    let url = |edge: &super::under_test::SluiceProcess| {
        format!(
            "ws://{}/v1/chat/stream",
            edge.edge_url.trim_start_matches("http://")
        )
    };
    let before = settled_rss(edge.pid()).await?;
    // Sessions that authenticate and ping: idle sessions.
    let ping = json!({"type": "ping"});
    let idle = open_sessions(
        &url(&edge),
        Some(&api_key),
        ping,
        n,
        options.connecting,
        "idle",
    )
    .await?;
    let idle_rss = settled_rss(edge.pid()).await?;
    let idle_open = idle.open;
    println!(
        "edge, {idle_open} idle sessions (authenticated): {:.1} -> {:.1} MiB, {:.1} KiB per session",
        mib(before),
        mib(idle_rss),
        per_session(before, idle_rss, idle_open)
    );
    drop(idle);
    drop(edge);
    let edge = sluice.start_edge().await?;
    let before = settled_rss(edge.pid()).await?;
    // Sessions that each stream a reply for the rest of the run.
    let chat = json!({
        "type": "chat",
        "request": {"model": "sim-small", "max_tokens": 4096,
                    "messages": [{"role": "user", "content": "Tell a long story about streams."}]},
    });
    let streaming = open_sessions(
        &url(&edge),
        Some(&api_key),
        chat,
        n,
        options.connecting,
        "streaming",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(options.stream_seconds)).await;
    let frames = streaming.frames.load(Ordering::Relaxed);
    let streaming_rss = settled_rss(edge.pid()).await?;
    let (opened, live, streamed) = (
        streaming.open,
        streaming.live.load(Ordering::Relaxed),
        streaming.streaming.load(Ordering::Relaxed),
    );
    let per = per_session(before, streaming_rss, opened);
    println!(
        "edge, {opened} sessions each streaming a reply: {:.1} -> {:.1} MiB, {per:.1} KiB per session; after {} s {live} still open, {streamed} streaming (a delta read), {frames} frames read",
        mib(before),
        mib(streaming_rss),
        options.stream_seconds
    );
    println!("goal: 10000 streaming sessions under 1024 MiB on one edge");
    drop(streaming);
    drop(edge);
    drop(sluice);
    anyhow::ensure!(
        streamed > 0 && streamed == opened,
        "{streamed} of {opened} sessions were streaming (the logs are in the temp directory)"
    );
    println!(
        "sessions={streamed} rss_mib={:.0} per_session_kib={per:.1} ratio={:.2}",
        mib(streaming_rss),
        per / bare_per_session.max(0.1)
    );
    Ok(())
}

/// `sluice bench websocket-bare-server`: the limit the edge is measured against.
pub async fn bare_server(listen: &str) -> anyhow::Result<()> {
    use axum::{
        extract::ws::{Message, WebSocketUpgrade},
        routing::get,
        Router,
    };
    let app = Router::new().route(
        "/",
        get(|ws: WebSocketUpgrade| async move {
            ws.read_buffer_size(4096)
                .write_buffer_size(0)
                .on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        if let Message::Text(text) = message {
                            if socket.send(Message::Text(text)).await.is_err() {
                                return;
                            }
                        }
                    }
                })
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
