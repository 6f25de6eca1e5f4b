//! How an operator's outputs leave: the [`Emitter`] that produces them with the trace context
//! and keeps their delivery acknowledgements, and [`DeadLetters`] for records that cannot be
//! processed.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    error::KafkaError,
    message::{Header, Message, OwnedHeaders, OwnedMessage},
    producer::{future_producer::Delivery, FutureRecord},
    types::RDKafkaErrorCode,
};
use sluice_schemas::{Codec, DeadLetter, Record};
use tokio_util::sync::CancellationToken;

use super::{backoff, RecordContext};
use crate::{
    kafka::{DeliveryFuture, Producer},
    metrics::Metrics,
    now_ms,
    trace::{TraceContext, TRACEPARENT},
    ProcessError,
};

/// Produces an operator's outputs, carrying the trace context, and remembers their delivery
/// acknowledgements so the runtime can wait for them before storing the inputs' offsets.
pub struct Emitter {
    producer: Producer,
    /// Where [`Emitter::emit_batched`] sends: the throughput producer, if the stage gave one.
    batched: Option<Producer>,
    codec: Arc<Codec>,
    /// The `traceparent` outputs carry, formatted once per trace.
    traceparent: String,
    pending: Vec<(String, DeliveryFuture)>,
    rejected: Vec<Rejected>,
}

/// An input the operator found unprocessable, for the DLQ.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

impl Emitter {
    /// An emitter whose outputs carry `trace`.
    pub fn new(producer: Producer, codec: Arc<Codec>, trace: TraceContext) -> Self {
        Self {
            producer,
            batched: None,
            codec,
            traceparent: trace.to_header(),
            pending: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// Sends [`Emitter::emit_batched`] outputs through `producer` (the throughput profile's).
    pub fn with_batched(mut self, producer: Producer) -> Self {
        self.batched = Some(producer);
        self
    }

    /// Outputs emitted from now on carry `trace` (the runtime sets each record's own trace
    /// before a [`RecordOperator`](super::RecordOperator) handles it; a batch operator's
    /// outputs carry the batch's trace).
    pub fn set_trace(&mut self, trace: TraceContext) {
        self.traceparent = trace.to_header();
    }

    /// Sends the input at `ctx` to the DLQ with `reason` (it can never be processed); the rest
    /// of the batch goes on.
    pub fn reject(&mut self, ctx: &RecordContext, reason: impl Into<String>) {
        self.rejected.push(Rejected {
            partition: ctx.partition,
            offset: ctx.offset,
            reason: reason.into(),
        });
    }

    /// The inputs rejected so far, taken out.
    pub fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    /// Outputs queued and not yet handed over with [`Emitter::take_pending`].
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Encodes and sends `record` to `topic` (to `partition` if given, else by key). The send
    /// is queued at once; [`Emitter::flush`] waits for the broker's acknowledgements.
    pub async fn emit<T: Record>(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        record: &T,
    ) -> Result<(), ProcessError> {
        self.send(false, topic, partition, key, record).await
    }

    /// Like [`Emitter::emit`], for an output nobody waits on (usage for the meters, say): it
    /// leaves with others in a batch a few milliseconds later (the throughput producer, when
    /// the stage gave one), so a busy stage sends one request where it would send dozens, and
    /// its readers fetch it in one go. Its acknowledgement still holds the input's offset.
    pub async fn emit_batched<T: Record>(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        record: &T,
    ) -> Result<(), ProcessError> {
        self.send(true, topic, partition, key, record).await
    }

    async fn send<T: Record>(
        &mut self,
        batched: bool,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        record: &T,
    ) -> Result<(), ProcessError> {
        let producer = match (&self.batched, batched) {
            (Some(bulk), true) => bulk,
            _ => &self.producer,
        };
        let payload = self.codec.encode(record)?;
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: TRACEPARENT,
                value: Some(self.traceparent.as_bytes()),
            });
            let mut future = FutureRecord::to(topic)
                .key(key)
                .payload(&payload)
                .headers(headers);
            if let Some(partition) = partition {
                future = future.partition(partition);
            }
            match producer.send_result(future) {
                Ok(delivery) => {
                    self.pending.push((topic.to_owned(), delivery));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(ProcessError::Retriable(format!("produce to {topic}: {e}")))
                }
            }
        }
    }

    /// The queued sends and their acknowledgements, taken out for the caller to await.
    pub fn take_pending(&mut self) -> Vec<(String, DeliveryFuture)> {
        std::mem::take(&mut self.pending)
    }

    /// Waits for every queued send; returns the topics written, one entry per record.
    pub async fn flush(&mut self) -> Result<Vec<String>, ProcessError> {
        let mut written = Vec::with_capacity(self.pending.len());
        let mut failure = None;
        for (topic, delivery) in self.pending.drain(..) {
            match delivery.await {
                Ok(Ok(Delivery { .. })) => written.push(topic),
                Ok(Err((e, _))) => failure = Some(format!("delivery to {topic} failed: {e}")),
                Err(_) => failure = Some(format!("delivery to {topic} was cancelled")),
            }
        }
        match failure {
            Some(reason) => Err(ProcessError::Retriable(reason)),
            None => Ok(written),
        }
    }
}

/// Writes records that cannot be processed to the DLQ.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Producer,
    codec: Arc<Codec>,
    topic: String,
    stage: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// A DLQ writer for `stage`.
    pub fn new(
        producer: Producer,
        codec: Arc<Codec>,
        topic: &str,
        stage: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            producer,
            codec,
            topic: topic.to_owned(),
            stage: stage.to_owned(),
            metrics,
        }
    }

    /// Sends `message` to the DLQ with `reason`, retrying until the broker acknowledges or
    /// `cancel` fires (then the record is not marked done and will be redelivered).
    pub async fn send(
        &self,
        message: &OwnedMessage,
        reason: &str,
        cancel: &CancellationToken,
    ) -> bool {
        tracing::warn!(
            stage = %self.stage, topic = message.topic(), partition = message.partition(),
            offset = message.offset(), reason, "record sent to the DLQ"
        );
        let letter = DeadLetter {
            source_topic: message.topic().to_owned(),
            source_partition: message.partition(),
            source_offset: message.offset(),
            stage: self.stage.clone(),
            reason: reason.to_owned(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            failed_at_ms: now_ms(),
        };
        let ctx = RecordContext::of(message);
        let mut attempt = 0;
        loop {
            let mut out = Emitter::new(self.producer.clone(), self.codec.clone(), ctx.trace);
            let result = match out
                .emit(&self.topic, None, message.topic().as_bytes(), &letter)
                .await
            {
                Ok(()) => out.flush().await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.metrics
                        .dlq_records
                        .with_label_values(&[&self.stage])
                        .inc();
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "cannot write to the DLQ; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                }
            }
        }
    }
}
