//! Tenants' webhook endpoints (`webhook_endpoints`) and the delivery log (`webhook_deliveries`),
//! which is also the queue of retries: a delivery is recorded before its first attempt, one per
//! event and endpoint, and stays `pending` with its next attempt's time until it is
//! `delivered` or, after its last attempt, `failed`. Every query runs in a transaction of the
//! tenant (or as the owner); the retry scan alone crosses tenants, through a function that
//! answers ids only.

use rand::RngCore;
use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use crate::{Error, Result};

/// The event types Sluice sends.
pub const EVENT_TYPES: &[&str] = &[
    "invoice.finalized",
    "usage.threshold_reached",
    "budget.exceeded",
];

/// A tenant's endpoint, as its admins see it (the secret only when made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    /// The event types sent to it; `None`: every type.
    pub events: Option<Vec<String>>,
    pub enabled: bool,
    pub description: String,
    pub created_at_ms: i64,
}

/// What a new endpoint is.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: String,
    pub events: Option<Vec<String>>,
    pub description: String,
}

impl NewEndpoint {
    /// Every problem with it.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let url = self.url.trim();
        let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
        if !scheme_ok || url.len() > 2000 || url.chars().any(char::is_whitespace) {
            problems
                .push("url must be an http:// or https:// URL of at most 2000 characters".into());
        }
        if let Some(events) = &self.events {
            if events.is_empty() {
                problems.push("events must name at least one type (leave it out for all)".into());
            }
            for event in events {
                if !EVENT_TYPES.contains(&event.as_str()) {
                    problems.push(format!(
                        "unknown event type {event:?} (known: {})",
                        EVENT_TYPES.join(", ")
                    ));
                }
            }
        }
        if self.description.len() > 500 {
            problems.push("description must be at most 500 characters".into());
        }
        problems
    }
}

/// A new signing secret: `whsec_` and 32 random bytes in hex. Receivers use the whole string
/// as the HMAC key.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

const ENDPOINT_COLUMNS: &str = "id, url, events, enabled, description, \
     (extract(epoch FROM created_at) * 1000)::bigint";

fn endpoint(row: &sqlx::postgres::PgRow) -> Result<Endpoint> {
    Ok(Endpoint {
        id: row.try_get(0)?,
        url: row.try_get(1)?,
        events: row.try_get(2)?,
        enabled: row.try_get(3)?,
        description: row.try_get(4)?,
        created_at_ms: row.try_get(5)?,
    })
}

/// Adds an endpoint of `tenant_id`: the endpoint and its secret (shown once).
pub async fn create(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    new: &NewEndpoint,
) -> Result<(Endpoint, String)> {
    let problems = new.validate();
    if !problems.is_empty() {
        return Err(Error::Invalid(problems.join("; ")));
    }
    let secret = new_secret();
    let row = sqlx::query(&format!(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, events, description)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(tenant_id)
    .bind(new.url.trim())
    .bind(&secret)
    .bind(&new.events)
    .bind(&new.description)
    .fetch_one(&mut *conn)
    .await?;
    Ok((endpoint(&row)?, secret))
}

/// The tenant's endpoints, oldest first.
pub async fn list(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<Endpoint>> {
    let rows = sqlx::query(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1
          ORDER BY created_at, id"
    ))
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(endpoint).collect()
}

/// Removes an endpoint of `tenant_id` (its deliveries go with it); whether there was one.
pub async fn remove(conn: &mut PgConnection, tenant_id: Uuid, id: Uuid) -> Result<bool> {
    let done = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Gives an endpoint of `tenant_id` a new secret (the old one stops at once): the new one.
pub async fn rotate_secret(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> Result<Option<String>> {
    let secret = new_secret();
    let done =
        sqlx::query("UPDATE webhook_endpoints SET secret = $3 WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .bind(&secret)
            .execute(&mut *conn)
            .await?;
    Ok((done.rows_affected() > 0).then_some(secret))
}

/// Turns an endpoint of `tenant_id` on or off; whether there was one.
pub async fn set_enabled(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    enabled: bool,
) -> Result<bool> {
    let done =
        sqlx::query("UPDATE webhook_endpoints SET enabled = $3 WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .bind(enabled)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() > 0)
}

/// One delivery: an event on its way to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The delivery id (`Sluice-Delivery`), the same on every attempt.
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: String,
    pub event_type: String,
    /// `pending` (being tried), `delivered` or `failed` (no attempts left).
    pub state: String,
    pub attempts: i32,
    /// The HTTP status of the last attempt, if it got one.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
}

const DELIVERY_COLUMNS: &str = "id, endpoint_id, event_id, event_type, state, attempts, \
     last_status, last_error, (extract(epoch FROM next_attempt_at) * 1000)::bigint, \
     (extract(epoch FROM created_at) * 1000)::bigint, \
     (extract(epoch FROM delivered_at) * 1000)::bigint";

fn delivery(row: &sqlx::postgres::PgRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get(0)?,
        endpoint_id: row.try_get(1)?,
        event_id: row.try_get(2)?,
        event_type: row.try_get(3)?,
        state: row.try_get(4)?,
        attempts: row.try_get(5)?,
        last_status: row.try_get(6)?,
        last_error: row.try_get(7)?,
        next_attempt_at_ms: row.try_get(8)?,
        created_at_ms: row.try_get(9)?,
        delivered_at_ms: row.try_get(10)?,
    })
}

/// The tenant's deliveries, newest first, at most `limit` (of one endpoint, if given).
pub async fn deliveries(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    endpoint_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Delivery>> {
    let rows = sqlx::query(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
          WHERE tenant_id = $1 AND ($2::uuid IS NULL OR endpoint_id = $2)
          ORDER BY created_at DESC, id LIMIT $3"
    ))
    .bind(tenant_id)
    .bind(endpoint_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(delivery).collect()
}

/// A delivery as the delivery stage attempts it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub event_type: String,
    pub url: String,
    pub secret: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i32,
}

/// Where an event came from and what it is.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The notifications topic it was read from.
    pub source_topic: &'a str,
    pub id: &'a str,
    pub kind: &'a str,
    /// The body every endpoint gets.
    pub body: &'a str,
}

/// Records `event` for each of the tenant's enabled endpoints that take its type (once per
/// endpoint: an event seen again adds nothing), held by the caller for `lease_secs`, and
/// answers the new deliveries to attempt now.
pub async fn record_event(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    event: Event<'_>,
    lease_secs: i64,
) -> Result<Vec<Attempt>> {
    let rows = sqlx::query(
        "WITH targets AS (
             SELECT id, url, secret FROM webhook_endpoints
              WHERE tenant_id = $1 AND enabled AND (events IS NULL OR $3 = ANY (events))
         ), recorded AS (
             INSERT INTO webhook_deliveries
                 (id, tenant_id, endpoint_id, source_topic, event_id, event_type, body, state,
                  next_attempt_at)
             SELECT gen_random_uuid(), $1, t.id, $6, $2, $3, $4, 'pending',
                    now() + make_interval(secs => $5)
               FROM targets t
             ON CONFLICT (endpoint_id, event_id) DO NOTHING
             RETURNING id, endpoint_id
         )
         SELECT r.id, t.url, t.secret FROM recorded r JOIN targets t ON t.id = r.endpoint_id",
    )
    .bind(tenant_id)
    .bind(event.id)
    .bind(event.kind)
    .bind(event.body)
    .bind(lease_secs as f64)
    .bind(event.source_topic)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Attempt {
                id: row.try_get(0)?,
                tenant_id,
                event_type: event.kind.to_owned(),
                url: row.try_get(1)?,
                secret: row.try_get(2)?,
                body: event.body.to_owned(),
                attempts: 0,
            })
        })
        .collect()
}

