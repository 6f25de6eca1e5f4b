//! The key lifecycle and what a key may do: list (prefix shown, never the secret), revoke,
//! rotate (old and new both valid for a grace period), and [`authorize`], which answers for a
//! key with its tenant, its own limits and its plan's. Every change to a key is announced to
//! the edges on the channel [`AUTH_CHANNEL`] by a trigger, so no caller can forget to.

use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use super::{
    plans::{limits_from_row, Limits},
    tenants::{self, API_KEY_PREFIX},
};
use crate::{billing::budgets::Budget, Error, Result};

/// The PostgreSQL channel on which key, plan and subscription changes are announced: the
/// payload is the changed key's hash, or [`EVERY_KEY`].
pub const AUTH_CHANNEL: &str = "sluice_auth";
/// The payload that says every key may have changed (a plan or a subscription did).
pub const EVERY_KEY: &str = "*";

/// What a valid key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    pub tenant_id: Uuid,
    pub key_id: Uuid,
    /// When the key stops being valid (revocation after a rotation's grace, or expiry), Unix
    /// milliseconds.
    pub valid_until_ms: Option<i64>,
    /// The key's own limits.
    pub key: Limits,
    /// The tenant's plan and its limits, if it is subscribed to one.
    pub plan: Option<(String, Limits)>,
    /// The tenant's monthly spend budget, and the key's own.
    pub tenant_spend: Option<Budget>,
    pub key_spend: Option<Budget>,
}

impl KeyGrant {
    /// Whether neither the key nor its plan limits anything, and no budget applies.
    pub fn is_unlimited(&self) -> bool {
        self.key.is_unlimited()
            && self.plan.as_ref().is_none_or(|(_, l)| l.is_unlimited())
            && self.tenant_spend.is_none()
            && self.key_spend.is_none()
    }

    /// Whether the key and its plan both allow `model` by name.
    pub fn allows(&self, model: &str) -> bool {
        self.key.allows(model) && self.plan.as_ref().is_none_or(|(_, l)| l.allows(model))
    }

    /// The models both the key and its plan allow; `None` when neither restricts them.
    pub fn allowed_models(&self) -> Option<Vec<String>> {
        let plan = self
            .plan
            .as_ref()
            .and_then(|(_, l)| l.allowed_models.as_ref());
        match (self.key.allowed_models.as_ref(), plan) {
            (None, None) => None,
            (Some(only), None) | (None, Some(only)) => Some(only.clone()),
            (Some(key), Some(_)) => Some(key.iter().filter(|m| self.allows(m)).cloned().collect()),
        }
    }
}

/// What `key` may do, if it is valid (runtime role; the one door through row-level security
/// before the tenant is known).
pub async fn authorize(app: &PgPool, key: &str) -> Result<Option<KeyGrant>> {
    if !key.starts_with(API_KEY_PREFIX) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT tenant_id, key_id, (extract(epoch FROM valid_until) * 1000)::bigint,
                key_requests_per_minute, key_tokens_per_minute, NULL::bigint,
                key_max_concurrent, key_allowed_models,
                plan_name, plan_requests_per_minute, plan_tokens_per_minute, plan_monthly_tokens,
                plan_max_concurrent, plan_allowed_models,
                tenant_spend_micros, tenant_spend_alert, key_spend_micros, key_spend_alert
           FROM sluice_authorize($1)",
    )
    .bind(tenants::hash_api_key(key))
    .fetch_optional(app)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let plan_name: Option<String> = row.try_get(8)?;
    let plan = match plan_name {
        Some(name) => Some((name, limits_from_row(&row, 9)?)),
        None => None,
    };
    Ok(Some(KeyGrant {
        tenant_id: row.try_get(0)?,
        key_id: row.try_get(1)?,
        valid_until_ms: row.try_get(2)?,
        key: limits_from_row(&row, 3)?,
        plan,
        tenant_spend: Budget::from_row(&row, 14)?,
        key_spend: Budget::from_row(&row, 16)?,
    }))
}

/// A key as its owners see it: never the secret.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    /// Whether it works now.
    pub active: bool,
}

const KEY_COLUMNS: &str = "k.id, t.name, k.name, k.prefix, k.tenant_id,
    (extract(epoch FROM k.created_at) * 1000)::bigint,
    (extract(epoch FROM k.revoked_at) * 1000)::bigint,
    (extract(epoch FROM k.expires_at) * 1000)::bigint,
    (k.revoked_at IS NULL OR k.revoked_at > now()) AND (k.expires_at IS NULL OR k.expires_at > now())";

fn key_from_row(row: &sqlx::postgres::PgRow) -> Result<KeyInfo> {
    Ok(KeyInfo {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        name: row.try_get(2)?,
        prefix: row.try_get(3)?,
        tenant_id: row.try_get(4)?,
        created_at_ms: row.try_get(5)?,
        revoked_at_ms: row.try_get(6)?,
        expires_at_ms: row.try_get(7)?,
        active: row.try_get(8)?,
    })
}

/// A tenant's keys, newest first (the owner role, or the runtime role in the tenant's
/// transaction).
pub async fn list_keys(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<KeyInfo>> {
    let rows = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
          WHERE k.tenant_id = $1 ORDER BY k.created_at DESC, k.id"
    ))
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(key_from_row).collect()
}

