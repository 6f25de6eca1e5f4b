//! Users, roles and login sessions. Passwords are argon2id hashes; sessions are refresh tokens
//! kept as their SHA-256 and rotated on every use, a reused token revoking its whole family.
//! Before a tenant is known (login, registration, refresh) the runtime role goes through the
//! narrow SECURITY DEFINER functions of migration 3; members are read and added under the
//! tenant's row-level security.

use argon2::{
    password_hash::{phc::PasswordHash, PasswordHasher, PasswordVerifier},
    Argon2,
};
use rand::RngCore;
use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use crate::{Error, Result};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs Sluice: every tenant.
    PlatformAdmin,
    /// Manages its tenant: keys, members, the audit log.
    TenantAdmin,
    /// Uses the API.
    Member,
}

impl Role {
    /// The name stored and sent in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Member => "member",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "platform_admin" => Ok(Role::PlatformAdmin),
            "tenant_admin" => Ok(Role::TenantAdmin),
            "member" => Ok(Role::Member),
            other => Err(Error::Invalid(format!(
                "{other:?} is not a role: platform_admin, tenant_admin or member"
            ))),
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::parse(name)
    }
}

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;

/// Checks an email and a password before anything is stored.
pub fn check_credentials(email: &str, password: &str) -> Result<()> {
    let email = email.trim();
    let at = email.find('@');
    if !at.is_some_and(|at| at > 0 && at < email.len() - 1) || email.len() > 254 {
        return Err(Error::Invalid(format!("{email:?} is not an email address")));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > 1024 {
        return Err(Error::Invalid(format!(
            "a password must be {MIN_PASSWORD_CHARS} to 1024 characters"
        )));
    }
    Ok(())
}

/// The argon2id hash of `password` (a PHC string with its own salt). Slow on purpose: call it
/// off the async threads.
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let hash: PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| Error::Corrupt(format!("password hashing: {e}")))?;
    Ok(hash.to_string())
}

/// Whether `password` matches `hash`. Slow on purpose: call it off the async threads.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A user as login finds them.
#[derive(Debug, Clone)]
pub struct LoginUser {
    pub id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub role: Role,
    pub password_hash: String,
}

/// The active user with this email, if any (runtime role).
pub async fn user_for_login(app: &PgPool, email: &str) -> Result<Option<LoginUser>> {
    let row = sqlx::query(
        "SELECT user_id, tenant_id, role, password_hash FROM sluice_user_for_login($1)",
    )
    .bind(email.trim())
    .fetch_optional(app)
    .await?;
    row.map(|row| {
        let role: String = row.try_get(2)?;
        Ok(LoginUser {
            id: row.try_get(0)?,
            tenant_id: row.try_get(1)?,
            role: Role::parse(&role)?,
            password_hash: row.try_get(3)?,
        })
    })
    .transpose()
}

fn taken(e: sqlx::Error, what: &str) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Error::Invalid(format!("{what} is already taken"))
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23514") => {
            Error::Invalid(format!("{what}: {}", db.message()))
        }
        _ => Error::Postgres(e),
    }
}

/// Registers a new tenant and its first admin (runtime role), subscribed to `plan` when one is
/// named: returns the tenant's and the user's ids.
pub async fn register(
    app: &PgPool,
    tenant: &str,
    email: &str,
    password_hash: &str,
    plan: Option<&str>,
) -> Result<(Uuid, Uuid)> {
    let tenant = tenant.trim();
    if tenant.is_empty() || tenant.len() > 200 {
        return Err(Error::Invalid(
            "tenant name must be 1 to 200 characters".into(),
        ));
    }
    let query = match plan {
        Some(_) => "SELECT tenant_id, user_id FROM sluice_register_on_plan($1, $2, $3, $4)",
        None => "SELECT tenant_id, user_id FROM sluice_register($1, $2, $3)",
    };
    let mut query = sqlx::query(query)
        .bind(tenant)
        .bind(email.trim())
        .bind(password_hash);
    if let Some(plan) = plan {
        query = query.bind(plan);
    }
    let row = query
        .fetch_one(app)
        .await
        .map_err(|e| taken(e, "that tenant name or email"))?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// A member of a tenant, as its admins see them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Member {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub disabled: bool,
}

/// The tenant's members (in the tenant's transaction, or as the owner with `tenant_id`).
pub async fn list_members(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<Member>> {
    let rows = sqlx::query(
        "SELECT id, email, role, (extract(epoch FROM created_at) * 1000)::bigint, disabled_at IS NOT NULL
           FROM users WHERE tenant_id = $1 ORDER BY created_at, email",
    )
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            let role: String = row.try_get(2)?;
            Ok(Member {
                id: row.try_get(0)?,
                email: row.try_get(1)?,
                role: Role::parse(&role)?,
                created_at_ms: row.try_get(3)?,
                disabled: row.try_get(4)?,
            })
        })
        .collect()
}