/// Up to `limit` deliveries of any tenant, of events from `source_topic`, whose next attempt
/// is due: (tenant, delivery).
pub async fn due(app: &PgPool, source_topic: &str, limit: i64) -> Result<Vec<(Uuid, Uuid)>> {
    let rows = sqlx::query("SELECT tenant_id, id FROM sluice_due_webhook_deliveries($1, $2)")
        .bind(source_topic)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_all(app)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Takes a due delivery for an attempt, holding it `lease_secs` (so no other process takes it
/// meanwhile); `None` if it is no longer due (another took it, or it was answered).
pub async fn claim(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
    lease_secs: i64,
) -> Result<Option<Attempt>> {
    let row = sqlx::query(
        "UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $3)
           FROM webhook_endpoints e
          WHERE d.tenant_id = $1 AND d.id = $2 AND d.state = 'pending'
            AND d.next_attempt_at <= now() AND e.id = d.endpoint_id
         RETURNING d.event_type, e.url, e.secret, d.body, d.attempts",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(lease_secs as f64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Attempt {
        id,
        tenant_id,
        event_type: row.try_get(0)?,
        url: row.try_get(1)?,
        secret: row.try_get(2)?,
        body: row.try_get(3)?,
        attempts: row.try_get(4)?,
    }))
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Tried again after `retry_in_ms`, or given up when `None`.
    Failed {
        status: Option<u16>,
        error: String,
        retry_in_ms: Option<u64>,
    },
}

/// Records the outcome of the attempt made after `attempts_before` others, unless the delivery
/// has moved on meanwhile (another process took it once this one's lease ended, or it is no
/// longer pending): a late answer never overwrites a newer one.
pub async fn record_attempt(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    (id, attempts_before): (Uuid, i32),
    outcome: &Outcome,
) -> Result<()> {
    let query = match outcome {
        Outcome::Delivered { status } => sqlx::query(
            "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1,
                    last_status = $3, last_error = NULL, next_attempt_at = NULL,
                    delivered_at = now()
              WHERE tenant_id = $1 AND id = $2 AND state = 'pending' AND attempts = $4",
        )
        .bind(tenant_id)
        .bind(id)
        .bind(i32::from(*status))
        .bind(attempts_before),
        Outcome::Failed {
            status,
            error,
            retry_in_ms,
        } => sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = $3,
                    last_error = $4,
                    state = CASE WHEN $5::bigint IS NULL THEN 'failed' ELSE 'pending' END,
                    next_attempt_at = CASE WHEN $5::bigint IS NULL THEN NULL
                        ELSE now() + make_interval(secs => $5::bigint / 1000.0) END
              WHERE tenant_id = $1 AND id = $2 AND state = 'pending' AND attempts = $6",
        )
        .bind(tenant_id)
        .bind(id)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(retry_in_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)))
        .bind(attempts_before),
    };
    query.execute(&mut *conn).await?;
    Ok(())
}
