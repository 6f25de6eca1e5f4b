//! The PostgreSQL control plane: every migration, the row-level-security helper, and the
//! queries over the control plane's tables.
//!
//! Two roles: the owner (`sluice`) runs migrations and administrative commands (`sluice tenant
//! create`); the runtime role (`sluice_app`) is subject to row-level security, and every
//! tenant-scoped query runs in a transaction that names its tenant ([`tenant_transaction`]), so
//! a query that forgets its tenant filter still sees only that tenant's rows.

pub mod audit;
pub mod business;
pub mod claims;
pub mod flags;
pub mod followed;
pub mod keys;
pub mod knowledge;
pub mod memory;
pub mod models;
pub mod origins;
pub mod plans;
pub mod registry;
pub mod tenants;
pub mod tools;
pub mod users;
pub mod webhooks;
pub mod workflow_runs;
pub mod workflows;

use sha2::{Digest, Sha256};
use sqlx::{postgres::PgPoolOptions, types::Uuid, PgPool, Postgres, Transaction};

use crate::{Error, Result};

/// One schema change, applied once, in order.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, oldest first. A migration never changes once released: add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "control_plane",
        sql: include_str!("../../migrations/0001_control_plane.sql"),
    },
    Migration {
        version: 2,
        name: "plans_and_key_lifecycle",
        sql: include_str!("../../migrations/0002_plans_and_key_lifecycle.sql"),
    },
    Migration {
        version: 3,
        name: "users_sessions_audit",
        sql: include_str!("../../migrations/0003_users_sessions_audit.sql"),
    },
    Migration {
        version: 4,
        name: "tenant_deletion",
        sql: include_str!("../../migrations/0004_tenant_deletion.sql"),
    },
    Migration {
        version: 5,
        name: "flags_and_registries",
        sql: include_str!("../../migrations/0005_flags_and_registries.sql"),
    },
    Migration {
        version: 6,
        name: "hardening",
        sql: include_str!("../../migrations/0006_hardening.sql"),
    },
    Migration {
        version: 7,
        name: "drop_key_only_authentication",
        sql: include_str!("../../migrations/0007_drop_key_only_authentication.sql"),
    },
    Migration {
        version: 8,
        name: "cors_origins",
        sql: include_str!("../../migrations/0008_cors_origins.sql"),
    },
    Migration {
        version: 9,
        name: "platform_admin",
        sql: include_str!("../../migrations/0009_platform_admin.sql"),
    },
    Migration {
        version: 10,
        name: "billing",
        sql: include_str!("../../migrations/0010_billing.sql"),
    },
    Migration {
        version: 11,
        name: "spend_budgets",
        sql: include_str!("../../migrations/0011_spend_budgets.sql"),
    },
    Migration {
        version: 12,
        name: "webhooks",
        sql: include_str!("../../migrations/0012_webhooks.sql"),
    },
    Migration {
        version: 13,
        name: "business_data",
        sql: include_str!("../../migrations/0013_business_data.sql"),
    },
    Migration {
        version: 14,
        name: "workflow_registry",
        sql: include_str!("../../migrations/0014_workflow_registry.sql"),
    },
    Migration {
        version: 15,
        name: "conversation_memory",
        sql: include_str!("../../migrations/0015_conversation_memory.sql"),
    },
    Migration {
        version: 16,
        name: "knowledge",
        sql: include_str!("../../migrations/0016_knowledge.sql"),
    },
    Migration {
        version: 17,
        name: "workflow_runs",
        sql: include_str!("../../migrations/0017_workflow_runs.sql"),
    },
];

/// A pool for `url` that connects when first used (so a process starts while PostgreSQL is
/// down), waiting at most `acquire` for a connection.
pub fn connect_lazy(
    url: &str,
    max_connections: u32,
    acquire: std::time::Duration,
) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire)
        .connect_lazy(url)?)
}

/// Connects a pool to `url`.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await?)
}

/// Applies every migration not yet applied (safe to run concurrently: an advisory lock
/// serialises runners), then makes what the schema needs but cannot make itself (the access
/// tokens' signing key). Returns the versions applied now.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice-migrations'))")
        .execute(&mut *conn)
        .await?;
    let mut result = apply_migrations(&mut conn).await;
    if result.is_ok() {
        if let Err(e) = users::ensure_signing_key(pool).await {
            result = Err(e);
        }
    }
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
                return Err(Error::Corrupt(format!(
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

/// A connection listening on `channel`, made once PostgreSQL answers (retrying every second);
/// `None` if `cancel` fires first. `what` names the changes, for the log.
pub async fn listen(
    app: &PgPool,
    channel: &str,
    what: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<sqlx::postgres::PgListener> {
    loop {
        let error = match sqlx::postgres::PgListener::connect_with(app).await {
            Ok(mut listener) => match listener.listen(channel).await {
                Ok(()) => return Some(listener),
                Err(error) => error,
            },
            Err(error) => error,
        };
        tracing::warn!(%error, "cannot listen for {what}; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// A transaction in which row-level security shows only `tenant_id`'s rows. Every read or
/// write of tenant-owned rows by the runtime role goes through one.
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
