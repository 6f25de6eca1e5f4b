//! Authentication: `Authorization: Bearer` with an API key (`sk-sluice-...`) or a user's access
//! token (a JWT from `/v1/auth/login`, see [`sessions`](crate::sessions)), on every route.
//!
//! Keys are looked up by their SHA-256 through `sluice_authorize` (the one function allowed
//! past row-level security before the tenant is known), which answers with the tenant and what
//! the key may do (its own limits and its plan's). Answers are cached for `auth_cache_secs`,
//! and no longer than the key is valid. Every change to a key, a plan or a subscription is
//! announced by PostgreSQL on `sluice_auth` ([`forget_changes`]), and each edge drops what it
//! cached at once: a revoked key stops working on every edge within moments of the revocation
//! (the time a notification takes), and within `auth_cache_secs` even if an edge missed it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::FromRequestParts,
    http::{request::Parts, StatusCode},
};
use sluice_stores::postgres::{
    keys::{self, KeyGrant},
    plans::{self, Limits},
    tenants,
};
use sqlx::{types::Uuid, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{error::ApiError, sessions, EdgeState};

/// The authenticated tenant of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantId(pub Uuid);

/// The authenticated caller of a request: its tenant, and what it may do (a key's limits and
/// its plan's; a user has their tenant's plan's).
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantId,
    pub grant: Arc<KeyGrant>,
    /// The user of a login session (`None`: an API key, `grant.key_id`).
    pub user: Option<Uuid>,
}

impl Caller {
    /// The API key that calls (`None` for a user's session), as usage records name it.
    pub fn key_id(&self) -> Option<String> {
        self.user.is_none().then(|| self.grant.key_id.to_string())
    }

    /// The user whose session calls (`None` for an API key).
    pub fn user_id(&self) -> Option<String> {
        self.user.map(|u| u.to_string())
    }
}

/// Caches key-hash → grant for a short time.
pub struct AuthCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Arc<KeyGrant>, Instant)>>,
    /// Counts forgets: a lookup that began before one may have read what it forgot, so its
    /// answer is used but not cached.
    forgets: std::sync::atomic::AtomicU64,
}

impl AuthCache {
    /// A cache keeping entries for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            forgets: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What `key` may do, from the cache or PostgreSQL; `None` if it is not valid.
    pub async fn authorize(
        &self,
        pool: &PgPool,
        key: &str,
    ) -> Result<Option<Arc<KeyGrant>>, ApiError> {
        self.cached_or(tenants::hash_api_key(key), async {
            keys::authorize(pool, key)
                .await
                .map_err(|e| ApiError::internal("authentication lookup failed", e))
        })
        .await
    }

    /// The tenant's plan, from the cache or PostgreSQL, as a grant for its user `user`; `None`
    /// if the tenant is not active.
    pub async fn tenant_grant(
        &self,
        pool: &PgPool,
        tenant: Uuid,
        user: Uuid,
    ) -> Result<Option<Arc<KeyGrant>>, ApiError> {
        let tenant_grant = self
            .cached_or(format!("tenant:{tenant}"), async {
                let plan = plans::tenant_plan(pool, tenant)
                    .await
                    .map_err(|e| ApiError::internal("tenant lookup failed", e))?;
                Ok(plan.map(|terms| KeyGrant {
                    tenant_id: tenant,
                    key_id: Uuid::nil(),
                    valid_until_ms: None,
                    key: Limits::default(),
                    plan: terms.plan,
                    tenant_spend: terms.spend,
                    key_spend: None,
                }))
            })
            .await?;
        Ok(tenant_grant.map(|grant| {
            Arc::new(KeyGrant {
                key_id: user,
                ..(*grant).clone()
            })
        }))
    }

