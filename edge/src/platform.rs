//! `/v1/admin/*`: the platform admin's API — plans and tenants, as `sluice plan` and
//! `sluice tenant` do them for operators. Only a user whose session says `platform_admin`, and
//! who still is one, gets in (a tenant admin, a member or an API key gets 403). Every change and its audit entry are
//! one transaction: a plan's with no tenant, a tenant's in that tenant's row-level security.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{FromRequestParts, Path, State},
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use sluice_stores::postgres::{
    audit::{self, Action},
    plans::{self, Limits, LimitsChange, Plan},
    tenant_transaction,
    tenants::{self, TenantSummary},
    users::Role,
};
use sqlx::types::Uuid;
use utoipa::ToSchema;

use crate::{
    control::{admin_session, list, parse, peer, store_error, List},
    error::ApiError,
    sessions::Claims,
    EdgeState,
};

/// A platform admin's session.
pub struct PlatformAdmin {
    claims: Claims,
    source: Option<String>,
}

impl PlatformAdmin {
    fn actor(&self) -> String {
        self.claims.actor()
    }
}

impl FromRequestParts<Arc<EdgeState>> for PlatformAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        const ONLY: &str = "Only a platform admin may do this.";
        let claims = admin_session(state, parts, ONLY).await?;
        if claims.role()? != Role::PlatformAdmin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_denied",
                ONLY,
            ));
        }
        Ok(Self {
            claims,
            source: peer(parts),
        })
    }
}

/// Runs `change` and records it in the audit log, in one transaction: the tenant's (under its
/// row-level security) when it concerns one, else the platform's. `change` answers its result,
/// the action's target and its detail.
async fn audited<T>(
    state: &EdgeState,
    admin: &PlatformAdmin,
    tenant: Option<Uuid>,
    action: &str,
    change: impl for<'c> FnOnce(
        &'c mut sqlx::PgConnection,
    ) -> BoxFuture<'c, Result<(T, String, Value), ApiError>>,
) -> Result<T, ApiError> {
    let failed = |e: &dyn std::fmt::Display| ApiError::internal(action, e);
    let mut tx = match tenant {
        Some(tenant) => tenant_transaction(&state.app_pool, tenant)
            .await
            .map_err(|e| failed(&e))?,
        None => state.app_pool.begin().await.map_err(|e| failed(&e))?,
    };
    let (out, target, detail) = change(&mut tx).await?;
    let actor = admin.actor();
    let entry = Action {
        tenant_id: tenant,
        actor: &actor,
        action,
        target: Some(&target),
        detail,
        source: admin.source.as_deref(),
    };
    audit::record(&mut tx, &entry)
        .await
        .map_err(|e| failed(&e))?;
    tx.commit().await.map_err(|e| failed(&e))?;
    Ok(out)
}

/// The platform's plans.
pub type PlanList = List<Plan>;
/// The platform's tenants.
pub type TenantList = List<TenantSummary>;

/// A new plan: its name and limits (a limit left out is no limit).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    name: String,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    monthly_tokens: Option<u64>,
    max_concurrent: Option<u32>,
    /// Models that may be called by name; left out, every enabled model.
    allowed_models: Option<Vec<String>>,
}

/// A field given, even as `null` (`Some(None)`: remove the limit), or left out (`None`).
fn given<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A change to a plan: fields left out stay; `null` removes a limit.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChange {
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<u32>)]
    requests_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<u32>)]
    tokens_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<u64>)]
    monthly_tokens: Option<Option<u64>>,
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<u32>)]
    max_concurrent: Option<Option<u32>>,
    #[serde(default, deserialize_with = "given")]
    #[schema(value_type = Option<Vec<String>>)]
    allowed_models: Option<Option<Vec<String>>>,
}

/// `GET /v1/admin/plans`.
#[utoipa::path(get, path = "/v1/admin/plans", tag = "platform", security(("bearer" = [])),
    responses((status = 200, description = "Every plan, with how many tenants are on it", body = PlanList), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody)))]
