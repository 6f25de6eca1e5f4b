//! The webhook delivery stage: reads `sluice.notifications` and delivers each event to every
//! endpoint of its tenant that takes its type.
//!
//! - **Once per event and endpoint.** Each delivery is recorded in PostgreSQL
//!   (`webhook_deliveries`, unique per endpoint and event id) before its first attempt, and the
//!   record's offset is committed only after that: a crash loses no delivery, and an event read
//!   twice (a redelivery, or two edges reporting the same crossing) is delivered once.
//! - **Signed.** Every attempt carries `Sluice-Signature: t=<unix seconds>,v1=<hex>`, the
//!   HMAC-SHA256 of `<t>.<body>` under the endpoint's secret, `Sluice-Delivery` (the delivery's
//!   id, the same on every attempt, for idempotent receivers) and `Sluice-Event` (its type).
//! - **Retried.** A delivery that gets no 2xx within [`WebhookConfig::timeout_ms`] is tried
//!   again after a backoff that doubles from [`WebhookConfig::backoff_base_ms`] (with jitter, at
//!   most [`WebhookConfig::backoff_max_ms`]) until [`WebhookConfig::max_attempts`], then marked
//!   `failed`. Retries are taken from the log by a loop beside the stage, so a slow endpoint
//!   holds up no other delivery, and any replica may take them (each attempt holds its delivery
//!   for a lease).
//! - **Not into the platform's own network.** Unless `allow_private_networks` is set, a URL whose
//!   host resolves to a loopback, private, link-local or unspecified address is refused, and the
//!   request goes to the address that was checked ([`sluice_pipelines::egress`], which the HTTP
//!   tools share).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use hmac::{Mac, SimpleHmac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sluice_pipelines::{metrics::Metrics, Emitter, ProcessError, RecordContext, RecordOperator};
use sluice_schemas::Notification;
use sluice_stores::postgres::{
    tenant_transaction,
    webhooks::{self, Attempt, Outcome},
};
use sqlx::{types::Uuid, PgPool};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How webhooks are delivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Attempts per delivery before it is marked failed.
    pub max_attempts: u32,
    /// Wait before the second attempt (milliseconds); doubled for each one after.
    pub backoff_base_ms: u64,
    /// Longest wait between attempts (milliseconds).
    pub backoff_max_ms: u64,
    /// Longest an endpoint may take to answer (milliseconds).
    pub timeout_ms: u64,
    /// How often due retries are looked for (milliseconds).
    pub retry_scan_ms: u64,
    /// Deliveries attempted at once by the retry loop.
    pub max_concurrent: usize,
    /// Allow endpoints on loopback, private and link-local addresses (local development).
    pub allow_private_networks: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff_base_ms: 10_000,
            backoff_max_ms: 3_600_000,
            timeout_ms: 10_000,
            retry_scan_ms: 1_000,
            max_concurrent: 16,
            allow_private_networks: false,
        }
    }
}

impl WebhookConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_attempts < 1 {
            problems.push("webhooks.max_attempts must be at least 1".to_owned());
        }
        if self.backoff_base_ms < 1 || self.backoff_max_ms < self.backoff_base_ms {
            problems.push(
                "webhooks.backoff_base_ms must be at least 1 and at most backoff_max_ms".to_owned(),
            );
        }
        if self.timeout_ms < 1 || self.retry_scan_ms < 1 || self.max_concurrent < 1 {
            problems.push(
                "webhooks.timeout_ms, retry_scan_ms and max_concurrent must be at least 1"
                    .to_owned(),
            );
        }
        problems
    }

    /// How long an attempt holds its delivery (seconds): twice its timeout (an attempt is
    /// bounded by one, see [`Deliverer::send`]), with room to record the outcome.
    fn lease_secs(&self) -> i64 {
        i64::try_from(self.timeout_ms.saturating_mul(2) / 1000 + 30).unwrap_or(i64::MAX)
    }

    /// The wait before the attempt after `attempts` failed ones, or `None` when none is left.
    pub fn retry_in_ms(&self, attempts: u32) -> Option<u64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let doubled = self
            .backoff_base_ms
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(40));
        let wait = doubled.min(self.backoff_max_ms);
        // Up to a fifth less, so endpoints that failed together are not retried together.
        let jitter = rand::rng().random_range(0..=wait / 5);
        Some(wait - jitter)
    }
}

type HmacSha256 = SimpleHmac<Sha256>;

