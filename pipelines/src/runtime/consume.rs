//! The consume loop: hands each record to its lane, in partition order, waiting while the lane
//! is full (so a slow lane stops consumption instead of filling memory) and pausing the
//! partitions if the wait is long (see [`kafka::HoldBack`]).

use std::{
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{offsets::OffsetTracker, LaneBy, StageDeps, StageSpec};
use crate::kafka::{self, KafkaConsumer};

/// The consume loop: hands each record to its lane, waiting while the lane is full (so a
/// slow lane stops consumption instead of filling memory) and pausing the partitions if the
/// wait is long (see [`kafka::HoldBack`]).
pub(super) async fn consume(
    consumer: &KafkaConsumer,
    lanes: &[mpsc::Sender<OwnedMessage>],
    tracker: &Mutex<OffsetTracker>,
    consumer_waiting: &AtomicBool,
    spec: &StageSpec,
    deps: &StageDeps,
    cancel: &CancellationToken,
) {
    let records_in = deps
        .metrics
        .records_in
        .with_label_values(&[&spec.wiring.name]);
    let waiting = deps
        .metrics
        .lane_full_waits
        .with_label_values(&[&spec.wiring.name]);
    let mut hold_back = kafka::HoldBack::new(&deps.metrics, &spec.wiring.name);
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => break,
            received = hold_back.recv(consumer) => received,
        };
        let message = match received {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(stage = %spec.wiring.name, error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        records_in.inc();
        if let Ok(mut t) = tracker.lock() {
            t.begin(message.partition(), message.offset());
        }
        let lane = match spec.lane_by {
            LaneBy::Key => lane_of(message.key(), message.partition(), lanes.len()),
            LaneBy::Partition => lane_of(None, message.partition(), lanes.len()),
        };
        let message = match lanes[lane].try_send(message) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        waiting.inc();
        consumer_waiting.store(true, Ordering::Relaxed);
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            sent = hold_back.hold(consumer, lanes[lane].send(message)) => sent.is_err(),
        };
        consumer_waiting.store(false, Ordering::Relaxed);
        if stop {
            break;
        }
    }
}

fn lane_of(key: Option<&[u8]>, partition: i32, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match key {
        Some(k) => k.hash(&mut hasher),
        None => partition.hash(&mut hasher),
    }
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_maps_to_one_lane() {
        let a = lane_of(Some(b"session-1"), 0, 8);
        for _ in 0..10 {
            assert_eq!(lane_of(Some(b"session-1"), 3, 8), a);
        }
        assert!(lane_of(None, 5, 8) < 8);
    }
}
