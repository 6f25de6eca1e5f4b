//! Reading the DLQ and replaying dead letters to the topics they came from (`sluice dlq`).

use std::time::{Duration, Instant};

use rdkafka::{
    consumer::Consumer,
    message::{Header, Message, OwnedHeaders},
    producer::FutureRecord,
    Offset, TopicPartitionList,
};
use sluice_schemas::{Codec, DeadLetter};

use crate::{
    config::KafkaConfig,
    kafka::{self, ProducerProfile},
    Error, Result,
};

/// Header set on replayed records: the DLQ coordinates they were replayed from.
pub const REPLAYED_FROM: &str = "sluice-replayed-from";

/// A dead letter and where it sits in the DLQ.
#[derive(Debug, Clone)]
pub struct Entry {
    pub partition: i32,
    pub offset: i64,
    pub letter: DeadLetter,
}

impl Entry {
    /// `partition:offset` in the DLQ, the form `sluice dlq replay` takes.
    pub fn position(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
}

/// Every dead letter in `topic`, oldest first per partition. Records that are not dead letters
/// are reported and skipped.
pub async fn read_all(config: &KafkaConfig, codec: &Codec, topic: &str) -> Result<Vec<Entry>> {
    let consumer = kafka::assigned_consumer(config, 100)?;
    let partitions = kafka::partition_count(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        if high > low {
            assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
            ends.insert(partition, high);
            remaining += high - low;
        }
    }
    let mut entries = Vec::new();
    if remaining == 0 {
        return Ok(entries);
    }
    consumer.assign(&assignment)?;
    let total = remaining;
    let mut last_report = Instant::now();
    while !ends.is_empty() {
        let message = read_next(&consumer).await?;
        let partition = message.partition();
        if let Some(end) = ends.get(&partition).copied() {
            if message.offset() + 1 >= end {
                ends.remove(&partition);
            }
        }
        remaining -= 1;
        match codec
            .decode::<DeadLetter>(message.payload().unwrap_or_default())
            .await
        {
            Ok(letter) => entries.push(Entry {
                partition,
                offset: message.offset(),
                letter,
            }),
            Err(e) => eprintln!(
                "skipping {partition}:{}: not a dead letter ({e})",
                message.offset()
            ),
        }
        if last_report.elapsed() > Duration::from_secs(1) {
            eprintln!("read {}/{total} dead letters", total - remaining);
            last_report = Instant::now();
        }
    }
    Ok(entries)
}

async fn read_next(consumer: &kafka::KafkaConsumer) -> Result<rdkafka::message::OwnedMessage> {
    match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
        Ok(Ok(message)) => Ok(message.detach()),
        Ok(Err(e)) => Err(Error::Kafka(e)),
        Err(_) => Err(Error::Stalled(
            "the DLQ stopped answering before its end".into(),
        )),
    }
}

/// Sends each entry's original record back to its source topic, with its original key and a
/// `sluice-replayed-from` header. Returns how many were replayed.
pub async fn replay(config: &KafkaConfig, entries: &[Entry]) -> Result<usize> {
    let producer = kafka::producer(config, ProducerProfile::Throughput)?;
    let mut replayed = 0;
    for entry in entries {
        let Some(payload) = entry.letter.payload.as_deref() else {
            eprintln!("{}: no original bytes to replay", entry.position());
            continue;
        };
        let position = entry.position();
        let headers = OwnedHeaders::new().insert(Header {
            key: REPLAYED_FROM,
            value: Some(position.as_bytes()),
        });
        let mut record = FutureRecord::to(&entry.letter.source_topic)
            .payload(payload)
            .headers(headers);
        if let Some(key) = entry.letter.key.as_deref() {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(Error::Kafka)?;
        replayed += 1;
        if replayed % 1000 == 0 {
            eprintln!("replayed {replayed}/{}", entries.len());
        }
    }
    Ok(replayed)
}
