//! Users' sessions: a login gives a short-lived access token (a JWT, HS256, signed with a key
//! every edge reads from PostgreSQL, so any edge accepts any edge's tokens) and a refresh token
//! (random, stored as its SHA-256, rotated on every use; a refresh token used twice ends its
//! whole session, since someone else holds a copy). Logout ends the session: its refresh
//! tokens stop working at once, its access tokens at their expiry (`edge.access_token_secs`).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sluice_stores::postgres::{tenants, users::Role};
use sqlx::types::Uuid;

use crate::error::ApiError;

/// Prefix of every refresh token, so a leaked one is recognisable.
pub const REFRESH_PREFIX: &str = "sr-sluice-";

/// What an access token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    /// The user's tenant; none for a platform admin.
    pub tid: Option<Uuid>,
    pub role: String,
    pub email: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
}

impl Claims {
    /// The user's role.
    pub fn role(&self) -> Result<Role, ApiError> {
        Role::parse(&self.role)
            .map_err(|_| ApiError::unauthorized("The access token names an unknown role."))
    }

    /// Who acts, as the audit log names a user: `user:<email>`.
    pub fn actor(&self) -> String {
        format!("user:{}", self.email)
    }
}

const ISSUER: &str = "sluice";

/// Signs and checks access tokens.
pub struct TokenKeys {
    /// Newest first: the first signs, all verify (so tokens survive a key being added).
    keys: Vec<(String, EncodingKey, DecodingKey)>,
    access_ttl: Duration,
}

impl TokenKeys {
    /// Keys as `(kid, secret)`, newest first; tokens live `access_ttl`.
    pub fn new(keys: &[(String, Vec<u8>)], access_ttl: Duration) -> crate::Result<Self> {
        if keys.is_empty() {
            return Err(crate::Error::Store(sluice_stores::Error::Corrupt(
                "no access-token signing key: run `sluice migrate`".into(),
            )));
        }
        let bad_key = |e: jsonwebtoken::errors::Error| {
            crate::Error::Store(sluice_stores::Error::Corrupt(format!(
                "an access-token signing key is unusable: {e}"
            )))
        };
        let keys = keys
            .iter()
            .map(|(kid, secret)| {
                Ok((
                    kid.clone(),
                    EncodingKey::from_secret(secret).map_err(bad_key)?,
                    DecodingKey::from_secret(secret).map_err(bad_key)?,
                ))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Self { keys, access_ttl })
    }

    /// Seconds an access token lives.
    pub fn access_ttl_secs(&self) -> u64 {
        self.access_ttl.as_secs()
    }

    /// An access token for the user.
    pub fn issue(
        &self,
        user: Uuid,
        tenant: Option<Uuid>,
        role: Role,
        email: &str,
    ) -> Result<String, ApiError> {
        let now = sluice_pipelines::now_ms() / 1000;
        let claims = Claims {
            sub: user,
            tid: tenant,
            role: role.as_str().to_owned(),
            email: email.to_owned(),
            iat: now,
            exp: now + i64::try_from(self.access_ttl.as_secs()).unwrap_or(900),
            iss: ISSUER.to_owned(),
        };
        let (kid, key, _) = self
            .keys
            .first()
            .ok_or_else(|| ApiError::internal("signing access tokens", "no signing key"))?;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| ApiError::internal("signing an access token", e))
    }

    /// The claims of a valid, unexpired access token.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let invalid = || ApiError::unauthorized("Invalid or expired access token.");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        let (_, _, key) = self
            .keys
            .iter()
            .find(|(kid, _, _)| Some(kid) == header.kid.as_ref())
            .ok_or_else(invalid)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|_| invalid())
    }
}

/// A new refresh token and its stored hash.
pub fn new_refresh_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("{REFRESH_PREFIX}{}", hex::encode(bytes));
    let hash = tenants::hash_api_key(&token);
    (token, hash)
}

/// Whether a bearer token looks like an access token (three dot-separated parts) rather than
/// an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && !token.starts_with(tenants::API_KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_their_key_and_not_once_altered_or_expired() {
        let keys = TokenKeys::new(&[("k1".into(), vec![7; 64])], Duration::from_secs(60)).unwrap();
        let (user, tenant) = (Uuid::new_v4(), Uuid::new_v4());
        let token = keys
            .issue(user, Some(tenant), Role::Member, "m@example.com")
            .unwrap();
        assert!(looks_like_jwt(&token));
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.sub, claims.tid), (user, Some(tenant)));
        assert_eq!(claims.role().unwrap(), Role::Member);
        let mut altered = token.clone();
        altered.push('x');
        assert!(keys.verify(&altered).is_err());
        let other = TokenKeys::new(&[("k1".into(), vec![8; 64])], Duration::from_secs(60)).unwrap();
        assert!(other.verify(&token).is_err(), "another secret");
        let expired = TokenKeys::new(&[("k1".into(), vec![7; 64])], Duration::ZERO).unwrap();
        let old = expired
            .issue(user, None, Role::PlatformAdmin, "p@example.com")
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let mut strict = Validation::new(Algorithm::HS256);
        strict.leeway = 0;
        strict.set_issuer(&[ISSUER]);
        assert!(
            jsonwebtoken::decode::<Claims>(
                &old,
                &DecodingKey::from_secret(&[7; 64]).unwrap(),
                &strict
            )
            .is_err(),
            "expired"
        );
        let (refresh, hash) = new_refresh_token();
        assert!(refresh.starts_with(REFRESH_PREFIX));
        assert_eq!(hash, tenants::hash_api_key(&refresh));
        assert!(!looks_like_jwt(&refresh));
    }
}
