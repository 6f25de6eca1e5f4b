//! One broker hop, produce → consume, with the clients the interactive path uses: the limit a
//! dataflow of several hops cannot beat, measured on the same broker in the same run.

use std::time::{Duration, Instant};

use rdkafka::{consumer::Consumer, producer::FutureRecord, Offset, TopicPartitionList};

use super::{BenchError, Result};
use crate::{
    config::KafkaConfig,
    kafka::{self, ProducerProfile, FETCH_WAIT_MS},
};

/// Latencies of one hop, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HopLatency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The `q` quantile (0..=1) of `sorted` (ascending); zero when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sends `samples` records to partition 0 of `topic` one at a time, each as soon as the
/// previous one was consumed, and times each from the send to its arrival at a consumer that
/// reads the partition with the interactive path's fetch settings.
pub async fn hop_latency(kafka: &KafkaConfig, topic: &str, samples: usize) -> Result<HopLatency> {
    let producer = kafka::producer(kafka, ProducerProfile::Latency)?;
    let consumer = kafka::assigned_consumer(kafka, FETCH_WAIT_MS)?;
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(high))?;
    consumer.assign(&assignment)?;
    // The consumer's first fetch starts the partition; records before it are not timed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::with_capacity(samples);
    let payload = [0u8; 64];
    for sample in 0..samples {
        let key = sample.to_string();
        let sent = Instant::now();
        let delivery = producer.send_result(
            FutureRecord::to(topic)
                .partition(0)
                .key(&key)
                .payload(&payload[..]),
        );
        if delivery.is_err() {
            return Err(BenchError::Undelivered {
                path: "hop".into(),
                count: 1,
            });
        }
        let wait = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await;
        match wait {
            Ok(Ok(_)) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(BenchError::Stopped {
                    path: "hop".into(),
                    when: "a record arrived within 10 s",
                })
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(HopLatency {
        samples,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_pick_by_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), 51.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(quantile(&sorted, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
