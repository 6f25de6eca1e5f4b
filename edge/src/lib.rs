//! The edge: Sluice's HTTP face.
//!
//! - `POST /v1/chat/completions` — OpenAI's chat API, plain or SSE ([`chat`]; the wire shapes
//!   and their validation in [`openai`], the streaming in [`stream`]).
//! - `GET /v1/chat/stream` — the same replies over a WebSocket ([`ws`]), resumable on any edge
//!   ([`resume`]).
//! - `GET /v1/models`, `GET /v1/usage`, `GET /v1/me` — read APIs ([`usage`]).
//! - `/v1/auth/*`, `/v1/keys`, `/v1/members`, `/v1/audit`, `/v1/tenant` — users' sessions and a tenant's
//!   administration ([`control`], the tokens in [`sessions`]); browser origins per tenant ([`cors`]).
//! - `/v1/admin/*` — the platform admin's plans and tenants ([`platform`]).
//! - `GET /openapi.json` — the API's OpenAPI document, generated from the handlers ([`api_doc`]).
//! - Authentication by API key or a user's access token, cached and forgotten as soon as a key
//!   changes ([`auth`]), and rate limits and quotas shared by every edge replica ([`limits`]).
//! - `/healthz`, `/readyz`, `/metrics`.
//! - The schema registry's Confluent-compatible REST API, on its own listener ([`registry`]).
//!
//! The edge talks to the rest of Sluice only through topics and stores: it writes each request
//! to `sluice.requests` and reads its replies from the replies partition it owns ([`replies`]).
//! Errors are answered in OpenAI's error shape from one place ([`error`]).

pub mod analytics;
pub mod api_doc;
pub mod auth;
pub mod budgets;
pub mod chat;
pub mod control;
pub mod cors;
pub mod documents;
pub mod error;
pub mod invoices;
pub mod limits;
pub mod memory;
pub mod notify;
pub mod openai;
pub mod platform;
pub mod registry;
pub mod replies;
pub mod resume;
pub mod runs;
pub mod sessions;
pub mod stream;
pub mod usage;
pub mod webhooks;
pub mod ws;

pub use error::{Error, Result};

#[cfg(test)]
mod test_support {
    use sluice_schemas::{ChatRequest, ReplyAddress};

    /// A streaming request with no messages, replying to partition 0 of topic `r`.
    pub fn request(request_id: &str) -> ChatRequest {
        ChatRequest {
            request_id: request_id.to_owned(),
            tenant_id: "t".into(),
            session_id: "s".into(),
            model: "auto".into(),
            messages: vec![],
            max_tokens: None,
            temperature: None,
            stream: true,
            reply_to: ReplyAddress {
                topic: "r".into(),
                partition: 0,
            },
            received_at_ms: 0,
            allowed_models: None,
            key_id: None,
            user_id: None,
            ..Default::default()
        }
    }
}

use std::{sync::Arc, time::Duration, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use serde::{Deserialize, Serialize};
use sluice_pipelines::{
    kafka::{self, ProducerProfile},
    metrics::Metrics,
    ops::{self, Readiness},
    runtime::DeadLetters,
    KafkaConfig, Topics,
};
use sluice_schemas::Codec;
use sluice_stores::{ClickHouse, ClickHouseConfig, ModelCatalog};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{auth::AuthCache, error::ApiError, replies::ReplyRouter};

/// Edge settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Largest request body accepted (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// Seconds to wait for a model's next reply chunk before answering 504.
    pub reply_timeout_secs: u64,
    /// Seconds a successful API-key lookup is cached.
    pub auth_cache_secs: u64,
    /// Chat requests (whole or streaming, until their last byte) this instance serves at once;
    /// beyond it a request is answered 503 with `Retry-After` at once, so an overloaded edge
    /// sheds instead of queueing callers into seconds of latency.
    pub max_in_flight: usize,
    /// Rate limits and quotas.
    pub limits: limits::LimitsConfig,
    /// The plan a self-registered tenant is subscribed to (it must exist); none: no limits.
    /// The feature flag `registration` (on unless set) opens and closes self-registration.
    pub registration_plan: Option<String>,
    /// Seconds a user's access token is valid (a logout ends its session's refresh tokens at
    /// once; access tokens already issued last until they expire).
    pub access_token_secs: u64,
    /// Days a refresh token is valid if not used.
    pub refresh_token_days: u64,
    /// Seconds a stopping edge lets its streams finish; then its WebSockets are closed with
    /// 1012, and their clients resume on another edge.
    pub drain_secs: u64,
    /// Chat over a WebSocket.
    pub websocket: ws::WebSocketConfig,
    /// Conversation memory.
    pub memory: memory::MemoryConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
            reply_timeout_secs: 120,
            auth_cache_secs: 30,
            max_in_flight: 2048,
            limits: limits::LimitsConfig::default(),
            registration_plan: None,
            access_token_secs: 900,
            refresh_token_days: 30,
            drain_secs: 30,
            websocket: ws::WebSocketConfig::default(),
            memory: memory::MemoryConfig::default(),
        }
    }
}

