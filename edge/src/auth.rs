//! API-key authentication: `Authorization: Bearer sk-sluice-...`.
//!
//! Keys are looked up by their SHA-256 through `sluice_authenticate` (the one function allowed
//! past row-level security before the tenant is known). Successful lookups are cached for
//! `auth_cache_secs`, keyed by the hash, so a revoked key stops working within that time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use sluice_stores::postgres::tenants;
use sqlx::{types::Uuid, PgPool};

use crate::{error::ApiError, EdgeState};

/// The authenticated tenant of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantId(pub Uuid);

/// Caches key-hash → tenant for a short time.
pub struct AuthCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Uuid, Instant)>>,
}

impl AuthCache {
    /// A cache keeping entries for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant owning `key`, from the cache or PostgreSQL.
    pub async fn authenticate(&self, pool: &PgPool, key: &str) -> Result<Option<Uuid>, ApiError> {
        let hash = tenants::hash_api_key(key);
        if let Ok(entries) = self.entries.lock() {
            if let Some((tenant, at)) = entries.get(&hash) {
                if at.elapsed() < self.ttl {
                    return Ok(Some(*tenant));
                }
            }
        }
        let tenant = tenants::authenticate(pool, key)
            .await
            .map_err(|e| ApiError::internal("authentication lookup failed", e))?;
        if let (Some(tenant), Ok(mut entries)) = (tenant, self.entries.lock()) {
            if entries.len() > 100_000 {
                entries.retain(|_, (_, at)| at.elapsed() < self.ttl);
            }
            entries.insert(hash, (tenant, Instant::now()));
        }
        Ok(tenant)
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

/// Resolves a key to its tenant or a 401.
pub async fn tenant_for_key(state: &EdgeState, key: Option<&str>) -> Result<TenantId, ApiError> {
    let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header as `Bearer YOUR_KEY`.",
        )
    })?;
    match state.auth.authenticate(&state.app_pool, key).await? {
        Some(tenant) => Ok(TenantId(tenant)),
        None => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

impl FromRequestParts<Arc<EdgeState>> for TenantId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<EdgeState>,
    ) -> Result<Self, Self::Rejection> {
        tenant_for_key(state, bearer(parts)).await
    }
}