/// The `Sluice-Signature` header for `body` sent at `timestamp` (Unix seconds) under `secret`.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// The body every endpoint gets for `notification`: `id`, `type`, `created` (Unix seconds),
/// `tenant_id` and `data`.
pub fn body(notification: &Notification) -> Result<String, String> {
    let data: serde_json::Value = serde_json::from_str(&notification.data_json)
        .map_err(|e| format!("the notification's data is not JSON: {e}"))?;
    Ok(serde_json::json!({
        "id": notification.event_id,
        "type": notification.kind,
        "created": notification.occurred_at_ms.div_euclid(1000),
        "tenant_id": notification.tenant_id,
        "data": data,
    })
    .to_string())
}

/// Delivers notifications; shared by the stage's lanes and its retry loop.
pub struct WebhookSender {
    deliverer: Arc<Deliverer>,
    /// Stops the retry loop when the stage is done with the sender.
    _retries: DropGuard,
}

struct Deliverer {
    app: PgPool,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    /// The notifications topic read: its deliveries are this stage's to retry.
    topic: String,
}

impl WebhookSender {
    /// A sender of the notifications read from `topic`, recording deliveries through `app`
    /// (the runtime role), with its retry loop running until the sender is dropped.
    pub fn new(app: PgPool, topic: &str, config: WebhookConfig, metrics: Arc<Metrics>) -> Self {
        let deliverer = Arc::new(Deliverer {
            app,
            config,
            metrics,
            topic: topic.to_owned(),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(deliverer.clone().retry_loop(cancel.clone()));
        Self {
            deliverer,
            _retries: cancel.drop_guard(),
        }
    }
}

#[async_trait]
impl RecordOperator for WebhookSender {
    type Input = Notification;

    async fn process(
        &self,
        notification: Notification,
        _ctx: &RecordContext,
        _out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let tenant = Uuid::parse_str(&notification.tenant_id).map_err(|_| {
            ProcessError::Poison(format!(
                "tenant id {:?} is not a UUID",
                notification.tenant_id
            ))
        })?;
        let body = body(&notification).map_err(ProcessError::Poison)?;
        let store = |e: sluice_stores::Error| ProcessError::Retriable(e.to_string());
        let mut tx = tenant_transaction(&self.deliverer.app, tenant)
            .await
            .map_err(store)?;
        let event = webhooks::Event {
            source_topic: &self.deliverer.topic,
            id: &notification.event_id,
            kind: &notification.kind,
            body: &body,
        };
        let attempts =
            webhooks::record_event(&mut tx, tenant, event, self.deliverer.config.lease_secs())
                .await
                .map_err(store)?;
        tx.commit()
            .await
            .map_err(|e| ProcessError::Retriable(e.to_string()))?;
        // Recorded: from here a crash leaves each delivery to the retry loop once its lease
        // ends. The first attempts go at once, side by side.
        futures::future::join_all(attempts.into_iter().map(|a| self.deliverer.attempt(a))).await;
        Ok(())
    }
}

impl Deliverer {
    /// Takes due retries from the log until `cancel` fires.
    async fn retry_loop(self: Arc<Self>, cancel: CancellationToken) {
        let every = Duration::from_millis(self.config.retry_scan_ms);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let limit = i64::try_from(self.config.max_concurrent).unwrap_or(16);
            let due = match webhooks::due(&self.app, &self.topic, limit).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "looking for webhook retries failed; trying again shortly");
                    continue;
                }
            };
            let tries = due.into_iter().map(|(tenant, id)| self.retry(tenant, id));
            futures::future::join_all(tries).await;
        }
    }

    async fn retry(&self, tenant: Uuid, id: Uuid) {
        let claimed = async {
            let mut tx = tenant_transaction(&self.app, tenant).await?;
            let attempt = webhooks::claim(&mut tx, tenant, id, self.config.lease_secs()).await?;
            tx.commit().await?;
            Ok::<_, sluice_stores::Error>(attempt)
        }
        .await;
        match claimed {
            Ok(Some(attempt)) => self.attempt(attempt).await,
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, %id, "taking a webhook retry failed"),
        }
    }

    /// Sends one attempt and records what came of it.
    async fn attempt(&self, attempt: Attempt) {
        let result = send(&self.config, &attempt).await;
        let tried = u32::try_from(attempt.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let outcome = match result {
            Ok(status) if (200..300).contains(&status) => Outcome::Delivered { status },
            Ok(status) => Outcome::Failed {
                status: Some(status),
                error: format!("the endpoint answered {status}"),
                retry_in_ms: self.config.retry_in_ms(tried),
            },
            Err(error) => Outcome::Failed {
                status: None,
                error,
                retry_in_ms: self.config.retry_in_ms(tried),
            },
        };
        let label = match &outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Failed {
                retry_in_ms: Some(_),
                ..
            } => "retrying",
            Outcome::Failed { .. } => "failed",
        };
        self.metrics
            .webhook_attempts
            .with_label_values(&[label])
            .inc();
        if let Outcome::Failed { error, .. } = &outcome {
            tracing::info!(delivery = %attempt.id, attempt = tried, outcome = label, %error, "webhook attempt failed");
        }
        let recorded = async {
            let mut tx = tenant_transaction(&self.app, attempt.tenant_id).await?;
            let this = (attempt.id, attempt.attempts);
            webhooks::record_attempt(&mut tx, attempt.tenant_id, this, &outcome).await?;
            tx.commit().await?;
            Ok::<_, sluice_stores::Error>(())
        }
        .await;
        if let Err(error) = recorded {
            // The delivery stays pending: it is tried again when its lease ends.
            tracing::warn!(%error, delivery = %attempt.id, "recording a webhook attempt failed");
        }
    }
}

