//! Read APIs: `GET /v1/models`, `GET /v1/usage` (the caller's usage from ClickHouse) and
//! `GET /v1/me` (the caller's tenant, read through row-level security).

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_stores::{clickhouse::usage as usage_facts, postgres::tenants, AUTO_MODEL};

use crate::{
    auth::{Caller, TenantId},
    error::ApiError,
    EdgeState,
};

/// `GET /v1/models`: `auto` plus every enabled model.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("bearer" = [])),
    responses((status = 200, description = "`auto` and every enabled model, as OpenAI lists models", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody)))]
pub async fn models(State(state): State<Arc<EdgeState>>, _tenant: TenantId) -> Json<Value> {
    let mut data = vec![json!({
        "id": AUTO_MODEL, "object": "model", "created": 0, "owned_by": "sluice",
        "description": "Sluice's router picks the cheapest model that fits the request.",
    })];
    for m in state.catalog.snapshot().iter() {
        data.push(json!({
            "id": m.name, "object": "model", "created": m.created_at, "owned_by": m.provider,
            "context_window": m.context_window,
        }));
    }
    Json(json!({ "object": "list", "data": data }))
}

/// Query of `GET /v1/usage`: a time range in Unix seconds.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UsageQuery {
    /// Start (inclusive); default: 30 days ago.
    pub start_time: Option<u32>,
    /// End (exclusive); default: one minute from now.
    pub end_time: Option<u32>,
}

/// `GET /v1/usage`: the caller's tokens and requests per model.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", security(("bearer" = [])), params(UsageQuery),
    responses((status = 200, description = "The caller's requests and tokens per model in the range", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 503, description = "A store or the broker is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn usage(
    State(state): State<Arc<EdgeState>>,
    tenant: TenantId,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let now = u32::try_from(sluice_pipelines::now_ms() / 1000).unwrap_or(u32::MAX);
    let start = query.start_time.unwrap_or(now.saturating_sub(30 * 86_400));
    let end = query.end_time.unwrap_or(now.saturating_add(60));
    if start >= end {
        return Err(
            ApiError::invalid("start_time must be before end_time.").with_param("start_time")
        );
    }
    let rows = usage_facts::usage_by_model(&state.clickhouse, &tenant.0.to_string(), start, end)
        .await
        .map_err(|e| ApiError::unavailable(format!("Usage is unavailable right now: {e}")))?;
    let (mut requests, mut input, mut output) = (0u64, 0u64, 0u64);
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            requests += r.requests;
            input += r.input_tokens;
            output += r.output_tokens;
            json!({
                "model": r.model, "requests": r.requests,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "tenant_id": tenant.0,
        "start_time": start,
        "end_time": end,
        "data": data,
        "totals": { "requests": requests, "input_tokens": input, "output_tokens": output },
    })))
}

/// `GET /v1/me`: the calling tenant, its plan and the calling key's own limits.
#[utoipa::path(get, path = "/v1/me", tag = "usage", security(("bearer" = [])),
    responses((status = 200, description = "The caller's tenant, its plan and limits, and the calling key's own limits", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn me(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let found = tenants::current_tenant(&state.app_pool, caller.tenant.0)
        .await
        .map_err(|e| ApiError::internal("tenant lookup failed", e))?;
    let plan = caller
        .grant
        .plan
        .as_ref()
        .map(|(name, limits)| json!({ "name": name, "limits": limits }));
    match found {
        Some(t) => Ok(Json(json!({
            "id": t.id, "name": t.name, "status": t.status,
            "plan": plan,
            "key": { "id": caller.grant.key_id, "limits": caller.grant.key },
        }))),
        None => Err(ApiError::unauthorized(
            "The tenant of this key no longer exists.",
        )),
    }
}
