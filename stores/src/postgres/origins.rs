//! The browser origins a tenant's credentials may be used from (CORS): each tenant's list, kept
//! by its admins, and every active tenant's lists at once for the edges ([`OriginSettings`],
//! followed live on `sluice_origins`).

use std::collections::{HashMap, HashSet};

use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use super::followed::{Followed, Snapshot};
use crate::{Error, Result};

/// The channel origin changes are announced on.
pub const ORIGINS_CHANNEL: &str = "sluice_origins";

/// The entry that allows every origin.
pub const ANY_ORIGIN: &str = "*";

/// A tenant's list holds at most this many origins.
pub const MAX_ORIGINS: usize = 100;

/// Every active tenant's origins at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginSettings {
    tenants: HashMap<Uuid, HashSet<String>>,
    /// Every origin some tenant lists.
    listed: HashSet<String>,
}

impl OriginSettings {
    /// Builds the settings from (tenant, origin) pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Uuid, String)>) -> Self {
        let mut settings = Self::default();
        for (tenant, origin) in pairs {
            settings.listed.insert(origin.clone());
            settings.tenants.entry(tenant).or_default().insert(origin);
        }
        settings
    }

    /// Whether some tenant accepts `origin`: a preflight request, which carries no
    /// credentials, is answered on this.
    pub fn listed_by_any(&self, origin: &str) -> bool {
        self.listed.contains(origin) || self.listed.contains(ANY_ORIGIN)
    }

    /// Whether `tenant`'s credentials may be used from `origin`.
    pub fn allows(&self, tenant: Uuid, origin: &str) -> bool {
        self.tenants
            .get(&tenant)
            .is_some_and(|own| own.contains(origin) || own.contains(ANY_ORIGIN))
    }
}

/// Origins followed live.
pub type Origins = Followed<OriginSettings>;

impl Snapshot for OriginSettings {
    const CHANNEL: &'static str = ORIGINS_CHANNEL;
    const WHAT: &'static str = "CORS origins";

    async fn load(app: &PgPool) -> Result<Self> {
        let rows = sqlx::query("SELECT tenant_id, origin FROM sluice_cors_origins()")
            .fetch_all(app)
            .await?;
        let pairs = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<(Uuid, String)>>>()?;
        Ok(Self::from_pairs(pairs))
    }
}

/// `origin` as browsers send it (`scheme://host[:port]`, lower case, no path), or why not.
pub fn normalize(origin: &str) -> Result<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if origin == ANY_ORIGIN {
        return Ok(origin);
    }
    let invalid = || {
        Error::Invalid(format!(
            "{origin:?} is not an origin: http(s)://host[:port], or `*`"
        ))
    };
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(invalid)?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if !(host_ok && port_ok) {
        return Err(invalid());
    }
    // Browsers leave a scheme's default port out of `Origin`.
    let default_port = match origin.split_once("://") {
        Some(("https", _)) => "443",
        _ => "80",
    };
    Ok(match port {
        Some(p) if p.trim_start_matches('0') == default_port => origin
            .strip_suffix(&format!(":{p}"))
            .unwrap_or(&origin)
            .to_owned(),
        _ => origin,
    })
}

/// `tenant`'s origins (in its row-level-security transaction, or as the owner role).
pub async fn list(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar(
            "SELECT origin FROM tenant_origins WHERE tenant_id = $1 ORDER BY origin",
        )
        .bind(tenant)
        .fetch_all(conn)
        .await?,
    )
}

/// Replaces `tenant`'s origins with `origins` (normalized, duplicates dropped), in its
/// row-level-security transaction (or the owner role's): run it in a transaction. Returns the
/// list now in force.
pub async fn replace(
    conn: &mut PgConnection,
    tenant: Uuid,
    origins: &[String],
) -> Result<Vec<String>> {
    let mut normalized = origins
        .iter()
        .map(|o| normalize(o))
        .collect::<Result<Vec<_>>>()?;
    normalized.sort();
    normalized.dedup();
    if normalized.len() > MAX_ORIGINS {
        return Err(Error::Invalid(format!(
            "at most {MAX_ORIGINS} origins per tenant"
        )));
    }
    // Two replacements at once take turns, rather than collide on the same origin.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice-origins:' || $1::text))")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM tenant_origins WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO tenant_origins (tenant_id, origin) SELECT $1, unnest($2::text[])")
        .bind(tenant)
        .bind(&normalized)
        .execute(&mut *conn)
        .await?;
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalized_or_refused() {
        assert_eq!(
            normalize("https://App.Example.com/").unwrap(),
            "https://app.example.com"
        );
        assert_eq!(
            normalize("http://localhost:5173").unwrap(),
            "http://localhost:5173"
        );
        assert_eq!(normalize(" * ").unwrap(), "*");
        assert_eq!(normalize("https://a.com:443").unwrap(), "https://a.com");
        assert_eq!(normalize("http://a.com:80").unwrap(), "http://a.com");
        assert_eq!(normalize("http://a.com:443").unwrap(), "http://a.com:443");
        for bad in [
            "app.example.com",
            "ftp://x",
            "https://",
            "https://a.com/path",
            "https://a.com:0",
            "https://a.com:99999",
            "https://a b.com",
            "https://a.com?x=1",
        ] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tenant_allows_only_its_own_origins_and_preflights_see_all() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let settings = OriginSettings::from_pairs([
            (a, "https://a.example".to_owned()),
            (b, "https://b.example".to_owned()),
        ]);
        assert!(settings.allows(a, "https://a.example"));
        assert!(!settings.allows(a, "https://b.example"));
        assert!(!settings.allows(Uuid::new_v4(), "https://a.example"));
        assert!(settings.listed_by_any("https://b.example"));
        assert!(!settings.listed_by_any("https://evil.example"));
        let open = OriginSettings::from_pairs([(a, ANY_ORIGIN.to_owned())]);
        assert!(open.allows(a, "https://anything.example"));
        assert!(open.listed_by_any("https://anything.example"));
    }
}
