//! CORS with a per-tenant origin list.
//!
//! Each tenant lists the browser origins its keys and tokens may be used from
//! (`PUT /v1/tenant/origins`, `sluice tenant origins`). A preflight carries no credentials, so
//! it is answered for any origin some tenant lists; the request itself is then served only if
//! the caller's own tenant lists its `Origin` ([`check_origin`], applied wherever a caller is
//! resolved, WebSockets included) — a key used from another tenant's web app gets 403.
//! Requests without an `Origin` header (servers, SDKs, the CLI) are not affected.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use uuid::Uuid;

use crate::{error::ApiError, EdgeState};

/// Methods the API answers to, as a preflight lists them.
const METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
/// Request headers a browser may send when its preflight names none. A preflight that names
/// some (SDKs send their own, `x-stainless-*` say) gets them back: credentials are bearer
/// tokens, never cookies, so no header is dangerous to allow.
const ALLOWED_HEADERS: &str =
    "authorization, content-type, x-session-id, traceparent, x-sluice-tenant";
/// Response headers a browser app may read.
const EXPOSED_HEADERS: &str = "x-request-id, retry-after, x-ratelimit-limit-requests, \
    x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, \
    x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";
/// Seconds a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The request's `Origin`, if it has one.
pub fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// Refuses a request from a browser origin that `tenant` does not list.
pub fn check_origin(state: &EdgeState, origin: Option<&str>, tenant: Uuid) -> Result<(), ApiError> {
    match origin {
        Some(origin) if !state.origins.get().allows(tenant, origin) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "Your organization does not allow requests from {origin}; its admins list origins at PUT /v1/tenant/origins."
            ),
        )),
        _ => Ok(()),
    }
}

/// The middleware: answers preflights, and adds the CORS headers to responses for origins
/// some tenant lists (whether this caller may use it was checked with the caller).
pub async fn cors(State(state): State<Arc<EdgeState>>, request: Request, next: Next) -> Response {
    let Some(origin) = origin(request.headers()).map(str::to_owned) else {
        return next.run(request).await;
    };
    let listed = state.origins.get().listed_by_any(&origin);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !listed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("No organization allows requests from {origin}."),
            )
            .into_response();
        }
        let asked = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(ALLOWED_HEADERS));
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        allow(headers, &origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
        return response;
    }
    let mut response = next.run(request).await;
    if listed {
        let headers = response.headers_mut();
        allow(headers, &origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
    }
    response
}

fn allow(headers: &mut HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}