/// POSTs the attempt, all of it (resolving the host included) within the timeout: the
/// endpoint's status, or why there is none (tenants read it in the delivery log).
async fn send(config: &WebhookConfig, attempt: &Attempt) -> Result<u16, String> {
    let timeout = Duration::from_millis(config.timeout_ms);
    tokio::time::timeout(timeout, send_unbounded(config, attempt, timeout))
        .await
        .unwrap_or_else(|_| Err("the endpoint did not answer in time".into()))
}

async fn send_unbounded(
    config: &WebhookConfig,
    attempt: &Attempt,
    timeout: Duration,
) -> Result<u16, String> {
    let url = reqwest::Url::parse(&attempt.url).map_err(|_| "the URL does not parse")?;
    // To the addresses just checked, not to what a second lookup (or a proxy) might say.
    let client = sluice_pipelines::egress::pinned_client(
        &url,
        config.allow_private_networks,
        reqwest::Client::builder().timeout(timeout),
    )
    .await
    .map_err(|refusal| refusal.to_string())?;
    let timestamp = sluice_pipelines::now_ms().div_euclid(1000);
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("user-agent", "Sluice-Webhooks/1")
        .header("sluice-delivery", attempt.id.to_string())
        .header("sluice-event", &attempt.event_type)
        .header(
            "sluice-signature",
            signature(&attempt.secret, timestamp, &attempt.body),
        )
        .body(attempt.body.clone())
        .send()
        .await
        // The URL may carry credentials: never in the log.
        .map_err(|e| format!("sending failed: {}", e.without_url()))?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            signature("whsec_test", 1_700_000_000, r#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn retries_back_off_doubling_up_to_the_cap_then_stop() {
        let config = WebhookConfig {
            max_attempts: 5,
            backoff_base_ms: 1000,
            backoff_max_ms: 3000,
            ..WebhookConfig::default()
        };
        let within = |attempts, most: u64| {
            let wait = config.retry_in_ms(attempts).unwrap();
            assert!(
                wait <= most && wait >= most - most / 5,
                "{attempts}: {wait}"
            );
        };
        within(1, 1000);
        within(2, 2000);
        within(3, 3000);
        within(4, 3000);
        assert_eq!(config.retry_in_ms(5), None, "five attempts made: no more");
    }

    #[tokio::test]
    async fn an_endpoint_on_a_private_address_is_refused_before_anything_is_sent() {
        let attempt = Attempt {
            id: sqlx::types::Uuid::new_v4(),
            tenant_id: sqlx::types::Uuid::new_v4(),
            event_type: "invoice.finalized".into(),
            url: "http://127.0.0.1:1/hook".into(),
            secret: "whsec_x".into(),
            body: "{}".into(),
            attempts: 0,
        };
        let guarded = WebhookConfig::default();
        let refused = send(&guarded, &attempt).await.unwrap_err();
        assert!(
            refused.contains("refused") && !refused.contains("127.0.0.1"),
            "{refused}"
        );
        // Allowed (local development), it is sent: here to a port nothing listens on.
        let open = WebhookConfig {
            allow_private_networks: true,
            ..WebhookConfig::default()
        };
        let failed = send(&open, &attempt).await.unwrap_err();
        assert!(failed.starts_with("sending failed"), "{failed}");
    }

    #[test]
    fn the_body_carries_the_event_and_refuses_data_that_is_not_json() {
        let notification = Notification {
            event_id: "invoice.finalized:1".into(),
            tenant_id: "t".into(),
            kind: "invoice.finalized".into(),
            occurred_at_ms: 1_700_000_000_500,
            data_json: r#"{"number":"INV-000001"}"#.into(),
        };
        let body: serde_json::Value = serde_json::from_str(&body(&notification).unwrap()).unwrap();
        assert_eq!(body["id"], "invoice.finalized:1");
        assert_eq!(body["type"], "invoice.finalized");
        assert_eq!(body["created"], 1_700_000_000);
        assert_eq!(body["data"]["number"], "INV-000001");
        let broken = Notification {
            data_json: "{".into(),
            ..notification
        };
        assert!(super::body(&broken).is_err());
    }
}
