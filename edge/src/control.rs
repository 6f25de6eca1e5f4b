//! The control plane's HTTP API: self-registration, login and sessions for users, and a
//! tenant's keys, members and audit log for its admins.
//!
//! - `POST /v1/auth/register` (tenant, email, password → the tenant, its first admin, a session),
//!   `POST /v1/auth/login`, `POST /v1/auth/refresh` (rotates the refresh token),
//!   `POST /v1/auth/logout` (ends the session).
//! - `GET|POST /v1/keys`, `POST /v1/keys/{id}/revoke`, `POST /v1/keys/{id}/rotate`,
//!   `GET|POST /v1/members`, `GET /v1/audit`: a tenant admin's session on its own tenant; a
//!   platform admin's on the tenant named by the `x-sluice-tenant` header. API keys cannot
//!   manage keys (a leaked key must not mint others); members cannot either.
//!
//! Every change is recorded in the audit log in the same transaction as the change.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, FromRequestParts, Path, Query, State},
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_stores::postgres::{
    audit::{self, Action, Entry},
    keys::{self, KeyInfo},
    origins, tenant_transaction,
    users::{self, Member, Role, Rotation},
};
use sqlx::types::Uuid;
use utoipa::{IntoParams, ToSchema};

use crate::{
    auth::{self},
    error::ApiError,
    sessions::{self, Claims},
    EdgeState,
};

/// Parses a JSON body, naming the field at fault.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let error = ApiError::invalid(format!("Invalid body: {}", e.inner()));
        if path == "." {
            error
        } else {
            error.with_param(path)
        }
    })
}

pub(crate) fn store_error(context: &str, e: sluice_stores::Error) -> ApiError {
    match e {
        sluice_stores::Error::Invalid(message) => ApiError::invalid(message),
        sluice_stores::Error::NotFound(message) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
        }
        e => ApiError::internal(context, e),
    }
}

/// Runs a password hash or check off the async threads, in one of the edge's few places for
/// it; when all are taken, 503 at once.
async fn blocking<T: Send + 'static>(
    state: &EdgeState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let place = state
        .password_work
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable("Too many logins at once; retry shortly.").retry_after(1)
        })?;
    tokio::task::spawn_blocking(move || {
        let _place = place;
        work()
    })
    .await
    .map_err(|e| ApiError::internal("password work", e))
}

pub(crate) fn peer(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip().to_string())
}

/// A session's tokens, as login, registration and refresh answer them.
async fn session_tokens(
    state: &EdgeState,
    user: Uuid,
    tenant: Option<Uuid>,
    role: Role,
    email: &str,
) -> Result<Session, ApiError> {
    let access = state.tokens.issue(user, tenant, role, email)?;
    let (refresh, hash) = sessions::new_refresh_token();
    users::start_session(&state.app_pool, user, &hash, refresh_expiry(state))
        .await
        .map_err(|e| ApiError::internal("starting a session", e))?;
    Ok(tokens_json(state, user, tenant, role, &access, &refresh))
}

fn refresh_expiry(state: &EdgeState) -> i64 {
    let days = i64::try_from(state.config.refresh_token_days).unwrap_or(30);
    sluice_pipelines::now_ms().saturating_add(days.saturating_mul(86_400_000))
}

/// A session's tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub user_id: Uuid,
    /// None for a platform admin.
    pub tenant_id: Option<Uuid>,
    pub role: Role,
    /// A JWT: send it as `Authorization: Bearer`.
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: u64,
    /// Spend it at `/v1/auth/refresh` for a new pair.
    pub refresh_token: String,
}

fn tokens_json(
    state: &EdgeState,
    user: Uuid,
    tenant: Option<Uuid>,
    role: Role,
    access: &str,
    refresh: &str,
) -> Session {
    Session {
        user_id: user,
        tenant_id: tenant,
        role,
        access_token: access.to_owned(),
        token_type: "bearer",
        expires_in: state.tokens.access_ttl_secs(),
        refresh_token: refresh.to_owned(),
    }
}

