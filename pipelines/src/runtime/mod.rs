//! The operator runtime: consume → decode → process in batches → produce → store offsets.
//!
//! # Delivery
//! At-least-once transport with ordered offset storage: a record's offset is stored for commit
//! only after every record the operator emitted for it was acknowledged by the broker (or the
//! record went to the DLQ), once every earlier record of its partition is done too, and never
//! past what the operator still retains in its state ([`Operator::retained`]). A crash
//! therefore redelivers, never loses; effects are made idempotent downstream (deterministic
//! event ids, `seq` numbers on reply chunks, window rows versioned by their record count), which
//! is what [`EffectivelyOnce`] names.
//!
//! # Concurrency, order and backpressure
//! Records are spread over `lanes` by key (or by partition, for operators whose state is per
//! partition); each lane owns one operator instance and hands it batches of the records that
//! are ready (up to `max_batch`, waiting at most `linger` for more), so one key's records stay
//! in order while different keys proceed in parallel. Lane queues are bounded: when a lane is
//! full the consumer waits for room (counted in `sluice_lane_full_waits_total`), so a slow
//! downstream stops consumption; nothing buffers without limit. A wait longer than
//! [`kafka::PAUSE_AFTER`] pauses the stage's partitions (`sluice_consumer_pauses_total`):
//! librdkafka drops what it fetched ahead and the consumer stays in its group however long the
//! stall, resuming where it stopped. (Every partition pauses, not only those feeding the full
//! lane: with lanes by key, one partition feeds every lane.)
//!
//! # Failures
//! A record that does not decode, or that the operator rejects as poison, goes to the DLQ with
//! the reason and its source topic/partition/offset. Retriable failures are retried with
//! exponential backoff and jitter, and the record goes to the DLQ after `max_attempts`.
//!
//! # Time
//! Stages with [`WatermarkSpec`] get per-partition event-time watermarks (the highest event
//! time seen minus the allowed out-of-orderness, advanced with the wall clock when a partition
//! goes idle) through [`Operator::on_watermark`], and ticks through [`Operator::on_tick`].
//!
//! # Where things are
//! [`spec`](StageSpec) (what a stage reads and how), `consume` (the consume loop, records to
//! lanes in chunks), `queue` (a lane's queue, bounded in records), `lane` (one operator
//! instance and its batches), `watermarks` (event time per partition), `acknowledger` (outputs
//! acknowledged, offsets completed in order), `offsets` (the commit position per partition),
//! `emit` (outputs and dead letters), `operator` (the traits an operator implements).

mod acknowledger;
mod consume;
mod emit;
mod keyed;
mod lane;
mod offsets;
mod operator;
mod queue;
mod spec;
mod watermarks;

use std::{
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use emit::{DeadLetters, Emitter, Rejected};
pub use keyed::run_keyed;
pub use operator::{
    AtLeastOnce, BatchError, EffectivelyOnce, Guarantee, Input, Operator, PerRecord, RecordContext,
    RecordOperator,
};
pub use spec::{LaneBy, StageDeps, StageSpec, WatermarkSpec};

use crate::{
    source::{SourceTuning, StageSource},
    Result,
};
use acknowledger::Acknowledger;
use lane::{Lane, LaneMeters};
use offsets::OffsetTracker;
use watermarks::EventTime;

/// How often consumer lag is measured.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// Exponential backoff with full jitter: attempt 1 waits up to 100 ms, doubling to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(6)).min(5_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

/// Runs the stage described by `spec` until `cancel` fires, with one operator per lane made by
/// `make_operator(lane)`; then drains the lanes, closes the operators, stores the final
/// offsets and commits them.
pub async fn run_operator<O: Operator>(
    mut make_operator: impl FnMut(usize) -> O,
    spec: StageSpec,
    deps: StageDeps,
    cancel: CancellationToken,
) -> Result<()> {
    let source = StageSource::open(&spec.wiring, SourceTuning::for_operator(&spec), &deps)?;
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let consumer_waiting = Arc::new(AtomicBool::new(false));
    let (commits, _) = watch::channel(Vec::<(i32, i64)>::new());
    let commits = Arc::new(commits);
    let lanes_count = spec.lanes.max(1);
    let mut lanes = Vec::with_capacity(lanes_count);
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..lanes_count {
        let (tx, rx) = queue::lane_queue(spec.lane_capacity);
        lanes.push(tx);
        let lane = Lane {
            operator: make_operator(index),
            spec: spec.clone(),
            deps: deps.clone(),
            producer: source.producer.clone(),
            batched: source.batched.clone(),
            decoder: source.decoder.clone(),
            cancel: cancel.clone(),
            time: EventTime::default(),
            meters: LaneMeters::new(&deps.metrics, &spec.wiring.name),
            consumer_waiting: consumer_waiting.clone(),
            held_back: false,
        };
        let acks = Acknowledger {
            lane: index,
            consumer: source.consumer.clone(),
            tracker: tracker.clone(),
            producer: source.producer.clone(),
            metrics: deps.metrics.clone(),
            stage: spec.wiring.name.clone(),
            cancel: cancel.clone(),
            commits: commits.clone(),
        };
        let commit_feed = O::WANTS_COMMITS.then(|| commits.subscribe());
        workers.spawn(lane.run(rx, acks, commit_feed));
    }
    source.set_ready(true);
    tracing::info!(
        stage = %spec.wiring.name, topic = %spec.wiring.input_topic, group = %spec.wiring.group,
        lanes = lanes_count, max_batch = spec.max_batch, "stage started"
    );

    consume::consume(
        &source.consumer,
        &lanes,
        &tracker,
        &consumer_waiting,
        &spec,
        &deps,
        &cancel,
    )
    .await;

    source.set_ready(false);
    drop(lanes);
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            tracing::error!(stage = %spec.wiring.name, error = %e, "lane task failed");
        }
    }
    source.close().await;
    tracing::info!(stage = %spec.wiring.name, "stage stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(200));
        assert!(backoff(30) <= Duration::from_secs(5));
        assert!(backoff(30) >= Duration::from_millis(2500));
    }
}
