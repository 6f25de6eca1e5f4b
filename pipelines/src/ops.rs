//! The endpoints every long-running service serves: `/metrics`, `/healthz` (the process is
//! alive) and `/readyz` (every component it needs has said it is ready).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde_json::json;

use crate::metrics::Metrics;

/// Readiness of the parts of a process; `/readyz` is green once all are ready.
#[derive(Clone, Default)]
pub struct Readiness {
    parts: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Declares a part that is not ready yet.
    pub fn register(&self, part: &str) {
        if let Ok(mut parts) = self.parts.lock() {
            parts.entry(part.to_owned()).or_insert(false);
        }
    }

    /// Marks a part ready (or not).
    pub fn set(&self, part: &str, ready: bool) {
        if let Ok(mut parts) = self.parts.lock() {
            parts.insert(part.to_owned(), ready);
        }
    }

    /// Whether every declared part is ready, and the state of each.
    pub fn snapshot(&self) -> (bool, BTreeMap<String, bool>) {
        let parts = self.parts.lock().map(|p| p.clone()).unwrap_or_default();
        (!parts.is_empty() && parts.values().all(|r| *r), parts)
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// Routes for `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .with_state(OpsState { metrics, readiness })
}

async fn render_metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    let (ready, parts) = state.readiness.snapshot();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready, "parts": parts })))
}

/// Serves `app` on `listener` with `TCP_NODELAY` on every accepted socket (without it Nagle's
/// algorithm delays keep-alive responses by tens of milliseconds), until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // Handlers may read the peer's address (`ConnectInfo<SocketAddr>`), e.g. for the audit log.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}