/// Adds a user to a tenant (`None`: a platform admin, owner role only). Returns its id.
pub async fn add_user(
    conn: &mut PgConnection,
    tenant_id: Option<Uuid>,
    email: &str,
    password_hash: &str,
    role: Role,
) -> Result<Uuid> {
    if (role == Role::PlatformAdmin) != tenant_id.is_none() {
        return Err(Error::Invalid(
            "a platform admin belongs to no tenant; every other user to one".into(),
        ));
    }
    sqlx::query_scalar(
        "INSERT INTO users (tenant_id, email, password_hash, role) VALUES ($1, lower($2), $3, $4) RETURNING id",
    )
    .bind(tenant_id)
    .bind(email.trim())
    .bind(password_hash)
    .bind(role.as_str())
    .fetch_one(conn)
    .await
    .map_err(|e| taken(e, "that email"))
}

/// A new login session for `user_id`, valid until `expires_at_ms`.
pub async fn start_session(
    app: &PgPool,
    user_id: Uuid,
    token_hash: &str,
    expires_at_ms: i64,
) -> Result<()> {
    sqlx::query("SELECT sluice_session_start($1, $2, to_timestamp($3::bigint / 1000.0))")
        .bind(user_id)
        .bind(token_hash)
        .bind(expires_at_ms)
        .execute(app)
        .await?;
    Ok(())
}

/// What a refresh token's rotation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The session goes on under the new token.
    Rotated {
        user_id: Uuid,
        tenant_id: Option<Uuid>,
        role: Role,
        email: String,
    },
    /// Unknown, expired, revoked, or its user or tenant is disabled.
    Invalid,
    /// Used before: the whole session is revoked.
    Reused,
}

/// Uses up the session of `old_hash` and continues it under `new_hash`.
pub async fn rotate_session(
    app: &PgPool,
    old_hash: &str,
    new_hash: &str,
    expires_at_ms: i64,
) -> Result<Rotation> {
    let row = sqlx::query(
        "SELECT outcome, user_id, tenant_id, role, email
           FROM sluice_session_rotate($1, $2, to_timestamp($3::bigint / 1000.0))",
    )
    .bind(old_hash)
    .bind(new_hash)
    .bind(expires_at_ms)
    .fetch_one(app)
    .await?;
    let outcome: String = row.try_get(0)?;
    Ok(match outcome.as_str() {
        "ok" => {
            let role: String = row.try_get(3)?;
            Rotation::Rotated {
                user_id: row.try_get(1)?,
                tenant_id: row.try_get(2)?,
                role: Role::parse(&role)?,
                email: row.try_get(4)?,
            }
        }
        "reused" => Rotation::Reused,
        _ => Rotation::Invalid,
    })
}

/// Ends the session `token_hash` belongs to; whether it was known.
pub async fn end_session(app: &PgPool, token_hash: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT sluice_session_end($1)")
        .bind(token_hash)
        .fetch_one(app)
        .await?)
}

/// The keys access tokens are signed with, newest first: (key id, secret).
pub async fn signing_keys(app: &PgPool) -> Result<Vec<(String, Vec<u8>)>> {
    let rows = sqlx::query("SELECT kid, secret FROM sluice_token_signing_keys()")
        .fetch_all(app)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Makes a signing key if there is none (owner role; `sluice migrate` calls it).
pub async fn ensure_signing_key(admin: &PgPool) -> Result<()> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let kid = format!("k{}", &hex::encode(&secret[..4]));
    let mut key = [0u8; 64];
    rand::rng().fill_bytes(&mut key);
    sqlx::query(
        "INSERT INTO token_signing_keys (kid, secret)
         SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM token_signing_keys)",
    )
    .bind(kid)
    .bind(key.to_vec())
    .execute(admin)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse battery"));
        assert!(!verify_password(&hash, "correct horse battery!"));
        assert!(!verify_password("not a hash", "correct horse battery"));
        assert_ne!(
            hash,
            hash_password("correct horse battery").unwrap(),
            "salted"
        );
    }

    #[test]
    fn credentials_are_checked_before_anything_is_stored() {
        assert!(check_credentials("ann@example.com", "long enough pw").is_ok());
        assert!(check_credentials("ann", "long enough pw").is_err());
        assert!(check_credentials("@example.com", "long enough pw").is_err());
        assert!(check_credentials("ann@example.com", "short").is_err());
        assert_eq!(Role::parse("member").unwrap(), Role::Member);
        assert!(Role::parse("root").is_err());
    }
}