impl EdgeConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "edge.listen {:?} is not a socket address",
                self.listen
            ));
        }
        if self.max_body_bytes < 1024 {
            problems.push("edge.max_body_bytes must be at least 1024".to_owned());
        }
        if self.max_in_flight == 0 {
            problems.push("edge.max_in_flight must be at least 1".to_owned());
        }
        if self.reply_timeout_secs == 0 {
            problems.push("edge.reply_timeout_secs must be at least 1".to_owned());
        }
        if !(10..=86_400).contains(&self.access_token_secs) {
            problems.push("edge.access_token_secs must be from 10 to 86400".to_owned());
        }
        if !(1..=365).contains(&self.refresh_token_days) {
            problems.push("edge.refresh_token_days must be from 1 to 365".to_owned());
        }
        if self.limits.assumed_output_tokens == 0 {
            problems.push("edge.limits.assumed_output_tokens must be at least 1".to_owned());
        }
        problems.extend(self.websocket.validate());
        problems
    }
}

/// Everything a request handler needs.
pub struct EdgeState {
    pub config: EdgeConfig,
    pub app_pool: PgPool,
    pub catalog: Arc<ModelCatalog>,
    pub producer: kafka::Producer,
    pub codec: Arc<Codec>,
    pub topics: Topics,
    pub replies: Arc<ReplyRouter>,
    pub metrics: Arc<Metrics>,
    pub clickhouse: ClickHouse,
    pub auth: Arc<AuthCache>,
    pub limits: Arc<limits::EdgeLimits>,
    /// Signs and checks users' access tokens.
    pub tokens: sessions::TokenKeys,
    /// Feature flags, kept current.
    pub flags: Arc<sluice_stores::postgres::flags::Flags>,
    /// Every tenant's CORS origins, kept current.
    pub origins: Arc<sluice_stores::postgres::origins::Origins>,
    /// Places for password hashing (slow on purpose), one per core: beyond them, login and
    /// registration answer 503 rather than queue unbounded work.
    pub password_work: Arc<tokio::sync::Semaphore>,
    /// Places for chat requests in flight (`edge.max_in_flight`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The broker settings (a resumed stream reads the replies topic with a consumer of its own).
    pub kafka: KafkaConfig,
    /// Partitions of the replies topic.
    pub replies_partitions: i32,
    /// Fires when the edge begins to stop: WebSockets take no new requests.
    pub draining: CancellationToken,
    /// Fires `edge.drain_secs` later: WebSockets still streaming are closed (resumably).
    pub closing: CancellationToken,
    /// The open WebSocket sessions, waited for when the edge stops.
    pub ws_sessions: tokio_util::task::TaskTracker,
    /// Signs and checks WebSocket stream ids.
    pub stream_ids: resume::StreamSigner,
    /// Places for streams read back for resuming clients (`edge.websocket.max_resumes`).
    pub resumes: Arc<tokio::sync::Semaphore>,
}

/// What the edge is built from.
pub struct EdgeDeps {
    pub kafka: KafkaConfig,
    /// The process's producers; requests leave through the latency one.
    pub producers: kafka::Producers,
    pub clickhouse: ClickHouseConfig,
    pub app_pool: PgPool,
    pub catalog: Arc<ModelCatalog>,
    pub codec: Arc<Codec>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// The limits' shared counters.
    pub limiter: sluice_stores::limits::Limiter,
}

