//! Sluice's producer: librdkafka's producer with one thread serving its delivery reports, each
//! send answered by a future, like rdkafka's `FutureProducer` — without its idle cost.
//!
//! rdkafka's `FutureProducer` polls in slices of 100 ms, and each slice ends in a busy loop:
//! its last sub-millisecond remainder rounds down to a zero timeout, so the thread spins until
//! the slice is over. That is about 1% of a core per producer, all the time, which was most of
//! what an idle Sluice cost. Here the thread polls in slices of a second, so the remainder
//! costs a thousandth of that, and it stops within a second of the last handle being dropped
//! (dropping the librdkafka handle there, off the async runtime: what is still queued is purged
//! and its futures answered with the error).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{channel::oneshot, FutureExt};
use rdkafka::{
    client::ClientContext,
    config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel},
    error::{KafkaError, RDKafkaErrorCode},
    message::{Message, ToBytes},
    producer::{
        future_producer::{Delivery, OwnedDeliveryResult},
        BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext,
    },
};

use crate::Result;

/// How long one poll of the delivery reports lasts.
const POLL_SLICE: Duration = Duration::from_secs(1);

/// Answers each send's future from its delivery report, and logs through `tracing`.
pub struct DeliveryContext;

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(fac, message, "librdkafka producer")
            }
            L::Warning => tracing::warn!(fac, message, "librdkafka producer"),
            _ => tracing::debug!(fac, message, "librdkafka producer"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka producer error");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<OwnedDeliveryResult>>;

    fn delivery(&self, result: &DeliveryResult<'_>, answer: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp(),
            }),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // The sender may have stopped waiting; nothing to tell then.
        let _ = answer.send(outcome);
    }
}

/// The outcome of one send: the broker's acknowledgement or the error with the message.
/// `Err(Canceled)` only if the report was lost (it never is while the producer lives).
pub struct DeliveryFuture {
    answer: oneshot::Receiver<OwnedDeliveryResult>,
}

impl std::future::Future for DeliveryFuture {
    type Output = std::result::Result<OwnedDeliveryResult, oneshot::Canceled>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.answer.poll_unpin(cx)
    }
}

/// Stops the polling thread when the last handle goes.
struct Handle {
    producer: Arc<BaseProducer<DeliveryContext>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An asynchronous producer; clones share one librdkafka producer.
#[derive(Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

impl Producer {
    /// A producer with `config`, and the thread that serves its delivery reports.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        let producer = Arc::new(BaseProducer::from_config_and_context(
            config,
            DeliveryContext,
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sluice-producer".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(POLL_SLICE);
                }
                // The librdkafka handle is dropped here, off the async runtime.
            })
            .map_err(|e| crate::Error::Stalled(format!("cannot start a producer thread: {e}")))?;
        Ok(Self {
            handle: Arc::new(Handle { producer, stop }),
        })
    }

    /// Queues `record`; its future resolves when the broker acknowledged it or it failed. A
    /// record refused at once (the local queue is full, say) comes back with the error.
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> std::result::Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (tell, answer) = oneshot::channel();
        let mut base = BaseRecord::with_opaque_to(record.topic, Box::new(tell));
        base.partition = record.partition;
        base.payload = record.payload;
        base.key = record.key;
        base.timestamp = record.timestamp;
        base.headers = record.headers;
        match self.handle.producer.send(base) {
            Ok(()) => Ok(DeliveryFuture { answer }),
            Err((error, base)) => Err((
                error,
                FutureRecord {
                    topic: base.topic,
                    partition: base.partition,
                    payload: base.payload,
                    key: base.key,
                    timestamp: base.timestamp,
                    headers: base.headers,
                },
            )),
        }
    }

    /// Sends `record` and waits for the broker's acknowledgement, waiting for room in the
    /// local queue for up to `queue_timeout`.
    pub async fn send<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> std::result::Result<Delivery, KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let deadline = std::time::Instant::now() + queue_timeout;
        let delivery = loop {
            match self.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if std::time::Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error),
            }
        };
        match delivery.await {
            Ok(Ok(delivered)) => Ok(delivered),
            Ok(Err((error, _))) => Err(error),
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    /// Waits (blocking) up to `timeout` for every queued record to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        Ok(self.handle.producer.flush(timeout)?)
    }
}