    /// The grant cached under `cache_key`, or the one `load` finds, cached for the TTL and no
    /// longer than it is valid (a rotated key's grace, an expiry). A load that overlapped a
    /// [`forget`](Self::forget) may have read what was forgotten: its answer is used, not kept.
    async fn cached_or(
        &self,
        cache_key: String,
        load: impl std::future::Future<Output = Result<Option<KeyGrant>, ApiError>>,
    ) -> Result<Option<Arc<KeyGrant>>, ApiError> {
        if let Ok(entries) = self.entries.lock() {
            if let Some((grant, until)) = entries.get(&cache_key) {
                if Instant::now() < *until {
                    return Ok(Some(grant.clone()));
                }
            }
        }
        let began = self.forgets.load(std::sync::atomic::Ordering::SeqCst);
        let Some(grant) = load.await? else {
            return Ok(None);
        };
        let grant = Arc::new(grant);
        let left_valid = grant.valid_until_ms.map(|until| {
            Duration::from_millis(u64::try_from(until - sluice_pipelines::now_ms()).unwrap_or(0))
        });
        let until = Instant::now() + left_valid.map_or(self.ttl, |left| left.min(self.ttl));
        if let Ok(mut entries) = self.entries.lock() {
            if self.forgets.load(std::sync::atomic::Ordering::SeqCst) == began {
                if entries.len() > 100_000 {
                    let now = Instant::now();
                    entries.retain(|_, (_, until)| now < *until);
                }
                entries.insert(cache_key, (grant.clone(), until));
            }
        }
        Ok(Some(grant))
    }

    /// Forgets the key with this hash, or every key given [`keys::EVERY_KEY`].
    pub fn forget(&self, key_hash: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            self.forgets
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if key_hash == keys::EVERY_KEY {
                entries.clear();
            } else {
                entries.remove(key_hash);
            }
        }
    }
}

/// Listens on `sluice_auth` until `cancel` fires and makes `cache` forget what changed. When
/// the connection drops, notifications may have been missed: the whole cache is forgotten.
pub async fn forget_changes(
    pool: PgPool,
    cache: Arc<AuthCache>,
    changes: prometheus::IntCounter,
    cancel: CancellationToken,
) {
    loop {
        let Some(mut listener) =
            sluice_stores::postgres::listen(&pool, keys::AUTH_CHANNEL, "key changes", &cancel)
                .await
        else {
            return;
        };
        // Anything cached before listening may be stale.
        cache.forget(keys::EVERY_KEY);
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => {
                    changes.inc();
                    cache.forget(notification.payload());
                }
                Ok(None) => {
                    tracing::warn!("lost the connection that hears of key changes; forgetting every cached key");
                    cache.forget(keys::EVERY_KEY);
                }
                Err(error) => {
                    tracing::warn!(%error, "listening for key changes failed; forgetting every cached key");
                    cache.forget(keys::EVERY_KEY);
                    break;
                }
            }
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Resolves a bearer token (an API key or an access token) to its caller, or a 401.
pub async fn caller_for_key(state: &EdgeState, key: Option<&str>) -> Result<Caller, ApiError> {
    let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header as `Bearer YOUR_KEY`.",
        )
    })?;
    if sessions::looks_like_jwt(key) {
        let claims = state.tokens.verify(key)?;
        let tenant = claims.tid.ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "no_tenant",
                "A platform admin's session belongs to no tenant; name one where the route allows it.",
            )
        })?;
        return match state
            .auth
            .tenant_grant(&state.app_pool, tenant, claims.sub)
            .await?
        {
            Some(grant) => Ok(Caller {
                tenant: TenantId(tenant),
                grant,
                user: Some(claims.sub),
            }),
            None => Err(ApiError::unauthorized(
                "The tenant of this session is not active.",
            )),
        };
    }
    match state.auth.authorize(&state.app_pool, key).await? {
        Some(grant) => Ok(Caller {
            tenant: TenantId(grant.tenant_id),
            grant,
            user: None,
        }),
        None => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

impl FromRequestParts<Arc<EdgeState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        let caller = caller_for_key(state, bearer(parts)).await?;
        crate::cors::check_origin(state, crate::cors::origin(&parts.headers), caller.tenant.0)?;
        Ok(caller)
    }
}

impl FromRequestParts<Arc<EdgeState>> for TenantId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller::from_request_parts(parts, state).await?.tenant)
    }
}