/// Runs the edge on `listener` until `cancel` fires: claims a replies partition, starts the
/// reply dispatcher, serves HTTP, and on shutdown stops accepting before the dispatcher stops.
pub async fn run(
    config: EdgeConfig,
    deps: EdgeDeps,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> Result<()> {
    deps.readiness.register("edge");
    let topics = deps.kafka.topics();
    let consumer = kafka::assigned_consumer(&deps.kafka, kafka::FETCH_WAIT_MS)?;
    let partitions = kafka::partition_count(&consumer, &topics.replies)?;
    let (partition, claim) =
        replies::claim_partition(&deps.app_pool, &topics.replies, partitions).await?;
    let router = ReplyRouter::new(&topics.replies, partition, deps.metrics.clone());
    replies::assign_at_end(&consumer, &router)?;
    tracing::info!(topic = %topics.replies, partition, "edge owns its replies partition");

    let producer = deps.producers.get(ProducerProfile::Latency).clone();
    let dead_letters = DeadLetters::new(
        producer.clone(),
        deps.codec.clone(),
        &topics.dlq,
        "edge",
        deps.metrics.clone(),
    );
    let dispatcher_cancel = CancellationToken::new();
    let dispatcher = tokio::spawn(replies::run_dispatcher(
        router.clone(),
        consumer,
        deps.codec.clone(),
        dead_letters,
        dispatcher_cancel.clone(),
    ));

    let auth = Arc::new(AuthCache::new(Duration::from_secs(config.auth_cache_secs)));
    let auth_listener = tokio::spawn(auth::forget_changes(
        deps.app_pool.clone(),
        auth.clone(),
        deps.metrics.auth_changes.clone(),
        dispatcher_cancel.clone(),
    ));
    let clickhouse = ClickHouse::new(&deps.clickhouse);
    let prices = sluice_stores::billing::prices::Prices::load(&deps.app_pool).await?;
    let prices_follower = tokio::spawn(
        prices
            .clone()
            .follow(deps.app_pool.clone(), dispatcher_cancel.clone()),
    );
    let limits = Arc::new(limits::EdgeLimits::new(
        deps.limiter,
        clickhouse.clone(),
        prices,
        config.limits.clone(),
        // A request outlives its reply timeout only if its edge died without settling it.
        Duration::from_secs(config.reply_timeout_secs.saturating_add(30)),
        (
            &deps.metrics,
            Arc::new(notify::Notifier::new(
                deps.producers.get(ProducerProfile::Throughput).clone(),
                deps.codec.clone(),
                &topics.notifications,
                deps.metrics.notifications.clone(),
            )),
        ),
    ));
    let signing_keys = sluice_stores::postgres::users::signing_keys(&deps.app_pool).await?;
    let tokens =
        sessions::TokenKeys::new(&signing_keys, Duration::from_secs(config.access_token_secs))?;
    let flags = sluice_stores::postgres::flags::Flags::load(&deps.app_pool).await?;
    let flags_follower = tokio::spawn(
        flags
            .clone()
            .follow(deps.app_pool.clone(), dispatcher_cancel.clone()),
    );
    let origins = sluice_stores::postgres::origins::Origins::load(&deps.app_pool).await?;
    let origins_follower = tokio::spawn(
        origins
            .clone()
            .follow(deps.app_pool.clone(), dispatcher_cancel.clone()),
    );
    // Built before serving, so the first unknown email at login costs what the others do.
    tokio::task::spawn_blocking(control::dummy_hash)
        .await
        .map_err(|e| {
            Error::Store(sluice_stores::Error::Corrupt(format!(
                "password hashing: {e}"
            )))
        })?;
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let state = Arc::new(EdgeState {
        auth,
        limits,
        tokens,
        flags,
        origins,
        password_work: Arc::new(tokio::sync::Semaphore::new(cores)),
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
        kafka: deps.kafka.clone(),
        replies_partitions: partitions,
        draining: CancellationToken::new(),
        closing: CancellationToken::new(),
        ws_sessions: tokio_util::task::TaskTracker::new(),
        stream_ids: resume::StreamSigner::new(
            signing_keys.iter().map(|(_, secret)| secret.as_slice()),
        ),
        resumes: Arc::new(tokio::sync::Semaphore::new(config.websocket.max_resumes)),
        config,
        app_pool: deps.app_pool,
        catalog: deps.catalog,
        producer,
        codec: deps.codec,
        topics,
        replies: router,
        metrics: deps.metrics.clone(),
        clickhouse,
    });
    let app = app(state.clone(), deps.metrics, deps.readiness.clone());
    deps.readiness.set("edge", true);
    let serving = cancel.child_token();
    let lost = CancellationToken::new();
    let watcher = tokio::spawn(watch_claim(claim, serving.clone(), lost.clone()));
    let drain = tokio::spawn(drain_when_stopping(state.clone(), serving.clone()));
    let served = ops::serve(listener, app, serving.clone()).await;
    deps.readiness.set("edge", false);
    serving.cancel();
    // WebSockets outlive the HTTP server's graceful shutdown: wait for them (they close by
    // the drain deadline), while replies still reach them.
    state.ws_sessions.close();
    let drain_limit = Duration::from_secs(state.config.drain_secs.saturating_add(5));
    if tokio::time::timeout(drain_limit, state.ws_sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = state.ws_sessions.len(),
            "WebSocket sessions did not close in time"
        );
    }
    drop(drain.await);
    dispatcher_cancel.cancel();
    if let Err(e) = dispatcher.await {
        tracing::error!(error = %e, "reply dispatcher failed");
    }
    state.limits.flush().await;
    if let Err(e) = auth_listener.await {
        tracing::error!(error = %e, "the key-change listener failed");
    }
    if let Err(e) = flags_follower.await {
        tracing::error!(error = %e, "the feature-flag follower failed");
    }
    if let Err(e) = origins_follower.await {
        tracing::error!(error = %e, "the CORS origins follower failed");
    }
    if let Err(e) = prices_follower.await {
        tracing::error!(error = %e, "the price book follower failed");
    }
    drop(watcher.await);
    if lost.is_cancelled() {
        return Err(Error::LostRepliesClaim { partition });
    }
    served.map_err(Error::Serve)
}

