//! `/v1/budgets…`: a tenant admin's monthly spend budgets — the tenant's own and any of its
//! keys' — with what has been spent against each this month. The edge enforces them on every
//! chat request ([`limits`](crate::limits)); a change reaches every edge within moments.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_stores::{
    billing::{
        budgets::{self, Budget, BudgetReport},
        money::parse_micros,
    },
    postgres::tenant_transaction,
};
use sqlx::types::Uuid;
use utoipa::ToSchema;

use crate::{
    control::{in_tenant, parse, store_error, TenantAdmin},
    error::ApiError,
    EdgeState,
};

/// A budget as set through the API.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetForm {
    /// The budget a month, a decimal in the billing currency (`"50.00"`; a number is taken
    /// too).
    #[schema(value_type = String)]
    monthly: Amount,
    /// The share of the budget (percent, 1–100) at which it alerts.
    alert_percent: Option<i64>,
}

/// A decimal amount, written as a string or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Amount {
    Text(String),
    Number(serde_json::Number),
}

impl BudgetForm {
    fn budget(&self) -> Result<Budget, ApiError> {
        let text = match &self.monthly {
            Amount::Text(text) => text.clone(),
            Amount::Number(number) => number.to_string(),
        };
        let micros = parse_micros(&text).map_err(|_| {
            ApiError::invalid(
                "`monthly` must be a decimal amount with at most six places, such as \"50.00\".",
            )
            .with_param("monthly")
        })?;
        Budget::new(micros, self.alert_percent)
            .map_err(|e| ApiError::invalid(e.to_string()).with_param("monthly"))
    }
}

/// `GET /v1/budgets`: the tenant's budgets and what was spent against each this month.
#[utoipa::path(get, path = "/v1/budgets", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "`currency`, `month` and `budgets` (the tenant's own has no `key_id`); amounts are decimal strings", body = BudgetReport), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 503, description = "A store is unavailable (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<BudgetReport>, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(unavailable)?;
    let report = budgets::report(
        &mut tx,
        &state.clickhouse,
        admin.tenant,
        sluice_pipelines::now_ms(),
    )
    .await
    .map_err(unavailable)?;
    Ok(Json(report))
}

/// `PUT /v1/budgets/tenant`: sets the tenant's own monthly spend budget.
#[utoipa::path(put, path = "/v1/budgets/tenant", tag = "billing", security(("bearer" = [])), request_body = BudgetForm,
    responses((status = 200, description = "The budget now in force", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn set_tenant(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    set(&state, &admin, None, &body).await
}

/// `PUT /v1/budgets/keys/{id}`: sets one key's own monthly spend budget.
#[utoipa::path(put, path = "/v1/budgets/keys/{id}", tag = "billing", security(("bearer" = [])), request_body = BudgetForm,
    params(("id" = Uuid, Path, description = "The key's id")),
    responses((status = 200, description = "The budget now in force", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No such key of this tenant", body = crate::api_doc::ErrorBody)))]
pub async fn set_key(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let key = key_id(&key)?;
    set(&state, &admin, Some(key), &body).await
}

/// `DELETE /v1/budgets/tenant`: removes the tenant's own budget.
#[utoipa::path(delete, path = "/v1/budgets/tenant", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Removed", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No budget to remove", body = crate::api_doc::ErrorBody)))]
pub async fn remove_tenant(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<Value>, ApiError> {
    remove(&state, &admin, None).await
}

/// `DELETE /v1/budgets/keys/{id}`: removes a key's own budget.
#[utoipa::path(delete, path = "/v1/budgets/keys/{id}", tag = "billing", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The key's id")),
    responses((status = 200, description = "Removed", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "No budget to remove", body = crate::api_doc::ErrorBody)))]
pub async fn remove_key(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = key_id(&key)?;
    remove(&state, &admin, Some(key)).await
}

async fn set(
    state: &EdgeState,
    admin: &TenantAdmin,
    key: Option<Uuid>,
    body: &[u8],
) -> Result<Json<Value>, ApiError> {
    let form: BudgetForm = parse(body)?;
    let budget = form.budget()?;
    let tenant = admin.tenant;
    in_tenant(state, admin, "budget.set", |tx| {
        Box::pin(async move {
            budgets::set(tx, tenant, key, budget)
                .await
                .map_err(|e| store_error("setting a budget", e))?;
            let detail = json!({ "key_id": key, "monthly_micros": budget.monthly_micros, "alert_percent": budget.alert_percent });
            Ok(((), key.map(|k| k.to_string()), detail))
        })
    })
    .await?;
    Ok(Json(json!({
        "key_id": key,
        "monthly": sluice_stores::billing::money::micros_text(
            i64::try_from(budget.monthly_micros).unwrap_or(i64::MAX)
        ),
        "alert_percent": budget.alert_percent,
    })))
}

async fn remove(
    state: &EdgeState,
    admin: &TenantAdmin,
    key: Option<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let tenant = admin.tenant;
    let removed = in_tenant(state, admin, "budget.remove", |tx| {
        Box::pin(async move {
            let removed = budgets::remove(tx, tenant, key)
                .await
                .map_err(|e| store_error("removing a budget", e))?;
            Ok((
                removed,
                key.map(|k| k.to_string()),
                json!({ "key_id": key }),
            ))
        })
    })
    .await?;
    if !removed {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            "There is no such budget.",
        ));
    }
    Ok(Json(json!({ "key_id": key, "removed": true })))
}

fn key_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::invalid("The key id is not a UUID.").with_param("id"))
}

fn unavailable(e: sluice_stores::Error) -> ApiError {
    tracing::warn!(error = %e, "reading budgets failed");
    ApiError::unavailable("Budgets are unavailable right now; retry shortly.").retry_after(5)
}
