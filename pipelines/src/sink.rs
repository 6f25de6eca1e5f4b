//! The sink loop: consume records into batches (by count and linger time), write each batch to
//! a store, and store the offsets only after the store accepted the batch.
//!
//! Sinks make their writes idempotent (keyed by event id or source coordinates), so the
//! redelivery that follows a crash between the write and the offset commit changes nothing.
//! A store outage is retried with backoff for as long as it lasts (never dropped); a batch the
//! store refuses as invalid is sent record by record to the DLQ.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rdkafka::{
    consumer::Consumer,
    message::{Message, OwnedMessage},
    Offset, TopicPartitionList,
};
use sluice_schemas::Record;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Wiring,
    kafka::{self, ProducerProfile},
    runtime::{backoff, Guarantee, StageDeps},
    source::{Decoded, SourceTuning, StageSource},
    ProcessError, Result,
};

/// A store that accepts batches of records.
#[async_trait]
pub trait BatchSink: Send + 'static {
    /// The record type the sink stores.
    type Input: Record;

    /// What a write guarantees when a batch is delivered again after a crash:
    /// [`EffectivelyOnce`](crate::runtime::EffectivelyOnce) for writes keyed by event id or
    /// source coordinates, [`AtLeastOnce`](crate::runtime::AtLeastOnce) otherwise.
    type Delivery: Guarantee;

    /// Writes `batch` (which may contain records already written before a crash: the write
    /// must be idempotent). Returns the number of records that were new.
    async fn write(&mut self, batch: &[Self::Input]) -> Result<usize, ProcessError>;
}

/// How a sink runs.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// Its name, group, input and DLQ.
    pub wiring: Wiring,
    /// Largest batch written at once, in records.
    pub max_batch: usize,
    /// Largest batch written at once, in bytes of the records as they came (keys and
    /// payloads): with the prefetch, this bounds the sink's memory whatever the records' size.
    pub max_batch_bytes: usize,
    /// Longest a record waits for its batch to fill.
    pub linger: Duration,
    /// Most the consumer fetches ahead of the sink (KiB), so a stalled store bounds memory.
    pub max_prefetch_kib: u32,
}

impl SinkSpec {
    /// A spec with the defaults: batches of up to 1000 records, 4 MiB or 200 ms.
    pub fn new(wiring: Wiring) -> Self {
        Self {
            wiring,
            max_batch: 1000,
            max_batch_bytes: 4 << 20,
            linger: Duration::from_millis(200),
            max_prefetch_kib: kafka::PREFETCH_KIB,
        }
    }
}

/// Runs `sink` until `cancel` fires; the batch in hand is written before returning. (Billing
/// sinks are run through [`Runnable::effectively_once_sink`](crate::Runnable), which refuses a
/// sink whose writes are not idempotent.)
pub async fn run_sink<S: BatchSink>(
    mut sink: S,
    spec: SinkSpec,
    deps: StageDeps,
    cancel: CancellationToken,
) -> Result<()> {
    let tuning = SourceTuning {
        fetch: kafka::Fetch::BULK,
        max_prefetch_kib: spec.max_prefetch_kib,
        producer: ProducerProfile::Throughput,
    };
    let source = StageSource::open(&spec.wiring, tuning, &deps)?;
    // Until shutdown the DLQ and store retries wait on `cancel`; the final flush must finish,
    // so it waits on a token that never fires.
    let never = CancellationToken::new();
    source.set_ready(true);
    tracing::info!(
        sink = %spec.wiring.name, topic = %spec.wiring.input_topic, group = %spec.wiring.group,
        delivery = S::Delivery::NAME, "sink started"
    );

    let mut hold_back = kafka::HoldBack::new(&deps.metrics, &spec.wiring.name);
    let mut stopping = false;
    while !stopping {
        let mut messages: Vec<OwnedMessage> = Vec::with_capacity(spec.max_batch.min(4096));
        let mut bytes = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        while messages.len() < spec.max_batch && bytes < spec.max_batch_bytes {
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => { stopping = true; break; }
                _ = wait => break,
                received = hold_back.recv(&source.consumer) => match received {
                    Ok(m) => {
                        bytes += m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
                        messages.push(m);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + spec.linger);
                    }
                    Err(e) => {
                        tracing::warn!(sink = %spec.wiring.name, error = %e, "consume failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        if messages.is_empty() {
            continue;
        }
        deps.metrics
            .records_in
            .with_label_values(&[&spec.wiring.name])
            .inc_by(messages.len() as u64);
        let wait_token = if stopping { &never } else { &cancel };
        // A store that stays down holds the batch in retries: the partitions pause meanwhile.
        let written = hold_back
            .hold(
                &source.consumer,
                write_batch(&mut sink, &spec, &deps, &source, &messages, wait_token),
            )
            .await;
        if !written {
            // Shutdown interrupted a retry: nothing is stored, the batch will be redelivered.
            break;
        }
        store_batch_offsets(&source.consumer, &messages);
    }
    source.close().await;
    tracing::info!(sink = %spec.wiring.name, "sink stopped");
    Ok(())
}

/// Decodes and writes one batch; false if `cancel` interrupted it before it was done.
async fn write_batch<S: BatchSink>(
    sink: &mut S,
    spec: &SinkSpec,
    deps: &StageDeps,
    source: &StageSource,
    messages: &[OwnedMessage],
    cancel: &CancellationToken,
) -> bool {
    let dead_letters = source.dead_letters();
    let mut records = Vec::with_capacity(messages.len());
    let mut sources = Vec::with_capacity(messages.len());
    for message in messages {
        match source.decoder.decode::<S::Input>(message, cancel).await {
            Decoded::Ok(record) => {
                records.push(record);
                sources.push(message);
            }
            Decoded::DeadLettered => {}
            Decoded::Interrupted => return false,
        }
    }
    if records.is_empty() {
        return true;
    }
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        match sink.write(&records).await {
            Ok(new_rows) => {
                let m = &deps.metrics;
                m.sink_batch_seconds
                    .with_label_values(&[&spec.wiring.name])
                    .observe(started.elapsed().as_secs_f64());
                m.sink_rows
                    .with_label_values(&[&spec.wiring.name])
                    .inc_by(new_rows as u64);
                m.sink_duplicates
                    .with_label_values(&[&spec.wiring.name])
                    .inc_by(records.len().saturating_sub(new_rows) as u64);
                return true;
            }
            Err(ProcessError::Poison(reason)) => {
                for message in &sources {
                    if !dead_letters.send(message, &reason, cancel).await {
                        return false;
                    }
                }
                return true;
            }
            Err(ProcessError::Retriable(reason)) => {
                attempt += 1;
                deps.metrics
                    .retries
                    .with_label_values(&[&spec.wiring.name])
                    .inc();
                tracing::warn!(sink = %spec.wiring.name, reason, attempt, "batch write failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        }
    }
}

/// Stores, per partition, the offset after the last record of the batch.
fn store_batch_offsets(consumer: &kafka::KafkaConsumer, messages: &[OwnedMessage]) {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in messages {
        let entry = next.entry((m.topic(), m.partition())).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if list
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_err()
        {
            continue;
        }
    }
    if let Err(e) = consumer.store_offsets(&list) {
        tracing::debug!(error = %e, "offsets not stored (partition moved in a rebalance)");
    }
}