/// When `serving` ends, tells WebSocket sessions to drain, and `edge.drain_secs` later to close.
async fn drain_when_stopping(state: Arc<EdgeState>, serving: CancellationToken) {
    serving.cancelled().await;
    state.draining.cancel();
    let deadline = Duration::from_secs(state.config.drain_secs);
    tokio::select! {
        _ = tokio::time::sleep(deadline) => {}
        _ = state.ws_sessions.wait() => {}
    }
    state.closing.cancel();
}

/// How often the edge checks that it still holds its replies partition.
const CLAIM_CHECK: Duration = Duration::from_secs(1);

/// Checks the claim every [`CLAIM_CHECK`] until `serving` ends; if the claim is lost, fires
/// `lost` and stops serving. Returns the claim, to be let go when the edge has stopped.
async fn watch_claim(
    mut claim: sluice_stores::postgres::claims::Claim,
    serving: CancellationToken,
    lost: CancellationToken,
) -> sluice_stores::postgres::claims::Claim {
    loop {
        tokio::select! {
            _ = serving.cancelled() => return claim,
            _ = tokio::time::sleep(CLAIM_CHECK) => {}
        }
        if !claim.still_held().await {
            tracing::error!("the edge lost its replies partition's claim (its PostgreSQL connection dropped); it stops serving");
            lost.cancel();
            serving.cancel();
            return claim;
        }
    }
}

/// The API's routes, each documented in [`api_doc`] (a test holds the two together).
pub const API_ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/chat/stream",
    "/v1/models",
    "/v1/usage",
    "/v1/me",
    "/v1/sessions/{session}/memory",
    "/v1/documents",
    "/v1/documents/search",
    "/v1/documents/{id}",
    "/v1/workflows/runs/{run}",
    "/v1/workflows/runs/{run}/events",
    "/v1/auth/register",
    "/v1/auth/login",
    "/v1/auth/refresh",
    "/v1/auth/logout",
    "/v1/keys",
    "/v1/keys/{id}/revoke",
    "/v1/keys/{id}/rotate",
    "/v1/members",
    "/v1/audit",
    "/v1/tenant",
    "/v1/tenant/export",
    "/v1/tenant/origins",
    "/v1/admin/plans",
    "/v1/admin/plans/{name}",
    "/v1/admin/tenants",
    "/v1/admin/tenants/{id}/plan",
    "/v1/invoices",
    "/v1/invoices/preview",
    "/v1/invoices/export",
    "/v1/invoices/usage",
    "/v1/invoices/{invoice}",
    "/v1/analytics/models",
    "/v1/budgets",
    "/v1/budgets/tenant",
    "/v1/budgets/keys/{id}",
    "/v1/webhooks",
    "/v1/webhooks/deliveries",
    "/v1/webhooks/{id}",
    "/v1/webhooks/{id}/rotate-secret",
];

