//! Tenants and their API keys. Keys are stored as their SHA-256 only; the key itself is shown
//! once, when it is made.

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use super::tenant_transaction;
use crate::{Error, Result};

/// Prefix of every Sluice API key, so leaked keys are recognisable.
pub const API_KEY_PREFIX: &str = "sk-sluice-";

/// A tenant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub status: String,
}

impl Tenant {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self> {
        Ok(Self {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            status: row.try_get(2)?,
        })
    }
}

/// A new random API key: the prefix and 32 random bytes in hex.
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{API_KEY_PREFIX}{}", hex::encode(bytes))
}

/// The stored form of a key: SHA-256, hex. Keys carry 256 random bits, so a fast hash is safe.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates a tenant and its first API key (owner role). Returns the tenant and the key, which
/// is shown once and never stored.
pub async fn create_tenant(admin: &PgPool, name: &str) -> Result<(Tenant, String)> {
    let mut tx = admin.begin().await?;
    let created = insert_tenant(&mut tx, Uuid::new_v4(), name).await?;
    tx.commit().await?;
    Ok(created)
}

/// Creates tenant `id` and its first API key in `conn`: the owner role's transaction, or the
/// runtime role's in the new tenant's row-level security (see
/// [`tenant_transaction`](super::tenant_transaction)). Returns the tenant and the key (shown
/// once).
pub async fn insert_tenant(
    conn: &mut PgConnection,
    id: Uuid,
    name: &str,
) -> Result<(Tenant, String)> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(Error::Invalid(
            "tenant name must be 1 to 200 characters".into(),
        ));
    }
    let row = sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id, name, status")
        .bind(id)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::Invalid(format!("a tenant named {name:?} already exists")))?;
    let tenant = Tenant::from_row(&row)?;
    let (key, _) = insert_api_key(conn, tenant.id, "default").await?;
    Ok((tenant, key))
}

/// A tenant as the platform's operators see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TenantSummary {
    pub id: Uuid,
    pub name: String,
    /// `active`, `suspended` or `deleted`.
    pub status: String,
    /// Its plan's name; none: no limits.
    pub plan: Option<String>,
    pub created_at_ms: i64,
}

/// Every tenant (runtime role, through `sluice_platform_tenants`: for platform admins only).
pub async fn platform_tenants(app: &PgPool) -> Result<Vec<TenantSummary>> {
    let rows = sqlx::query(
        "SELECT id, name, status, plan, (extract(epoch FROM created_at) * 1000)::bigint
           FROM sluice_platform_tenants()",
    )
    .fetch_all(app)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(TenantSummary {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                status: row.try_get(2)?,
                plan: row.try_get(3)?,
                created_at_ms: row.try_get(4)?,
            })
        })
        .collect()
}

/// Issues another API key for a tenant (owner role).
pub async fn create_api_key(admin: &PgPool, tenant_id: Uuid, name: &str) -> Result<String> {
    let mut tx = admin.begin().await?;
    let (key, _) = insert_api_key(&mut tx, tenant_id, name).await?;
    tx.commit().await?;
    Ok(key)
}

/// Issues a key in `tx`: returns the key (shown once) and its id.
pub(crate) async fn insert_api_key(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    name: &str,
) -> Result<(String, Uuid)> {
    let key = generate_api_key();
    let id = sqlx::query_scalar(
        "INSERT INTO api_keys (tenant_id, key_hash, prefix, name) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(tenant_id)
    .bind(hash_api_key(&key))
    .bind(&key[..API_KEY_PREFIX.len() + 6])
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok((key, id))
}

/// Finds a tenant by name (owner role), for administrative commands.
pub async fn find_tenant(admin: &PgPool, name: &str) -> Result<Option<Tenant>> {
    let row = sqlx::query("SELECT id, name, status FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(admin)
        .await?;
    row.as_ref().map(Tenant::from_row).transpose()
}

/// Deletes a tenant (the owner role, or the runtime role in the tenant's transaction): it and
/// every key and session of it stop working at once; its rows stay until
/// [`purge_deleted`] removes them. Returns whether the tenant was active or suspended before.
pub async fn delete_tenant(conn: &mut PgConnection, tenant_id: Uuid) -> Result<bool> {
    let deleted = sqlx::query(
        "UPDATE tenants SET status = 'deleted', deleted_at = now() WHERE id = $1 AND status <> 'deleted'",
    )
    .bind(tenant_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now()
          WHERE tenant_id = $1 AND (revoked_at IS NULL OR revoked_at > now())",
    )
    .bind(tenant_id)
    .execute(conn)
    .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Removes the control-plane rows of tenants deleted more than `older_than_days` ago (owner
/// role): the tenant, its keys, subscription, users and sessions. Audit entries stay, with the
/// tenant's id; usage facts in ClickHouse stay for invoicing. Returns their names.
pub async fn purge_deleted(admin: &PgPool, older_than_days: u32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "DELETE FROM tenants WHERE status = 'deleted'
            AND deleted_at < now() - make_interval(days => $1) RETURNING name",
    )
    .bind(i32::try_from(older_than_days).unwrap_or(i32::MAX))
    .fetch_all(admin)
    .await?)
}

/// The calling tenant's own record, read through row-level security (no tenant filter in the
/// query: the policy is the filter).
pub async fn current_tenant(app: &PgPool, tenant_id: Uuid) -> Result<Option<Tenant>> {
    let mut tx = tenant_transaction(app, tenant_id).await?;
    let rows = sqlx::query("SELECT id, name, status FROM tenants")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut tenants = rows
        .iter()
        .map(Tenant::from_row)
        .collect::<Result<Vec<_>>>()?;
    if tenants.len() > 1 {
        return Err(Error::Corrupt(
            "row-level security is not in force for this role".into(),
        ));
    }
    Ok(tenants.pop())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hash_stably() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX));
        assert_eq!(a.len(), API_KEY_PREFIX.len() + 64);
        assert_eq!(hash_api_key(&a), hash_api_key(&a));
        assert_ne!(hash_api_key(&a), hash_api_key(&b));
        assert_eq!(hash_api_key(&a).len(), 64);
    }
}
