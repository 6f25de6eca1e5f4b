//! `GET /v1/analytics/models`: a tenant's requests, errors, tokens, cost, latency percentiles
//! and routing mix per model, over a range in buckets of a step, for its admins. The figures
//! come from the usage facts and the failed calls in ClickHouse (see
//! `sluice_stores::clickhouse::analytics`), a few seconds behind the requests.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    Json,
};
use serde::Deserialize;
use sluice_stores::{
    billing::PriceBook,
    clickhouse::analytics::{self, Report, Step},
};
use utoipa::IntoParams;

use crate::{control::TenantAdmin, error::ApiError, EdgeState};

/// The range and step.
#[derive(Debug, Deserialize, IntoParams)]
pub struct AnalyticsQuery {
    /// From (`YYYY-MM-DD` or RFC 3339; default: a day before `end`), aligned down to the step.
    start: Option<String>,
    /// To (default: now), aligned up to the step.
    end: Option<String>,
    /// `minute`, `hour` (default) or `day`; at most 1,500 buckets.
    step: Option<String>,
}

/// `GET /v1/analytics/models`.
#[utoipa::path(get, path = "/v1/analytics/models", tag = "billing", security(("bearer" = [])), params(AnalyticsQuery),
    responses((status = 200, description = "Buckets (oldest first) with each model's requests, errors, error_rate, share, tokens, cost (decimal string) and latency_ms p50/p95/p99; and each model over the range", body = Report), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 503, description = "A store is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn models(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<AnalyticsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Report>, ApiError> {
    let Query(query) = query?;
    let step = Step::parse(query.step.as_deref().unwrap_or("hour"))
        .map_err(|e| ApiError::invalid(e.to_string()).with_param("step"))?;
    let range = analytics::range(
        query.start.as_deref(),
        query.end.as_deref(),
        step,
        sluice_pipelines::now_ms(),
    )
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    let book: Arc<PriceBook> = state.limits.prices();
    let report = analytics::report(
        &state.clickhouse,
        &book,
        &admin.tenant.to_string(),
        range,
        step,
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "reading analytics failed");
        ApiError::unavailable("Analytics are unavailable right now; retry shortly.").retry_after(5)
    })?;
    Ok(Json(report))
}
