//! What the edge tells tenants through their webhooks: it puts [`Notification`]s on
//! `sluice.notifications` for the delivery stage. Each occurrence has a deterministic event id
//! (the delivery stage sends an id once per endpoint), and this edge sends each id at most once
//! while it runs, so a budget past its alert costs one record, not one per request.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use sluice_pipelines::{kafka::Producer, trace::TraceContext, Emitter};
use sluice_schemas::{Codec, Notification};
use sqlx::types::Uuid;

/// Event ids remembered at most; beyond it the memory starts again (the stage still dedupes).
const REMEMBERED: usize = 100_000;

/// Sends notifications from the edge.
pub struct Notifier {
    producer: Producer,
    codec: Arc<Codec>,
    topic: String,
    sent: Mutex<HashSet<String>>,
    counter: prometheus::IntCounterVec,
}

impl Notifier {
    /// A notifier sending through `producer` to `topic`, counting in `counter` (by type).
    pub fn new(
        producer: Producer,
        codec: Arc<Codec>,
        topic: &str,
        counter: prometheus::IntCounterVec,
    ) -> Self {
        Self {
            producer,
            codec,
            topic: topic.to_owned(),
            sent: Mutex::new(HashSet::new()),
            counter,
        }
    }

    /// Tells `tenant` of `kind` (`event_id` names the occurrence) with `data`, in the
    /// background, unless this edge already did.
    pub fn notify(self: &Arc<Self>, tenant: Uuid, event_id: String, kind: &str, data: &Value) {
        {
            let mut sent = self
                .sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if sent.len() >= REMEMBERED {
                sent.clear();
            }
            if !sent.insert(event_id.clone()) {
                return;
            }
        }
        let record = Notification {
            event_id,
            tenant_id: tenant.to_string(),
            kind: kind.to_owned(),
            occurred_at_ms: sluice_pipelines::now_ms(),
            data_json: data.to_string(),
        };
        self.counter.with_label_values(&[kind]).inc();
        let mut out = Emitter::new(
            self.producer.clone(),
            self.codec.clone(),
            TraceContext::new_root(),
        );
        let notifier = self.clone();
        tokio::spawn(async move {
            let topic = &notifier.topic;
            let key = record.tenant_id.clone();
            let sent = match out.emit(topic, None, key.as_bytes(), &record).await {
                Ok(()) => out.flush().await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(error) = sent {
                tracing::warn!(%error, event_id = %record.event_id, "a notification could not be sent; the next request that finds it due sends it again");
                notifier
                    .sent
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&record.event_id);
            }
        });
    }
}
