//! The PostgreSQL control plane: migrations, tenants, hashed API keys and the model catalogue.
//!
//! Two roles: the owner runs migrations and administrative commands (`sluice tenant create`);
//! the runtime role (`sluice_app`) is subject to row-level security, and every tenant-scoped
//! query runs in a transaction that names its tenant ([`tenant_transaction`]).

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{postgres::PgPoolOptions, types::Uuid, PgPool, Postgres, Row, Transaction};

use crate::{Error, Result};

/// One schema change, applied once, in order.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "control_plane",
    sql: include_str!("../migrations/0001_control_plane.sql"),
}];

/// The model name that asks the router to choose a model.
pub const AUTO_MODEL: &str = "auto";

/// Prefix of every Sluice API key, so leaked keys are recognisable.
pub const API_KEY_PREFIX: &str = "sk-sluice-";

/// Connects a pool to `url`.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await?)
}

/// Applies every migration not yet applied (safe to run concurrently: an advisory lock
/// serialises runners). Returns the versions applied now.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice-migrations'))")
        .execute(&mut *conn)
        .await?;
    let result = apply_migrations(&mut conn).await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext('sluice-migrations'))")
        .execute(&mut *conn)
        .await?;
    result
}

async fn apply_migrations(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS sluice_migrations (
            version bigint PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await?;
    let mut applied_now = Vec::new();
    for migration in MIGRATIONS {
        let checksum = hex::encode(Sha256::digest(migration.sql.as_bytes()));
        let existing: Option<String> =
            sqlx::query_scalar("SELECT checksum FROM sluice_migrations WHERE version = $1")
                .bind(migration.version)
                .fetch_optional(&mut *conn)
                .await?;
        match existing {
            Some(found) if found == checksum => continue,
            Some(_) => {
                return Err(Error::Config(format!(
                    "migration {} ({}) changed after it was applied; add a new migration instead",
                    migration.version, migration.name
                )))
            }
            None => {}
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO sluice_migrations (version, name, checksum) VALUES ($1, $2, $3)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(&checksum)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied_now.push(migration.version);
    }
    Ok(applied_now)
}

/// A tenant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub status: String,
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
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(Error::Invalid(
            "tenant name must be 1 to 200 characters".into(),
        ));
    }
    let mut tx = admin.begin().await?;
    let row = sqlx::query("INSERT INTO tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id, name, status")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::Invalid(format!("a tenant named {name:?} already exists")))?;
    let tenant = Tenant {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        status: row.try_get(2)?,
    };
    let key = insert_api_key(&mut tx, tenant.id, "default").await?;
    tx.commit().await?;
    Ok((tenant, key))
}

/// Issues another API key for a tenant (owner role).
pub async fn create_api_key(admin: &PgPool, tenant_id: Uuid, name: &str) -> Result<String> {
    let mut tx = admin.begin().await?;
    let key = insert_api_key(&mut tx, tenant_id, name).await?;
    tx.commit().await?;
    Ok(key)
}

async fn insert_api_key(
    tx: &mut Transaction<'_, Postgres>,
    tenant_id: Uuid,
    name: &str,
) -> Result<String> {
    let key = generate_api_key();
    sqlx::query("INSERT INTO api_keys (tenant_id, key_hash, prefix, name) VALUES ($1, $2, $3, $4)")
        .bind(tenant_id)
        .bind(hash_api_key(&key))
        .bind(&key[..API_KEY_PREFIX.len() + 6])
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(key)
}