/// A key just issued: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKey {
    pub id: Uuid,
    /// The key's first characters, as lists show them.
    pub prefix: String,
    pub api_key: String,
    /// The key it replaces (a rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Uuid>,
    /// Seconds the replaced key keeps working (a rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_key_valid_for_secs: Option<u64>,
}

fn issued(id: Uuid, key: String, replaces: Option<(Uuid, u64)>) -> IssuedKey {
    IssuedKey {
        id,
        prefix: key.get(..16).unwrap_or_default().to_owned(),
        api_key: key,
        replaces: replaces.map(|(id, _)| id),
        old_key_valid_for_secs: replaces.map(|(_, grace)| grace),
    }
}

/// A list, as OpenAI's API answers them.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
}

/// The tenant's keys.
pub type KeyList = List<KeyInfo>;
/// The tenant's users.
pub type MemberList = List<Member>;
/// The tenant's audit log.
pub type AuditList = List<Entry>;

pub(crate) fn list<T>(data: Vec<T>) -> List<T> {
    List {
        object: "list",
        data,
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    tenant: String,
    email: String,
    password: String,
}

/// `POST /v1/auth/register`.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = Registration,
    responses((status = 201, description = "The tenant, its first admin and a session", body = Session), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 429, description = "Too many attempts from this address (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn register(
    State(state): State<Arc<EdgeState>>,
    parts: Parts,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.limits.throttle_login(peer(&parts).as_deref()).await?;
    let form: Registration = parse(&body)?;
    if !state.flags.enabled(REGISTRATION_FLAG, None, true) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "registration_closed",
            "Self-registration is closed; ask an operator for an account.",
        ));
    }
    users::check_credentials(&form.email, &form.password).map_err(|e| store_error("", e))?;
    let password = form.password.clone();
    let hash = blocking(&state, move || users::hash_password(&password))
        .await?
        .map_err(|e| ApiError::internal("hashing a password", e))?;
    let (tenant, user) = users::register(
        &state.app_pool,
        &form.tenant,
        &form.email,
        &hash,
        state.config.registration_plan.as_deref(),
    )
    .await
    .map_err(|e| store_error("registering", e))?;
    let email = form.email.trim().to_lowercase();
    let mut tx = tenant_transaction(&state.app_pool, tenant)
        .await
        .map_err(|e| ApiError::internal("recording a registration", e))?;
    audit::record(
        &mut tx,
        &Action {
            tenant_id: Some(tenant),
            actor: &format!("user:{email}"),
            action: "tenant.register",
            target: Some(form.tenant.trim()),
            detail: json!({}),
            source: peer(&parts).as_deref(),
        },
    )
    .await
    .map_err(|e| ApiError::internal("recording a registration", e))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal("recording a registration", e))?;
    let tokens = session_tokens(&state, user, Some(tenant), Role::TenantAdmin, &email).await?;
    Ok((StatusCode::CREATED, Json(tokens)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    email: String,
    password: String,
}

/// `POST /v1/auth/login`.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = Login,
    responses((status = 200, description = "A session", body = Session), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 429, description = "Too many attempts from this address (with Retry-After)", body = crate::api_doc::ErrorBody)))]
pub async fn login(
    State(state): State<Arc<EdgeState>>,
    parts: Parts,
    body: Bytes,
) -> Result<Json<Session>, ApiError> {
    state.limits.throttle_login(peer(&parts).as_deref()).await?;
    let form: Login = parse(&body)?;
    let found = users::user_for_login(&state.app_pool, &form.email)
        .await
        .map_err(|e| ApiError::internal("looking up a user", e))?;
    // An unknown email costs the same hash check as a wrong password, so timing tells nothing.
    let stored = found.as_ref().map(|u| u.password_hash.clone());
    let password = form.password.clone();
    let matches = blocking(&state, move || match stored {
        Some(hash) => users::verify_password(&hash, &password),
        None => {
            users::verify_password(dummy_hash(), &password);
            false
        }
    })
    .await?;
    match found {
        Some(user) if matches => Ok(Json(
            session_tokens(
                &state,
                user.id,
                user.tenant_id,
                user.role,
                &form.email.trim().to_lowercase(),
            )
            .await?,
        )),
        _ => Err(ApiError::unauthorized("Incorrect email or password.")),
    }
}