pub async fn list_plans(
    State(state): State<Arc<EdgeState>>,
    _admin: PlatformAdmin,
) -> Result<Json<PlanList>, ApiError> {
    let plans = plans::list_plans(&state.app_pool)
        .await
        .map_err(|e| ApiError::internal("listing plans", e))?;
    Ok(Json(list(plans)))
}

/// The plan named `name`, read in `conn`.
async fn plan_named(conn: &mut sqlx::PgConnection, name: &str) -> Result<Plan, ApiError> {
    plans::list_plans(&mut *conn)
        .await
        .map_err(|e| ApiError::internal("reading a plan", e))?
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such plan."))
}

/// `POST /v1/admin/plans`.
#[utoipa::path(post, path = "/v1/admin/plans", tag = "platform", security(("bearer" = [])), request_body = NewPlan,
    responses((status = 201, description = "The plan", body = Plan), (status = 400, description = "Invalid input, or the name is taken", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody)))]
pub async fn create_plan(
    State(state): State<Arc<EdgeState>>,
    admin: PlatformAdmin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let form: NewPlan = parse(&body)?;
    let limits = Limits {
        requests_per_minute: form.requests_per_minute,
        tokens_per_minute: form.tokens_per_minute,
        monthly_tokens: form.monthly_tokens,
        max_concurrent: form.max_concurrent,
        allowed_models: form.allowed_models,
    };
    let plan = audited(&state, &admin, None, "plan.create", |tx| {
        Box::pin(async move {
            plans::create_plan(tx, &form.name, &limits)
                .await
                .map_err(|e| store_error("creating a plan", e))?;
            let plan = plan_named(tx, form.name.trim()).await?;
            let detail = serde_json::to_value(&plan.limits).unwrap_or_default();
            Ok((plan.clone(), plan.name, detail))
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(plan)).into_response())
}

/// `PATCH /v1/admin/plans/{name}`: in force for every tenant on it at once.
#[utoipa::path(patch, path = "/v1/admin/plans/{name}", tag = "platform", security(("bearer" = [])), params(("name" = String, Path)), request_body = PlanChange,
    responses((status = 200, description = "The plan as it now is", body = Plan), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody), (status = 404, description = "No such plan", body = crate::api_doc::ErrorBody)))]
pub async fn update_plan(
    State(state): State<Arc<EdgeState>>,
    admin: PlatformAdmin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Plan>, ApiError> {
    let form: PlanChange = parse(&body)?;
    let change = LimitsChange {
        requests_per_minute: form.requests_per_minute,
        tokens_per_minute: form.tokens_per_minute,
        monthly_tokens: form.monthly_tokens,
        max_concurrent: form.max_concurrent,
        allowed_models: form.allowed_models,
    };
    let plan = audited(&state, &admin, None, "plan.update", |tx| {
        Box::pin(async move {
            let plan = plans::update_plan(tx, &name, &change)
                .await
                .map_err(|e| store_error("changing a plan", e))?;
            let detail = serde_json::to_value(&plan.limits).unwrap_or_default();
            Ok((plan, name, detail))
        })
    })
    .await?;
    Ok(Json(plan))
}

/// `DELETE /v1/admin/plans/{name}`: only a plan no tenant is on.
#[utoipa::path(delete, path = "/v1/admin/plans/{name}", tag = "platform", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, description = "Deleted", body = Object), (status = 400, description = "Tenants are on it", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody), (status = 404, description = "No such plan", body = crate::api_doc::ErrorBody)))]
pub async fn delete_plan(
    State(state): State<Arc<EdgeState>>,
    admin: PlatformAdmin,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let target = name.clone();
    audited(&state, &admin, None, "plan.delete", |tx| {
        Box::pin(async move {
            plans::delete_plan(tx, &target)
                .await
                .map_err(|e| store_error("deleting a plan", e))?;
            Ok(((), target, json!({})))
        })
    })
    .await?;
    Ok(Json(json!({ "name": name, "deleted": true })))
}

/// `GET /v1/admin/tenants`.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "platform", security(("bearer" = [])),
    responses((status = 200, description = "Every tenant, with its status and plan", body = TenantList), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody)))]