/// Finds a tenant by name (owner role), for administrative commands.
pub async fn find_tenant(admin: &PgPool, name: &str) -> Result<Option<Tenant>> {
    let row = sqlx::query("SELECT id, name, status FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(admin)
        .await?;
    row.map(|row| {
        Ok(Tenant {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            status: row.try_get(2)?,
        })
    })
    .transpose()
}

/// The tenant an API key belongs to, if the key is valid and not revoked.
pub async fn authenticate(app: &PgPool, key: &str) -> Result<Option<Uuid>> {
    if !key.starts_with(API_KEY_PREFIX) {
        return Ok(None);
    }
    Ok(sqlx::query_scalar("SELECT sluice_authenticate($1)")
        .bind(hash_api_key(key))
        .fetch_one(app)
        .await?)
}

/// A transaction in which row-level security shows only `tenant_id`'s rows.
pub async fn tenant_transaction(
    app: &PgPool,
    tenant_id: Uuid,
) -> Result<Transaction<'static, Postgres>> {
    let mut tx = app.begin().await?;
    sqlx::query("SELECT set_config('sluice.tenant_id', $1, true)")
        .bind(tenant_id.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The calling tenant's own record, read through row-level security (no tenant filter in the
/// query: the policy is the filter).
pub async fn current_tenant(app: &PgPool, tenant_id: Uuid) -> Result<Option<Tenant>> {
    let mut tx = tenant_transaction(app, tenant_id).await?;
    let rows = sqlx::query("SELECT id, name, status FROM tenants")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut tenants = Vec::with_capacity(rows.len());
    for row in rows {
        tenants.push(Tenant {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            status: row.try_get(2)?,
        });
    }
    if tenants.len() > 1 {
        return Err(Error::Config(
            "row-level security is not in force for this role".into(),
        ));
    }
    Ok(tenants.pop())
}

/// A model in the catalogue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub provider: String,
    pub upstream_model: String,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub context_window: i32,
    pub input_price_micros: i64,
    pub output_price_micros: i64,
    pub created_at: i64,
}

/// Every enabled model, cheapest first.
pub async fn enabled_models(pool: &PgPool) -> Result<Vec<ModelSpec>> {
    let rows = sqlx::query(
        "SELECT name, provider, upstream_model, base_url, api_key_env, context_window, \
                input_price_micros, output_price_micros, extract(epoch from created_at)::bigint \
           FROM models WHERE enabled ORDER BY input_price_micros + output_price_micros, name",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(ModelSpec {
                name: row.try_get(0)?,
                provider: row.try_get(1)?,
                upstream_model: row.try_get(2)?,
                base_url: row.try_get(3)?,
                api_key_env: row.try_get(4)?,
                context_window: row.try_get(5)?,
                input_price_micros: row.try_get(6)?,
                output_price_micros: row.try_get(7)?,
                created_at: row.try_get(8)?,
            })
        })
        .collect()
}

/// Adds or replaces a model in the catalogue (owner role).
pub async fn upsert_model(admin: &PgPool, model: &ModelSpec) -> Result<()> {
    sqlx::query(
        "INSERT INTO models (name, provider, upstream_model, base_url, api_key_env, context_window, \
                             input_price_micros, output_price_micros, enabled) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true) \
         ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider, upstream_model = EXCLUDED.upstream_model, \
             base_url = EXCLUDED.base_url, api_key_env = EXCLUDED.api_key_env, context_window = EXCLUDED.context_window, \
             input_price_micros = EXCLUDED.input_price_micros, output_price_micros = EXCLUDED.output_price_micros, enabled = true",
    )
    .bind(&model.name)
    .bind(&model.provider)
    .bind(&model.upstream_model)
    .bind(&model.base_url)
    .bind(&model.api_key_env)
    .bind(model.context_window)
    .bind(model.input_price_micros)
    .bind(model.output_price_micros)
    .execute(admin)
    .await?;
    Ok(())
}

/// Disables a model (owner role); callers get 404 for it once catalogues refresh.
pub async fn disable_model(admin: &PgPool, name: &str) -> Result<bool> {
    let result = sqlx::query("UPDATE models SET enabled = false WHERE name = $1 AND enabled")
        .bind(name)
        .execute(admin)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// The model catalogue, held in memory and refreshed from PostgreSQL in the background, so the
/// request path never waits on the database for it.
pub struct ModelCatalog {
    pool: PgPool,
    models: std::sync::RwLock<std::sync::Arc<Vec<ModelSpec>>>,
}

impl ModelCatalog {
    /// Loads the catalogue once.
    pub async fn load(pool: PgPool) -> Result<std::sync::Arc<Self>> {
        let models = enabled_models(&pool).await?;
        Ok(std::sync::Arc::new(Self {
            pool,
            models: std::sync::RwLock::new(std::sync::Arc::new(models)),
        }))
    }

    /// The models as of the last refresh, cheapest first.
    pub fn snapshot(&self) -> std::sync::Arc<Vec<ModelSpec>> {
        self.models
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// The enabled model called `name`.
    pub fn find(&self, name: &str) -> Option<ModelSpec> {
        self.snapshot().iter().find(|m| m.name == name).cloned()
    }

    /// Reloads from PostgreSQL.
    pub async fn refresh(&self) -> Result<()> {
        let fresh = std::sync::Arc::new(enabled_models(&self.pool).await?);
        if let Ok(mut models) = self.models.write() {
            *models = fresh;
        }
        Ok(())
    }

    /// Refreshes every `every` until `cancel` fires; failures keep the last good catalogue.
    pub async fn refresh_every(
        self: std::sync::Arc<Self>,
        every: std::time::Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "model catalogue refresh failed; keeping the last one");
            }
        }
    }
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