/// The feature flag that opens self-registration (on unless set).
pub const REGISTRATION_FLAG: &str = "registration";

/// The hash of a random password nobody has, checked when an email is unknown (built when the
/// edge starts).
pub fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let (nobody, _) = sessions::new_refresh_token();
        users::hash_password(&nobody).unwrap_or_default()
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshForm {
    refresh_token: String,
}

/// `POST /v1/auth/refresh`: a new access token and a new refresh token; the old one is spent.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshForm,
    responses((status = 200, description = "A new access token and refresh token; the one sent is spent", body = Session), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody)))]
pub async fn refresh(
    State(state): State<Arc<EdgeState>>,
    body: Bytes,
) -> Result<Json<Session>, ApiError> {
    let form: RefreshForm = parse(&body)?;
    let old_hash = sluice_stores::postgres::tenants::hash_api_key(&form.refresh_token);
    let (token, new_hash) = sessions::new_refresh_token();
    let rotation = users::rotate_session(
        &state.app_pool,
        &old_hash,
        &new_hash,
        refresh_expiry(&state),
    )
    .await
    .map_err(|e| ApiError::internal("rotating a session", e))?;
    match rotation {
        Rotation::Rotated {
            user_id,
            tenant_id,
            role,
            email,
        } => {
            let access = state.tokens.issue(user_id, tenant_id, role, &email)?;
            Ok(Json(tokens_json(
                &state, user_id, tenant_id, role, &access, &token,
            )))
        }
        Rotation::Reused => Err(ApiError::unauthorized(
            "This refresh token was already used; the session is ended. Log in again.",
        )),
        Rotation::Invalid => Err(ApiError::unauthorized("Invalid or expired refresh token.")),
    }
}

/// `POST /v1/auth/logout`: ends the session of the refresh token given.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", request_body = RefreshForm,
    responses((status = 204, description = "The session is ended"), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody)))]
pub async fn logout(
    State(state): State<Arc<EdgeState>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let form: RefreshForm = parse(&body)?;
    let hash = sluice_stores::postgres::tenants::hash_api_key(&form.refresh_token);
    let known = users::end_session(&state.app_pool, &hash)
        .await
        .map_err(|e| ApiError::internal("ending a session", e))?;
    if known {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::unauthorized("Invalid refresh token."))
    }
}

/// A caller allowed to administer a tenant: that tenant's admin, or a platform admin naming it
/// in `x-sluice-tenant`.
pub struct TenantAdmin {
    pub tenant: Uuid,
    pub claims: Arc<Claims>,
    pub source: Option<String>,
}

impl TenantAdmin {
    fn actor(&self) -> String {
        self.claims.actor()
    }
}

/// The user's session a request carries, for administration: an API key is refused with 403
/// `key_refusal`. A platform admin's is checked against the user each time (the token may
/// outlive the role: a disabled or demoted admin stops at once); a tenant admin's is checked
/// with its tenant by the caller.
pub(crate) async fn admin_session(
    state: &EdgeState,
    parts: &Parts,
    key_refusal: &str,
) -> Result<Claims, ApiError> {
    let token = auth::bearer(parts).ok_or_else(|| {
        ApiError::unauthorized(
            "Log in (POST /v1/auth/login) and send the access token as `Bearer`.",
        )
    })?;
    if !sessions::looks_like_jwt(token) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            key_refusal,
        ));
    }
    let claims = state.tokens.verify(token)?;
    if claims.role()? == Role::PlatformAdmin {
        let user = users::user_for_login(&state.app_pool, &claims.email)
            .await
            .map_err(|e| ApiError::internal("checking a platform admin", e))?;
        if !user.is_some_and(|u| u.id == claims.sub && u.role == Role::PlatformAdmin) {
            return Err(ApiError::unauthorized(
                "This session's user is no longer a platform admin.",
            ));
        }
    }
    Ok(claims)
}

