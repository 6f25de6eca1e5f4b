//! Where a stage's records come from: the set-up the operator loop and the sink loop share. A
//! stage source is the stage's consumer (in its group, subscribed to its input), the producer
//! its outputs and dead letters leave through, the lag reporter, the decoder that sends what
//! does not decode to the DLQ, and the stage's readiness.

use std::sync::Arc;

use rdkafka::{
    consumer::{CommitMode, Consumer},
    message::{Message, OwnedMessage},
};
use sluice_schemas::{Codec, Record};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Wiring,
    kafka::{self, KafkaConsumer, LagReporter, ProducerProfile},
    ops::Readiness,
    runtime::{backoff, DeadLetters, StageDeps, StageSpec, LAG_EVERY},
    Result,
};

/// How a stage source reads and writes.
pub(crate) struct SourceTuning {
    /// How the consumer fetches.
    pub fetch: kafka::Fetch,
    /// Cap on what the consumer fetches ahead (KiB).
    pub max_prefetch_kib: u32,
    /// The producer outputs and dead letters use.
    pub producer: ProducerProfile,
}

impl SourceTuning {
    /// An operator's source: as `spec` says, fetching ahead at most [`kafka::PREFETCH_KIB`].
    pub fn for_operator(spec: &StageSpec) -> Self {
        Self {
            fetch: spec.fetch,
            max_prefetch_kib: kafka::PREFETCH_KIB,
            producer: spec.producer,
        }
    }
}

/// A stage's consumer, producer, decoder and readiness, opened together and closed together.
pub(crate) struct StageSource {
    pub consumer: Arc<KafkaConsumer>,
    pub producer: crate::kafka::Producer,
    /// The process's throughput producer, for outputs nobody waits on.
    pub batched: crate::kafka::Producer,
    pub decoder: Decoder,
    lag: LagReporter,
    name: String,
    readiness: Readiness,
}

impl StageSource {
    /// Joins the stage's group, subscribes to its input and starts measuring its lag.
    pub fn open(wiring: &Wiring, tuning: SourceTuning, deps: &StageDeps) -> Result<Self> {
        let consumer = Arc::new(kafka::consumer(
            &deps.kafka,
            &wiring.group,
            tuning.fetch,
            tuning.max_prefetch_kib,
            Some(&deps.metrics),
        )?);
        consumer.subscribe(&[&wiring.input_topic])?;
        let producer = deps.producers.get(tuning.producer).clone();
        let dead_letters = DeadLetters::new(
            producer.clone(),
            deps.codec.clone(),
            &wiring.dlq_topic,
            &wiring.name,
            deps.metrics.clone(),
        );
        let decoder = Decoder {
            codec: deps.codec.clone(),
            dead_letters,
            stage: wiring.name.clone(),
            retries: deps.metrics.retries.with_label_values(&[&wiring.name]),
        };
        let lag = LagReporter::start(
            consumer.clone(),
            &wiring.group,
            deps.metrics.clone(),
            LAG_EVERY,
        );
        Ok(Self {
            consumer,
            producer,
            batched: deps.producers.get(ProducerProfile::Throughput).clone(),
            decoder,
            lag,
            name: wiring.name.clone(),
            readiness: deps.readiness.clone(),
        })
    }

    /// Where records that cannot be processed go.
    pub fn dead_letters(&self) -> &DeadLetters {
        self.decoder.dead_letters()
    }

    /// The stage is taking records (or, given `false`, no longer is).
    pub fn set_ready(&self, ready: bool) {
        self.readiness.set(&self.name, ready);
    }

    /// Stops measuring lag and commits the offsets stored so far; call once the stage has
    /// finished with every record it took.
    pub async fn close(self) {
        self.set_ready(false);
        self.lag.stop().await;
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(stage = %self.name, error = %e, "final commit had nothing to do");
        }
    }
}

/// What became of a record's bytes.
pub(crate) enum Decoded<T> {
    Ok(T),
    /// Undecodable; sent to the DLQ (done).
    DeadLettered,
    /// Shutdown came first; not done, to be redelivered.
    Interrupted,
}

/// Decodes a stage's input records: a registry that cannot be reached is waited for (with
/// backoff, counted as retries); bytes that do not decode go to the DLQ.
#[derive(Clone)]
pub(crate) struct Decoder {
    codec: Arc<Codec>,
    dead_letters: DeadLetters,
    stage: String,
    retries: prometheus::IntCounter,
}

impl Decoder {
    /// Where the records it cannot decode go (and the stage's other dead letters).
    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dead_letters
    }

    /// Decodes `message` as a `T`, or dead-letters it; `cancel` interrupts the waits.
    pub async fn decode<T: Record>(
        &self,
        message: &OwnedMessage,
        cancel: &CancellationToken,
    ) -> Decoded<T> {
        let payload = message.payload().unwrap_or_default();
        let mut attempt = 0u32;
        loop {
            match self.codec.decode::<T>(payload).await {
                Ok(record) => return Decoded::Ok(record),
                Err(e) if e.is_retriable() => {
                    attempt += 1;
                    self.retries.inc();
                    tracing::warn!(stage = %self.stage, error = %e, attempt, "cannot decode yet; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Decoded::Interrupted,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                }
                Err(e) => {
                    let reason = format!("undecodable: {e}");
                    return if self.dead_letters.send(message, &reason, cancel).await {
                        Decoded::DeadLettered
                    } else {
                        Decoded::Interrupted
                    };
                }
            }
        }
    }
}