/// The edge's routes.
pub fn app(state: Arc<EdgeState>, metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    let api = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat::completions).layer(middleware::from_fn_with_state(state.clone(), admit)),
        )
        .route("/v1/chat/stream", get(ws::upgrade))
        .route("/v1/models", get(usage::models))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/me", get(usage::me))
        .route(
            "/v1/sessions/{session}/memory",
            axum::routing::delete(memory::forget),
        )
        .route("/v1/documents", get(documents::list))
        .route("/v1/documents/search", get(documents::search))
        .route(
            "/v1/documents/{id}",
            axum::routing::put(documents::put).delete(documents::delete),
        )
        .route("/v1/workflows/runs/{run}", get(runs::show))
        .route("/v1/workflows/runs/{run}/events", post(runs::signal))
        .route("/v1/auth/register", post(control::register))
        .route("/v1/auth/login", post(control::login))
        .route("/v1/auth/refresh", post(control::refresh))
        .route("/v1/auth/logout", post(control::logout))
        .route(
            "/v1/keys",
            get(control::list_keys).post(control::create_key),
        )
        .route("/v1/keys/{id}/revoke", post(control::revoke_key))
        .route("/v1/keys/{id}/rotate", post(control::rotate_key))
        .route(
            "/v1/members",
            get(control::list_members).post(control::add_member),
        )
        .route("/v1/audit", get(control::audit_log))
        .route("/v1/tenant", axum::routing::delete(control::delete_tenant))
        .route("/v1/tenant/export", get(control::export_tenant))
        .route(
            "/v1/tenant/origins",
            get(control::list_origins).put(control::set_origins),
        )
        .route(
            "/v1/admin/plans",
            get(platform::list_plans).post(platform::create_plan),
        )
        .route(
            "/v1/admin/plans/{name}",
            axum::routing::patch(platform::update_plan).delete(platform::delete_plan),
        )
        .route(
            "/v1/admin/tenants",
            get(platform::list_tenants).post(platform::create_tenant),
        )
        .route(
            "/v1/admin/tenants/{id}/plan",
            axum::routing::put(platform::set_tenant_plan),
        )
        .route("/v1/analytics/models", get(analytics::models))
        .route("/v1/budgets", get(budgets::list))
        .route(
            "/v1/budgets/tenant",
            axum::routing::put(budgets::set_tenant).delete(budgets::remove_tenant),
        )
        .route(
            "/v1/budgets/keys/{id}",
            axum::routing::put(budgets::set_key).delete(budgets::remove_key),
        )
        .route("/v1/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/v1/webhooks/deliveries", get(webhooks::deliveries))
        .route(
            "/v1/webhooks/{id}",
            axum::routing::patch(webhooks::update).delete(webhooks::remove),
        )
        .route(
            "/v1/webhooks/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route("/v1/invoices", get(invoices::list))
        .route("/v1/invoices/preview", get(invoices::preview))
        .route("/v1/invoices/export", get(invoices::export))
        .route("/v1/invoices/usage", get(invoices::usage))
        .route("/v1/invoices/{invoice}", get(invoices::show))
        .route("/openapi.json", get(api_doc::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors))
        .with_state(state.clone());
    api.merge(ops::router(metrics, readiness))
        .layer(middleware::from_fn_with_state(state, record_http))
}

/// Admits a chat request while fewer than `edge.max_in_flight` are in flight, holding its place
/// until the response's last byte is sent (a stream holds it for as long as it streams);
/// otherwise answers 503 with `Retry-After: 1` at once.
async fn admit(State(state): State<Arc<EdgeState>>, request: Request, next: Next) -> Response {
    use futures::StreamExt;
    let Ok(place) = state.in_flight.clone().try_acquire_owned() else {
        state.metrics.edge_shed.inc();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Sluice is serving as many requests as it can; retry shortly.",
        )
        .retry_after(1)
        .into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    let body = axum::body::Body::from_stream(body.into_data_stream().map(move |bytes| {
        let _held = &place;
        bytes
    }));
    Response::from_parts(parts, body)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_url", "Unknown request URL.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This method is not allowed on this URL.",
    )
}

async fn record_http(
    State(state): State<Arc<EdgeState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &state.metrics;
    m.http_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response.into_response()
}