impl FromRequestParts<Arc<EdgeState>> for TenantAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        let forbidden =
            |message: &str| ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message);
        let claims = Arc::new(
            admin_session(
                state,
                parts,
                "API keys cannot administer a tenant; use a tenant admin's session.",
            )
            .await?,
        );
        let tenant = match claims.role()? {
            Role::TenantAdmin => claims
                .tid
                .ok_or_else(|| ApiError::unauthorized("The session names no tenant."))?,
            Role::PlatformAdmin => parts
                .headers
                .get("x-sluice-tenant")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Uuid::parse_str(v).ok())
                .ok_or_else(|| {
                    ApiError::invalid("A platform admin names the tenant in the `x-sluice-tenant` header (its id).")
                })?,
            Role::Member => return Err(forbidden("Only the tenant's admins may do this.")),
        };
        // The token may outlive its tenant: a deleted or suspended tenant has no admins.
        if state
            .auth
            .tenant_grant(&state.app_pool, tenant, claims.sub)
            .await?
            .is_none()
        {
            return Err(ApiError::unauthorized("The tenant is not active."));
        }
        crate::cors::check_origin(state, crate::cors::origin(&parts.headers), tenant)?;
        Ok(Self {
            tenant,
            claims,
            source: peer(parts),
        })
    }
}

/// One change and its audit entry, in one transaction of the admin's tenant.
pub(crate) async fn in_tenant<T>(
    state: &EdgeState,
    admin: &TenantAdmin,
    action: &str,
    change: impl for<'c> FnOnce(
        &'c mut sqlx::PgConnection,
    ) -> futures::future::BoxFuture<
        'c,
        Result<(T, Option<String>, Value), ApiError>,
    >,
) -> Result<T, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("opening a transaction", e))?;
    let (out, target, detail) = change(&mut tx).await?;
    audit::record(
        &mut tx,
        &Action {
            tenant_id: Some(admin.tenant),
            actor: &admin.actor(),
            action,
            target: target.as_deref(),
            detail,
            source: admin.source.as_deref(),
        },
    )
    .await
    .map_err(|e| ApiError::internal("recording an action", e))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal("committing a change", e))?;
    Ok(out)
}

