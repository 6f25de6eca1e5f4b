//! How a stage runs: what it reads, in which group, with how much parallelism and batching,
//! and what it needs from its process.

use std::{sync::Arc, time::Duration};

use sluice_schemas::Codec;

use crate::{
    config::{KafkaConfig, Wiring},
    kafka::{Fetch, ProducerProfile, Producers},
    metrics::Metrics,
    ops::Readiness,
};

/// How records are spread over a stage's lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneBy {
    /// By record key: one key's records go through one lane, in order.
    Key,
    /// By partition: one partition's records go through one lane, in offset order (for
    /// operators with per-partition state, such as event-time windows).
    Partition,
}

/// Event-time settings of a stage.
#[derive(Debug, Clone, Copy)]
pub struct WatermarkSpec {
    /// How far out of order records may arrive: the watermark trails the highest event time
    /// seen on a partition by this much.
    pub max_out_of_orderness: Duration,
    /// After this long without records on a partition its watermark follows the wall clock
    /// (minus the out-of-orderness), so windows of a quiet partition still close.
    pub idle_after: Duration,
}

/// How one stage runs: what it reads, in which group, with how much parallelism.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Its name, group, input and DLQ.
    pub wiring: Wiring,
    /// Lanes, each with its own operator instance, processing concurrently.
    pub lanes: usize,
    /// How records are spread over the lanes.
    pub lane_by: LaneBy,
    /// Records queued per lane before the consumer waits for room.
    pub lane_capacity: usize,
    /// Most records handed to the operator at once.
    pub max_batch: usize,
    /// Longest a lane waits for more records before processing a batch that is not full
    /// (zero: process what is ready, the latency path).
    pub linger: Duration,
    /// Attempts on retriable failures before a record goes to the DLQ.
    pub max_attempts: u32,
    /// Processed batches per lane whose outputs may await the broker's acknowledgement at once.
    pub max_unacked: usize,
    /// Records a keyed stage ([`run_keyed`](super::run_keyed)) works on at once: running,
    /// queued behind their key, or awaiting acknowledgement. Beyond it the stage takes no more
    /// records (and pauses its partitions if that lasts).
    pub max_in_flight: usize,
    /// How the consumer fetches ([`Fetch::LATENCY`] by default).
    pub fetch: Fetch,
    /// How outputs are batched: at once (the interactive path) or in large compressed batches
    /// (bulk stages).
    pub producer: ProducerProfile,
    /// How often [`Operator::on_tick`] runs, if at all.
    pub tick: Option<Duration>,
    /// Event-time watermarks, if the operator uses them.
    pub watermarks: Option<WatermarkSpec>,
}

impl StageSpec {
    /// A spec with the runtime's defaults (the latency path: 32 lanes by key, no linger).
    pub fn new(wiring: Wiring) -> Self {
        Self {
            wiring,
            lanes: 32,
            lane_by: LaneBy::Key,
            lane_capacity: 16,
            max_batch: 64,
            linger: Duration::ZERO,
            max_attempts: 6,
            max_unacked: 256,
            max_in_flight: 1024,
            fetch: Fetch::LATENCY,
            producer: ProducerProfile::Latency,
            tick: None,
            watermarks: None,
        }
    }
}

/// What a stage needs from its process.
#[derive(Clone)]
pub struct StageDeps {
    pub kafka: KafkaConfig,
    /// The process's producers, shared by every stage in it.
    pub producers: Producers,
    pub codec: Arc<Codec>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
}