/// One key by id, if the connection may see it.
pub async fn key_by_id(conn: &mut PgConnection, key_id: Uuid) -> Result<Option<KeyInfo>> {
    let row = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1"
    ))
    .bind(key_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(key_from_row).transpose()
}

/// Issues a key for `tenant_id` named `name`; returns it (shown once) and its id.
pub async fn create_key(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    name: &str,
) -> Result<(String, Uuid)> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(Error::Invalid(
            "a key's name must be 1 to 100 characters".into(),
        ));
    }
    tenants::insert_api_key(conn, tenant_id, name).await
}

/// The one key that `key_or_prefix` names (owner role): the whole key, or a prefix of it that
/// only one key has.
pub async fn find_key(admin: &PgPool, key_or_prefix: &str) -> Result<KeyInfo> {
    let needle = key_or_prefix.trim();
    let rows = if needle.len() == API_KEY_PREFIX.len() + 64 {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
              WHERE k.key_hash = $1"
        ))
        .bind(tenants::hash_api_key(needle))
        .fetch_all(admin)
        .await?
    } else {
        if needle.len() < API_KEY_PREFIX.len() + 4 || !needle.starts_with(API_KEY_PREFIX) {
            return Err(Error::Invalid(format!(
                "name a key by the whole key or its prefix as listed ({API_KEY_PREFIX}…, at least 4 characters after it)"
            )));
        }
        // The stored prefix is the key's first characters: a shorter needle starts it, a
        // longer one starts with it.
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
              WHERE starts_with(k.prefix, $1) OR starts_with($1, k.prefix)"
        ))
        .bind(needle)
        .fetch_all(admin)
        .await?
    };
    let mut keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
    match keys.len() {
        0 => Err(Error::NotFound(format!("no key matches {needle:?}"))),
        1 => Ok(keys.remove(0)),
        n => Err(Error::Invalid(format!(
            "{n} keys match {needle:?} ({}); give the whole key",
            keys.iter()
                .map(|k| format!("{} of {}", k.prefix, k.tenant))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Revokes a key at once. Revoking a revoked key changes nothing. Returns whether the
/// connection could see the key.
pub async fn revoke(conn: &mut PgConnection, key_id: Uuid) -> Result<bool> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now()
          WHERE id = $1 AND (revoked_at IS NULL OR revoked_at > now())",
    )
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    Ok(key_by_id(conn, key_id).await?.is_some())
}

/// Rotates a key: a new key with the old one's name and limits, while the old one keeps working
/// for `grace_secs` more (0: it stops at once). Returns the new key, shown once, and its id.
/// Run it in a transaction: it is several statements.
pub async fn rotate(
    conn: &mut PgConnection,
    key_id: Uuid,
    grace_secs: u64,
) -> Result<(String, Uuid)> {
    let old = sqlx::query(
        "SELECT tenant_id, name FROM api_keys
          WHERE id = $1 AND (revoked_at IS NULL OR revoked_at > now())
            AND (expires_at IS NULL OR expires_at > now()) AND replaced_by IS NULL
          FOR UPDATE",
    )
    .bind(key_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| Error::NotFound("no active key with that id; issue a new one".into()))?;
    let tenant_id: Uuid = old.try_get(0)?;
    let name: String = old.try_get(1)?;
    let (key, new_id) = tenants::insert_api_key(&mut *conn, tenant_id, &name).await?;
    sqlx::query(
        "UPDATE api_keys n SET requests_per_minute = o.requests_per_minute,
                tokens_per_minute = o.tokens_per_minute, max_concurrent = o.max_concurrent,
                allowed_models = o.allowed_models, expires_at = o.expires_at
           FROM api_keys o WHERE n.id = $1 AND o.id = $2",
    )
    .bind(new_id)
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    let grace = i64::try_from(grace_secs)
        .unwrap_or(i64::MAX)
        .min(366 * 86_400);
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now() + make_interval(secs => $2), replaced_by = $3
          WHERE id = $1",
    )
    .bind(key_id)
    .bind(grace as f64)
    .bind(new_id)
    .execute(&mut *conn)
    .await?;
    Ok((key, new_id))
}

/// Sets a key's own limits and expiry (owner role); they apply within moments on every edge.
pub async fn set_key_limits(
    admin: &PgPool,
    key_id: Uuid,
    limits: &Limits,
    expires_at_ms: Option<i64>,
) -> Result<()> {
    let problems = limits.validate();
    if limits.monthly_tokens.is_some() {
        return Err(Error::Invalid(
            "a monthly token budget belongs to the tenant's plan, not to a key".into(),
        ));
    }
    if !problems.is_empty() {
        return Err(Error::Invalid(problems.join("; ")));
    }
    let column = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
    sqlx::query(
        "UPDATE api_keys SET requests_per_minute = $2, tokens_per_minute = $3, max_concurrent = $4,
                allowed_models = $5,
                expires_at = CASE WHEN $6::bigint IS NULL THEN NULL ELSE to_timestamp($6::bigint / 1000.0) END
          WHERE id = $1",
    )
    .bind(key_id)
    .bind(column(limits.requests_per_minute))
    .bind(column(limits.tokens_per_minute))
    .bind(column(limits.max_concurrent))
    .bind(&limits.allowed_models)
    .bind(expires_at_ms)
    .execute(admin)
    .await?;
    Ok(())
}