/// `GET /v1/keys`.
#[utoipa::path(get, path = "/v1/keys", tag = "admin", security(("bearer" = [])),
    params(("x-sluice-tenant" = Option<String>, Header, description = "The tenant's id, for a platform admin")),
    responses((status = 200, description = "The tenant's keys (prefixes, never secrets)", body = List<KeyInfo>), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn list_keys(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<KeyList>, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing keys", e))?;
    let keys = keys::list_keys(&mut tx, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing keys", e))?;
    Ok(Json(list(keys)))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NewKey {
    name: Option<String>,
}

/// `POST /v1/keys`: a new key, shown once.
#[utoipa::path(post, path = "/v1/keys", tag = "admin", security(("bearer" = [])), request_body = NewKey,
    responses((status = 201, description = "The new key, shown once", body = IssuedKey), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn create_key(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let form: NewKey = if body.is_empty() {
        NewKey::default()
    } else {
        parse(&body)?
    };
    let name = form.name.unwrap_or_else(|| "default".to_owned());
    let tenant = admin.tenant;
    let (key, id) = in_tenant(&state, &admin, "key.create", |tx| {
        Box::pin(async move {
            let (key, id) = keys::create_key(tx, tenant, &name)
                .await
                .map_err(|e| store_error("creating a key", e))?;
            let prefix = key.get(..16).unwrap_or_default().to_owned();
            Ok(((key, id), Some(prefix), json!({ "name": name })))
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(issued(id, key, None))).into_response())
}

/// `POST /v1/keys/{id}/revoke`.
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", tag = "admin", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, description = "Revoked, on every edge within moments", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "Not found, or not the caller's", body = crate::api_doc::ErrorBody)))]
pub async fn revoke_key(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    in_tenant(&state, &admin, "key.revoke", |tx| {
        Box::pin(async move {
            let key = keys::key_by_id(tx, id)
                .await
                .map_err(|e| ApiError::internal("revoking a key", e))?
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such key."))?;
            keys::revoke(tx, id)
                .await
                .map_err(|e| ApiError::internal("revoking a key", e))?;
            Ok(((), Some(key.prefix), json!({ "id": id })))
        })
    })
    .await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RotateForm {
    grace_secs: Option<u64>,
}

/// `POST /v1/keys/{id}/rotate`: a replacement key, shown once; the old one works for
/// `grace_secs` more (default 3600).
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "admin", security(("bearer" = [])), params(("id" = Uuid, Path)), request_body = RotateForm,
    responses((status = 200, description = "The replacement key, shown once; the old one works for the grace period", body = IssuedKey), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody), (status = 404, description = "Not found, or not the caller's", body = crate::api_doc::ErrorBody)))]
pub async fn rotate_key(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    Path(id): Path<Uuid>,
    body: Bytes,
) -> Result<Json<IssuedKey>, ApiError> {
    let form: RotateForm = if body.is_empty() {
        RotateForm::default()
    } else {
        parse(&body)?
    };
    let grace = form.grace_secs.unwrap_or(3600);
    let (key, new_id) = in_tenant(&state, &admin, "key.rotate", |tx| {
        Box::pin(async move {
            let old = keys::key_by_id(tx, id)
                .await
                .map_err(|e| ApiError::internal("rotating a key", e))?
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such key."))?;
            let (key, new_id) = keys::rotate(tx, id, grace)
                .await
                .map_err(|e| store_error("rotating a key", e))?;
            Ok((
                (key, new_id),
                Some(old.prefix),
                json!({ "id": id, "new_id": new_id, "grace_secs": grace }),
            ))
        })
    })
    .await?;
    Ok(Json(issued(new_id, key, Some((id, grace)))))
}

/// `GET /v1/members`.
#[utoipa::path(get, path = "/v1/members", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's users", body = List<Member>), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn list_members(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<MemberList>, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing members", e))?;
    let members = users::list_members(&mut tx, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing members", e))?;
    Ok(Json(list(members)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    email: String,
    password: String,
    #[serde(default = "member_role")]
    role: String,
}

fn member_role() -> String {
    "member".to_owned()
}

/// `POST /v1/members`: adds a member or another admin to the tenant.
#[utoipa::path(post, path = "/v1/members", tag = "admin", security(("bearer" = [])), request_body = NewMember,
    responses((status = 201, description = "The new member", body = Object), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn add_member(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let form: NewMember = parse(&body)?;
    let role = Role::parse(&form.role).map_err(|e| store_error("", e).with_param("role"))?;
    if role == Role::PlatformAdmin {
        return Err(
            ApiError::invalid("A tenant's member is a tenant_admin or a member.")
                .with_param("role"),
        );
    }
    users::check_credentials(&form.email, &form.password).map_err(|e| store_error("", e))?;
    let password = form.password.clone();
    let hash = blocking(&state, move || users::hash_password(&password))
        .await?
        .map_err(|e| ApiError::internal("hashing a password", e))?;
    let (tenant, email) = (admin.tenant, form.email.trim().to_lowercase());
    let target = email.clone();
    let id = in_tenant(&state, &admin, "member.add", |tx| {
        Box::pin(async move {
            let id = users::add_user(tx, Some(tenant), &email, &hash, role)
                .await
                .map_err(|e| store_error("adding a member", e))?;
            Ok((id, Some(email), json!({ "role": role })))
        })
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "email": target, "role": role })),
    )
        .into_response())
}

#[derive(Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Entries older than this id (paging).
    before: Option<i64>,
    /// At most this many (default 100, at most 1000).
    limit: Option<i64>,
}

/// `GET /v1/audit`: the tenant's audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "admin", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, description = "The tenant's audit log, newest first", body = List<Entry>), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn audit_log(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let Query(query) = query?;
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("reading the audit log", e))?;
    let entries = audit::entries(
        &mut tx,
        Some(admin.tenant),
        query.before,
        query.limit.unwrap_or(100),
    )
    .await
    .map_err(|e| ApiError::internal("reading the audit log", e))?;
    Ok(Json(list(entries)))
}

/// The browser origins a tenant's keys and tokens may be used from.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OriginList {
    /// `https://host[:port]` or `http://…`, or `*` for any origin.
    pub origins: Vec<String>,
}

