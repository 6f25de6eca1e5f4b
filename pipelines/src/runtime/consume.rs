//! The consume loop: takes every record the consumer has ready (up to [`MAX_TAKE`]), hands each
//! lane its share as one chunk, in partition order, waiting while a lane is full (so a slow
//! lane stops consumption instead of filling memory) and pausing the partitions if the wait is
//! long (see [`kafka::HoldBack`]).

use std::{
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use super::{
    offsets::OffsetTracker,
    queue::{LaneSender, TrySend},
    LaneBy, StageDeps, StageSpec,
};
use crate::kafka::{self, KafkaConsumer};

/// Most records taken from the consumer in one go.
const MAX_TAKE: usize = 1024;

/// The consume loop: hands the records to their lanes, chunk by chunk, until `cancel` fires
/// or a lane is gone.
pub(super) async fn consume(
    consumer: &KafkaConsumer,
    lanes: &[LaneSender],
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
    let mut taken = Vec::with_capacity(MAX_TAKE);
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => break,
            received = hold_back.recv(consumer) => received,
        };
        match received {
            Ok(message) => taken.push(message),
            Err(e) => {
                tracing::warn!(stage = %spec.wiring.name, error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        hold_back.take_ready(consumer, MAX_TAKE, &mut taken);
        records_in.inc_by(taken.len() as u64);
        if let Ok(mut t) = tracker.lock() {
            for message in &taken {
                t.begin(message.partition(), message.offset());
            }
        }
        for (lane, chunk) in split_by_lane(&mut taken, lanes, spec.lane_by) {
            let chunk = match lanes[lane].try_send(chunk) {
                Ok(()) => continue,
                Err(TrySend::Closed) => return,
                Err(TrySend::Full(chunk)) => chunk,
            };
            waiting.inc();
            consumer_waiting.store(true, Ordering::Relaxed);
            let stop = tokio::select! {
                _ = cancel.cancelled() => true,
                sent = hold_back.hold(consumer, lanes[lane].send(chunk)) => sent.is_err(),
            };
            consumer_waiting.store(false, Ordering::Relaxed);
            if stop {
                return;
            }
        }
    }
}

/// Splits `taken` (emptied) into chunks per lane, each in arrival order and no longer than its
/// lane's queue takes at once.
fn split_by_lane(
    taken: &mut Vec<OwnedMessage>,
    lanes: &[LaneSender],
    by: LaneBy,
) -> Vec<(usize, Vec<OwnedMessage>)> {
    let mut per_lane: Vec<Vec<OwnedMessage>> = Vec::new();
    per_lane.resize_with(lanes.len(), Vec::new);
    for message in taken.drain(..) {
        let lane = match by {
            LaneBy::Key => lane_of(message.key(), message.partition(), lanes.len()),
            LaneBy::Partition => lane_of_partition(message.partition(), lanes.len()),
        };
        per_lane[lane].push(message);
    }
    let mut chunks = Vec::new();
    for (lane, mut records) in per_lane.into_iter().enumerate() {
        let most = lanes[lane].capacity();
        while records.len() > most {
            let rest = records.split_off(most);
            chunks.push((lane, records));
            records = rest;
        }
        if !records.is_empty() {
            chunks.push((lane, records));
        }
    }
    chunks
}

/// A partition's lane: partitions are numbered from 0, so dealing them in turn spreads them as
/// evenly as they go (8 partitions over 2 lanes: 4 and 4, where hashing the number gave 5 and 3,
/// leaving one lane with most of the work whenever lanes are what limits a stage).
fn lane_of_partition(partition: i32, lanes: usize) -> usize {
    let lanes = i64::try_from(lanes.max(1)).unwrap_or(1);
    usize::try_from(i64::from(partition).rem_euclid(lanes)).unwrap_or(0)
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

    fn record(key: &str, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            Some(key.as_bytes().to_vec()),
            "t".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[test]
    fn a_take_splits_into_ordered_chunks_no_longer_than_a_lane_takes() {
        let queues: Vec<_> = (0..4).map(|_| super::super::queue::lane_queue(3)).collect();
        let lanes: Vec<LaneSender> = queues.into_iter().map(|(tx, _)| tx).collect();
        let mut taken: Vec<OwnedMessage> = (0..10)
            .map(|offset| record(if offset % 2 == 0 { "a" } else { "b" }, offset))
            .collect();
        let chunks = split_by_lane(&mut taken, &lanes, LaneBy::Key);
        assert!(taken.is_empty());
        assert!(chunks.iter().all(|(_, chunk)| chunk.len() <= 3));
        for key in ["a", "b"] {
            let lane = lane_of(Some(key.as_bytes()), 0, lanes.len());
            let offsets: Vec<i64> = chunks
                .iter()
                .filter(|(l, _)| *l == lane)
                .flat_map(|(_, chunk)| chunk.iter())
                .filter(|m| m.key() == Some(key.as_bytes()))
                .map(|m| m.offset())
                .collect();
            let expected: Vec<i64> = (0..10).filter(|o| (o % 2 == 0) == (key == "a")).collect();
            assert_eq!(offsets, expected, "key {key} in order, all in its lane");
        }
    }

    #[test]
    fn partitions_are_spread_evenly_over_lanes() {
        for (partitions, lanes) in [(8, 2), (8, 3), (12, 4), (3, 8)] {
            let mut per_lane = vec![0; lanes];
            for partition in 0..partitions {
                per_lane[lane_of_partition(partition, lanes)] += 1;
            }
            let (most, least) = (per_lane.iter().max(), per_lane.iter().min());
            match partitions as usize >= lanes {
                true => assert!(
                    most.zip(least).is_some_and(|(m, l)| m - l <= 1),
                    "{per_lane:?}"
                ),
                false => assert!(per_lane.iter().all(|n| *n <= 1), "{per_lane:?}"),
            }
        }
    }

    #[test]
    fn one_key_always_maps_to_one_lane() {
        let a = lane_of(Some(b"session-1"), 0, 8);
        for _ in 0..10 {
            assert_eq!(lane_of(Some(b"session-1"), 3, 8), a);
        }
        assert!(lane_of(None, 5, 8) < 8);
    }
}