pub async fn list_tenants(
    State(state): State<Arc<EdgeState>>,
    _admin: PlatformAdmin,
) -> Result<Json<TenantList>, ApiError> {
    let tenants = tenants::platform_tenants(&state.app_pool)
        .await
        .map_err(|e| ApiError::internal("listing tenants", e))?;
    Ok(Json(list(tenants)))
}

/// A new tenant, on a plan or on none (no limits).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
    plan: Option<String>,
}

/// A new tenant and its first key, shown once.
#[derive(Serialize, ToSchema)]
pub struct CreatedTenant {
    tenant_id: Uuid,
    name: String,
    plan: Option<String>,
    api_key: String,
}

/// `POST /v1/admin/tenants`.
#[utoipa::path(post, path = "/v1/admin/tenants", tag = "platform", security(("bearer" = [])), request_body = NewTenant,
    responses((status = 201, description = "The tenant and its first key (shown once)", body = CreatedTenant), (status = 400, description = "Invalid input, or the name is taken", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody), (status = 404, description = "No such plan", body = crate::api_doc::ErrorBody)))]
pub async fn create_tenant(
    State(state): State<Arc<EdgeState>>,
    admin: PlatformAdmin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let form: NewTenant = parse(&body)?;
    let id = Uuid::new_v4();
    let plan = form.plan.clone();
    let (tenant, api_key) = audited(&state, &admin, Some(id), "tenant.create", |tx| {
        Box::pin(async move {
            let (tenant, api_key) = tenants::insert_tenant(tx, id, &form.name)
                .await
                .map_err(|e| store_error("creating a tenant", e))?;
            if let Some(plan) = &form.plan {
                plans::subscribe(&mut *tx, id, plan)
                    .await
                    .map_err(|e| store_error("subscribing a tenant", e))?;
            }
            let target = tenant.name.clone();
            Ok(((tenant, api_key), target, json!({ "plan": form.plan })))
        })
    })
    .await?;
    let created = CreatedTenant {
        tenant_id: tenant.id,
        name: tenant.name,
        plan,
        api_key,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// A tenant's new plan.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChoice {
    plan: String,
}

/// `PUT /v1/admin/tenants/{id}/plan`: in force at once; tokens used this month still count.
#[utoipa::path(put, path = "/v1/admin/tenants/{id}/plan", tag = "platform", security(("bearer" = [])), params(("id" = Uuid, Path)), request_body = PlanChoice,
    responses((status = 200, description = "Subscribed", body = Object), (status = 401, description = "No or wrong token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not a platform admin", body = crate::api_doc::ErrorBody), (status = 404, description = "No such tenant or plan", body = crate::api_doc::ErrorBody)))]
pub async fn set_tenant_plan(
    State(state): State<Arc<EdgeState>>,
    admin: PlatformAdmin,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let form: PlanChoice = parse(&body)?;
    let plan = form.plan.clone();
    audited(&state, &admin, Some(id), "tenant.plan", |tx| {
        Box::pin(async move {
            let name: Option<String> = sqlx::query_scalar(
                "SELECT name FROM tenants WHERE id = $1 AND status <> 'deleted'",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| ApiError::internal("subscribing a tenant", e))?;
            let name = name.ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such tenant.")
            })?;
            plans::subscribe(&mut *tx, id, &plan)
                .await
                .map_err(|e| store_error("subscribing a tenant", e))?;
            Ok(((), name, json!({ "plan": plan })))
        })
    })
    .await?;
    Ok(Json(json!({ "tenant_id": id, "plan": form.plan })))
}
