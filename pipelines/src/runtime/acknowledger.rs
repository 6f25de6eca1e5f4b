//! The acknowledger: waits, batch by batch in lane order, for the broker to acknowledge each
//! batch's outputs, then marks its records done so their offsets can be stored for commit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use rdkafka::{
    consumer::Consumer,
    error::KafkaError,
    message::{Message, OwnedMessage},
    producer::FutureRecord,
    Offset, TopicPartitionList,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{backoff, offsets::OffsetTracker};
use crate::{
    kafka::{DeliveryFuture, KafkaConsumer, Producer},
    metrics::Metrics,
};

/// A processed batch (or hook call) whose outputs await the broker's acknowledgement.
pub(super) struct Unacked {
    pub topic: String,
    /// (partition, offset) of the inputs done with this batch.
    pub records: Vec<(i32, i64)>,
    pub started: Instant,
    pub deliveries: Vec<(String, DeliveryFuture)>,
    /// What the operator retains after this batch, when it changed or may have.
    pub retained: Option<Vec<(i32, i64)>>,
}

/// Waits, batch by batch in lane order, for the broker to acknowledge each batch's outputs,
/// then marks its records done so their offsets can be committed. An output the broker refused
/// after the producer's own retries is sent again until it is acknowledged (or shutdown leaves
/// the records to be redelivered).
pub(super) struct Acknowledger {
    pub lane: usize,
    pub consumer: Arc<KafkaConsumer>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub producer: Producer,
    pub metrics: Arc<Metrics>,
    pub stage: String,
    pub cancel: CancellationToken,
    pub commits: Arc<watch::Sender<Vec<(i32, i64)>>>,
}

impl Acknowledger {
    pub async fn run(self, mut unacked: mpsc::Receiver<Unacked>) {
        let stage = self.stage.as_str();
        let process_seconds = self.metrics.process_seconds.with_label_values(&[stage]);
        let mut records_out: HashMap<String, prometheus::IntCounter> = HashMap::new();
        // Positions to store, per (topic, partition); stored once the channel has nothing
        // ready, so a burst of batches costs one store per partition.
        let mut to_store: HashMap<(String, i32), i64> = HashMap::new();
        // Once a batch is left unacknowledged, nothing after it in this lane may complete
        // (its offsets and its operator's releases would skip past the gap).
        let mut blocked = false;
        loop {
            let batch = match unacked.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.store(&mut to_store);
                    match unacked.recv().await {
                        Some(batch) => batch,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            match await_deliveries(&self.producer, &self.stage, &self.cancel, batch.deliveries)
                .await
            {
                Some(delivered) => {
                    for topic in delivered {
                        records_out
                            .entry(topic)
                            .or_insert_with_key(|topic| {
                                self.metrics.records_out.with_label_values(&[stage, topic])
                            })
                            .inc();
                    }
                }
                None => blocked = true,
            }
            if !batch.records.is_empty() {
                process_seconds.observe(batch.started.elapsed().as_secs_f64());
            }
            if blocked {
                continue;
            }
            let moved = self
                .tracker
                .lock()
                .map(|mut t| t.finish(self.lane, &batch.records, batch.retained.as_deref()))
                .unwrap_or_default();
            for (partition, position) in moved {
                to_store.insert((batch.topic.clone(), partition), position);
            }
        }
        self.store(&mut to_store);
    }

    fn store(&self, to_store: &mut HashMap<(String, i32), i64>) {
        if to_store.is_empty() {
            return;
        }
        let mut stored = Vec::with_capacity(to_store.len());
        for ((topic, partition), position) in to_store.drain() {
            store_position(&self.consumer, &topic, partition, position);
            stored.push((partition, position));
        }
        if self.commits.receiver_count() > 0 {
            self.commits.send_modify(|positions| {
                for (partition, position) in stored {
                    match positions.iter_mut().find(|(p, _)| *p == partition) {
                        Some(entry) => entry.1 = entry.1.max(position),
                        None => positions.push((partition, position)),
                    }
                }
            });
        }
    }
}

/// Waits for every delivery of one batch (or record); the outputs the broker refused are sent again
/// together (after a backoff that grows with each round) until all are acknowledged, so a
/// broker or topic that comes back costs a few rounds, not one backoff per record. Returns
/// the topic of each output, or `None` if a delivery report was lost or shutdown came
/// first (the batch is then left for redelivery).
pub(super) async fn await_deliveries(
    producer: &Producer,
    stage: &str,
    cancel: &CancellationToken,
    deliveries: Vec<(String, DeliveryFuture)>,
) -> Option<Vec<String>> {
    let mut delivered = Vec::with_capacity(deliveries.len());
    let mut waiting: Vec<(String, Sent)> = deliveries
        .into_iter()
        .map(|(topic, delivery)| (topic, Ok(delivery)))
        .collect();
    let mut attempt = 0;
    loop {
        let mut refused = Vec::new();
        for (topic, sent) in waiting {
            let outcome = match sent {
                Ok(delivery) => delivery.await,
                Err(refusal) => Ok(Err(*refusal)),
            };
            match outcome {
                Ok(Ok(_)) => delivered.push(topic),
                Ok(Err((e, message))) => {
                    if refused.is_empty() {
                        tracing::error!(stage = %stage, topic, error = %e, "output not acknowledged; sending again");
                    }
                    refused.push((topic, message));
                }
                Err(_) => {
                    tracing::error!(stage = %stage, topic, "delivery report lost; leaving the batch for redelivery");
                    return None;
                }
            }
        }
        if refused.is_empty() {
            return Some(delivered);
        }
        attempt += 1;
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff(attempt)) => {}
        }
        waiting = refused
            .into_iter()
            .map(|(topic, message)| (topic, resend(producer, message)))
            .collect();
    }
}

/// Stores `position` as the commit offset of `topic`/`partition`.
pub(super) fn store_position(consumer: &KafkaConsumer, topic: &str, partition: i32, position: i64) {
    let mut list = TopicPartitionList::new();
    if list
        .add_partition_offset(topic, partition, Offset::Offset(position))
        .is_ok()
    {
        if let Err(e) = consumer.store_offsets(&list) {
            // After a rebalance took the partition away; the new owner re-reads from the last
            // commit, which is what at-least-once means.
            tracing::debug!(error = %e, topic, partition, position, "offset not stored");
        }
    }
}

/// An output handed to the producer (its acknowledgement to come), or refused before it was
/// queued (the local queue full, say), to be sent again in the next round.
type Sent = Result<DeliveryFuture, Box<(KafkaError, OwnedMessage)>>;

/// Produces `message` again, to the same partition.
fn resend(producer: &Producer, message: OwnedMessage) -> Sent {
    let mut record = FutureRecord::to(message.topic())
        .payload(message.payload().unwrap_or_default())
        .partition(message.partition());
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(headers) = message.headers() {
        record = record.headers(headers.clone());
    }
    match producer.send_result(record) {
        Ok(delivery) => Ok(delivery),
        Err((e, _)) => Err(Box::new((e, message.clone()))),
    }
}
