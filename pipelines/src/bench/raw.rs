//! The limit a benchmark compares against: what a user would build by hand with librdkafka on
//! the same broker — a plain consume → produce pipe, tuned for throughput. One thread polls the
//! consumer and hands each payload to a producer that never waits for the record it just sent
//! (its acknowledgements are counted by a callback on librdkafka's own thread), with the bulk
//! profile's large lz4 batches. No decoding, no ordering of commits: nothing but the bytes.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    client::ClientContext,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::Message,
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer},
};

use super::{progress, BenchError, Result};
use crate::{config::KafkaConfig, kafka};

/// Counts the deliveries the broker refused.
#[derive(Default)]
struct FailedDeliveries(Arc<AtomicU64>);

impl ClientContext for FailedDeliveries {}

impl ProducerContext for FailedDeliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long the pipe waits for a record before it gives up (the input holds fewer than asked).
const STALL: Duration = Duration::from_secs(30);

/// Consumes `total` records of `input` in a fresh `group` and (given `output`) produces each
/// payload there unchanged, then waits for every acknowledgement. Records/s from the first
/// record to the last acknowledgement (joining the group is not counted).
pub async fn raw_path(
    kafka: &KafkaConfig,
    input: &str,
    output: Option<&str>,
    group: &str,
    total: u64,
) -> Result<f64> {
    let (kafka, input, output, group) = (
        kafka.clone(),
        input.to_owned(),
        output.map(str::to_owned),
        group.to_owned(),
    );
    tokio::task::spawn_blocking(move || pipe(&kafka, &input, output.as_deref(), &group, total))
        .await
        .map_err(|source| BenchError::Task {
            path: "raw".into(),
            source,
        })?
}

fn pipe(
    config: &KafkaConfig,
    input: &str,
    output: Option<&str>,
    group: &str,
    total: u64,
) -> Result<f64> {
    let consumer: BaseConsumer = kafka::bulk_consumer_config(config, group).create()?;
    consumer.subscribe(&[input])?;
    let failed = Arc::new(AtomicU64::new(0));
    let producer: Option<ThreadedProducer<FailedDeliveries>> = match output {
        Some(_) => Some(
            kafka::producer_config(config, kafka::ProducerProfile::Throughput)
                .create_with_context(FailedDeliveries(failed.clone()))?,
        ),
        None => None,
    };
    if let (Some(producer), Some(output)) = (&producer, output) {
        // As a long-running pipe's would, the producer has its producer id before the clock
        // starts (see `Producers::warm_up`).
        producer
            .send(
                BaseRecord::<'_, str, [u8]>::to(output)
                    .key(kafka::WARM_UP_KEY)
                    .payload(&[]),
            )
            .map_err(|(error, _)| error)?;
        producer.flush(Duration::from_secs(10))?;
    }
    let (mut started, mut last_record, mut last_report) = (None, Instant::now(), Instant::now());
    let mut done = 0u64;
    while done < total {
        let message = match consumer.poll(Duration::from_millis(100)) {
            Some(message) => message?,
            None if last_record.elapsed() > STALL => {
                return Err(BenchError::Stopped {
                    path: "raw".into(),
                    when: "its input ran out",
                })
            }
            None => continue,
        };
        last_record = Instant::now();
        let clock = *started.get_or_insert(last_record);
        if let (Some(producer), Some(output)) = (&producer, output) {
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(output).payload(message.payload().unwrap_or_default());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            while let Err((error, returned)) = producer.send(record) {
                match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        std::thread::sleep(Duration::from_micros(500));
                        record = returned;
                    }
                    error => return Err(error.into()),
                }
            }
        }
        done += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("raw", done, total, clock);
            last_report = Instant::now();
        }
    }
    if let Some(producer) = &producer {
        producer.flush(Duration::from_secs(60))?;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(BenchError::Undelivered {
            path: "raw".into(),
            count: failed,
        });
    }
    let elapsed = started.map_or(f64::MAX, |s| s.elapsed().as_secs_f64());
    Ok(total as f64 / elapsed)
}
