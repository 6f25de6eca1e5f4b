//! `/v1/webhooks…`: a tenant admin's webhook endpoints and their delivery log. Events are
//! delivered by the `webhooks` stage (see `sluice_webhooks`), never by the edge.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_stores::postgres::{
    tenant_transaction,
    webhooks::{self, Delivery, Endpoint, NewEndpoint},
};
use sqlx::types::Uuid;
use utoipa::{IntoParams, ToSchema};

use crate::{
    control::{in_tenant, parse, store_error, TenantAdmin},
    error::ApiError,
    EdgeState,
};

/// A new endpoint.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointForm {
    /// Where events are POSTed (`https://…`).
    url: String,
    /// The event types to send (`invoice.finalized`, `usage.threshold_reached`,
    /// `budget.exceeded`); left out: every type.
    events: Option<Vec<String>>,
    #[serde(default)]
    description: String,
}

/// A change to an endpoint.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointChange {
    /// Off: no new deliveries are made to it (those already made go on being retried).
    enabled: bool,
}

/// Query of the delivery log.
#[derive(Debug, Deserialize, IntoParams)]
pub struct DeliveryQuery {
    /// Only this endpoint's.
    endpoint: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// `GET /v1/webhooks`: the tenant's endpoints (never their secrets).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's endpoints", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<Value>, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing webhooks", e))?;
    let found: Vec<Endpoint> = webhooks::list(&mut tx, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing webhooks", e))?;
    Ok(Json(json!({ "object": "list", "data": found })))
}

/// `POST /v1/webhooks`: adds an endpoint; its signing secret is shown once.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])), request_body = EndpointForm,
    responses((status = 201, description = "The endpoint, with its `secret` (shown once)", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn create(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let form: EndpointForm = parse(&body)?;
    let new = NewEndpoint {
        url: form.url,
        events: form.events,
        description: form.description,
    };
    let problems = new.validate();
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems.join("; ")));
    }
    let tenant = admin.tenant;
    let (endpoint, secret) = in_tenant(&state, &admin, "webhook.create", |tx| {
        Box::pin(async move {
            let (endpoint, secret) = webhooks::create(tx, tenant, &new)
                .await
                .map_err(|e| store_error("adding a webhook", e))?;
            let detail =
                json!({ "url": without_secrets(&endpoint.url), "events": endpoint.events });
            Ok((
                (endpoint.clone(), secret),
                Some(endpoint.id.to_string()),
                detail,
            ))
        })
    })
    .await?;
    let mut body = json!(endpoint);
    body["secret"] = secret.into();
    Ok((StatusCode::CREATED, Json(body)))
}

/// `PATCH /v1/webhooks/{id}`: turns an endpoint on or off.
#[utoipa::path(patch, path = "/v1/webhooks/{id}", tag = "webhooks", security(("bearer" = [])), request_body = EndpointChange,
    params(("id" = Uuid, Path, description = "The endpoint's id")),
    responses((status = 200, description = "Changed", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No such endpoint of this tenant", body = crate::api_doc::ErrorBody)))]
pub async fn update(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(&id)?;
    let change: EndpointChange = parse(&body)?;
    let tenant = admin.tenant;
    let found = in_tenant(&state, &admin, "webhook.update", |tx| {
        Box::pin(async move {
            let found = webhooks::set_enabled(tx, tenant, id, change.enabled)
                .await
                .map_err(|e| store_error("changing a webhook", e))?;
            Ok((
                found,
                Some(id.to_string()),
                json!({ "enabled": change.enabled }),
            ))
        })
    })
    .await?;
    if !found {
        return Err(not_found());
    }
    Ok(Json(json!({ "id": id, "enabled": change.enabled })))
}

/// `DELETE /v1/webhooks/{id}`: removes an endpoint and its delivery log.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id")),
    responses((status = 200, description = "Removed", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No such endpoint of this tenant", body = crate::api_doc::ErrorBody)))]
pub async fn remove(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(&id)?;
    let tenant = admin.tenant;
    let found = in_tenant(&state, &admin, "webhook.remove", |tx| {
        Box::pin(async move {
            let found = webhooks::remove(tx, tenant, id)
                .await
                .map_err(|e| store_error("removing a webhook", e))?;
            Ok((found, Some(id.to_string()), json!({})))
        })
    })
    .await?;
    if !found {
        return Err(not_found());
    }
    Ok(Json(json!({ "id": id, "removed": true })))
}

/// `POST /v1/webhooks/{id}/rotate-secret`: a new signing secret (shown once); the old one
/// stops signing at once.
#[utoipa::path(post, path = "/v1/webhooks/{id}/rotate-secret", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The endpoint's id")),
    responses((status = 200, description = "The new `secret`", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No such endpoint of this tenant", body = crate::api_doc::ErrorBody)))]
pub async fn rotate_secret(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(&id)?;
    let tenant = admin.tenant;
    let secret = in_tenant(&state, &admin, "webhook.rotate_secret", |tx| {
        Box::pin(async move {
            let secret = webhooks::rotate_secret(tx, tenant, id)
                .await
                .map_err(|e| store_error("rotating a webhook secret", e))?;
            Ok((secret, Some(id.to_string()), json!({})))
        })
    })
    .await?
    .ok_or_else(not_found)?;
    Ok(Json(json!({ "id": id, "secret": secret })))
}

/// `GET /v1/webhooks/deliveries`: the delivery log, newest first.
#[utoipa::path(get, path = "/v1/webhooks/deliveries", tag = "webhooks", security(("bearer" = [])), params(DeliveryQuery),
    responses((status = 200, description = "Deliveries: `id` (the `Sluice-Delivery` header), `event_id`, `event_type`, `state` (`pending`, `delivered`, `failed`), `attempts`, `last_status`, `last_error`, times", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn deliveries(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let endpoint = query.endpoint.as_deref().map(endpoint_id).transpose()?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be from 1 to 1000.").with_param("limit"));
    }
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("reading webhook deliveries", e))?;
    let found: Vec<Delivery> = webhooks::deliveries(&mut tx, admin.tenant, endpoint, limit)
        .await
        .map_err(|e| ApiError::internal("reading webhook deliveries", e))?;
    Ok(Json(json!({ "object": "list", "data": found })))
}

/// `url` with no user, password or query (they may carry credentials): what the audit log
/// keeps.
fn without_secrets(url: &str) -> String {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return String::new();
    };
    let port = uri.port_u16().map_or_else(String::new, |p| format!(":{p}"));
    format!(
        "{}://{}{port}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.host().unwrap_or(""),
        uri.path()
    )
}

fn endpoint_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::invalid("The endpoint id is not a UUID.").with_param("id"))
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "There is no such webhook endpoint.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_log_keeps_no_credentials_of_a_url() {
        assert_eq!(
            without_secrets("https://user:pass@hooks.example.com:8443/in?token=s3cret"),
            "https://hooks.example.com:8443/in"
        );
        assert_eq!(
            without_secrets("http://hooks.example.com/in"),
            "http://hooks.example.com/in"
        );
    }
}