/// `GET /v1/tenant/origins`.
#[utoipa::path(get, path = "/v1/tenant/origins", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The origins browsers may use the tenant's credentials from", body = OriginList), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn list_origins(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Json<OriginList>, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing origins", e))?;
    let origins = origins::list(&mut tx, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("listing origins", e))?;
    Ok(Json(OriginList { origins }))
}

/// `PUT /v1/tenant/origins`: replaces the list; every edge applies it within moments.
#[utoipa::path(put, path = "/v1/tenant/origins", tag = "admin", security(("bearer" = [])), request_body = OriginList,
    responses((status = 200, description = "The list now in force (normalized)", body = OriginList), (status = 400, description = "Invalid input", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn set_origins(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<Json<OriginList>, ApiError> {
    let form: OriginList = parse(&body)?;
    let tenant = admin.tenant;
    let origins = in_tenant(&state, &admin, "tenant.origins", |tx| {
        Box::pin(async move {
            let origins = origins::replace(tx, tenant, &form.origins)
                .await
                .map_err(|e| store_error("setting origins", e))?;
            let detail = json!({ "origins": origins });
            Ok((origins, None, detail))
        })
    })
    .await?;
    Ok(Json(OriginList { origins }))
}

/// `GET /v1/tenant/export`: everything the tenant owns, as one JSON document (streamed).
#[utoipa::path(get, path = "/v1/tenant/export", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's record, plan and CORS origins, keys (prefixes), users (no password hashes), audit log and usage facts", body = Object),
        (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody),
        (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn export_tenant(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
) -> Result<Response, ApiError> {
    let mut tx = tenant_transaction(&state.app_pool, admin.tenant)
        .await
        .map_err(|e| ApiError::internal("exporting a tenant", e))?;
    let export = sluice_stores::export::tenant_export(
        &mut tx,
        &state.clickhouse,
        admin.tenant,
        sluice_pipelines::now_ms(),
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "a tenant export failed");
        ApiError::unavailable("The export is unavailable right now; retry shortly.").retry_after(5)
    })?;
    audit::record(
        &mut tx,
        &Action {
            tenant_id: Some(admin.tenant),
            actor: &admin.actor(),
            action: "tenant.export",
            target: None,
            detail: json!({}),
            source: admin.source.as_deref(),
        },
    )
    .await
    .map_err(|e| ApiError::internal("recording an export", e))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal("recording an export", e))?;
    // Written as it is read: the usage facts stream from ClickHouse.
    let body = axum::body::Body::from_stream(export.into_stream());
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| ApiError::internal("answering an export", e))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteTenant {
    /// The tenant's name, to confirm.
    confirm: String,
}

/// `DELETE /v1/tenant`: deletes the caller's tenant. Its keys and sessions stop at once.
#[utoipa::path(delete, path = "/v1/tenant", tag = "admin", security(("bearer" = [])), request_body = DeleteTenant,
    responses((status = 200, description = "Deleted: keys and sessions stop at once, data is purged after the grace period, usage facts are kept for invoicing", body = Object),
        (status = 400, description = "The confirmation does not name the tenant", body = crate::api_doc::ErrorBody),
        (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody),
        (status = 403, description = "Not allowed for this caller", body = crate::api_doc::ErrorBody)))]
pub async fn delete_tenant(
    State(state): State<Arc<EdgeState>>,
    admin: TenantAdmin,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let form: DeleteTenant = parse(&body)?;
    let tenant = admin.tenant;
    in_tenant(&state, &admin, "tenant.delete", |tx| {
        Box::pin(async move {
            let name: Option<String> = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| ApiError::internal("deleting a tenant", e))?;
            if name.as_deref() != Some(form.confirm.as_str()) {
                return Err(
                    ApiError::invalid("`confirm` must be the tenant's name.").with_param("confirm")
                );
            }
            sluice_stores::postgres::tenants::delete_tenant(tx, tenant)
                .await
                .map_err(|e| ApiError::internal("deleting a tenant", e))?;
            Ok(((), name, json!({})))
        })
    })
    .await?;
    Ok(Json(json!({ "id": tenant, "deleted": true })))
}
