//! `sluice bench passthrough`: how much of the broker's speed the operator runtime keeps.
//!
//! The same N records of about 1 KB Avro go through two paths on the same broker in the same run:
//! - **raw**: librdkafka consumes them and produces each payload unchanged — the ceiling;
//! - **pipeline**: the operator runtime consumes, decodes, hands each record to a passthrough
//!   operator, re-encodes, produces and stores offsets after the broker acknowledged.
//!
//! It prints records/s for both and, last, `ratio=<pipeline/raw>`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rdkafka::{
    consumer::Consumer,
    message::Message,
    producer::{FutureProducer, FutureRecord},
};
use sluice_schemas::{ChatMessage, ChatRequest, Codec, ReplyAddress};
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaConfig,
    kafka::{self, ProducerProfile},
    metrics::Metrics,
    ops::Readiness,
    runtime::{self, StageDeps, StageSpec},
    BatchError, Emitter, Error, Input, Operator, Result,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct PassthroughOptions {
    /// Records per path.
    pub records: u64,
    /// Approximate size of each encoded record, bytes.
    pub record_bytes: usize,
    /// Concurrency of the pipeline path.
    pub lanes: usize,
    /// Times each path runs (alternating, each with a fresh consumer group); the median counts.
    pub rounds: usize,
}

/// The measurements.
#[derive(Debug, Clone)]
pub struct PassthroughReport {
    pub records: u64,
    pub record_bytes: usize,
    /// Median records/s of the raw path, and its slowest and fastest round.
    pub raw_per_sec: f64,
    pub raw_range: (f64, f64),
    /// Median records/s of the pipeline path, and its slowest and fastest round.
    pub pipeline_per_sec: f64,
    pub pipeline_range: (f64, f64),
}

impl PassthroughReport {
    /// Pipeline throughput over raw throughput.
    pub fn ratio(&self) -> f64 {
        ratio(self.pipeline_per_sec, self.raw_per_sec)
    }
}

/// The operator under test: decodes and re-emits each record unchanged.
#[derive(Clone)]
struct Passthrough {
    output: String,
}

#[async_trait]
impl Operator for Passthrough {
    type Input = ChatRequest;

    async fn process(
        &mut self,
        batch: &[Input<ChatRequest>],
        out: &mut Emitter,
    ) -> Result<(), BatchError> {
        for (completed, input) in batch.iter().enumerate() {
            let key = input.ctx.key.as_deref().unwrap_or_default();
            out.emit(&self.output, None, key, &input.record)
                .await
                .map_err(|error| BatchError { completed, error })?;
        }
        Ok(())
    }
}

fn sample(i: u64, record_bytes: usize) -> ChatRequest {
    // Fields other than the content take about 150 bytes encoded.
    let content: String = "sluice ".repeat(record_bytes.saturating_sub(150) / 7 + 1);
    ChatRequest {
        request_id: format!("bench-{i:012}"),
        tenant_id: "00000000-0000-0000-0000-000000000000".into(),
        session_id: format!("session-{}", i % 1024),
        model: "sim-small".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content,
            name: None,
        }],
        max_tokens: Some(64),
        temperature: None,
        stream: false,
        reply_to: ReplyAddress {
            topic: "bench.replies".into(),
            partition: 0,
        },
        received_at_ms: crate::now_ms(),
    }
}

/// Prints `label`'s progress: records done of `total`, and the rate since `started`.
pub fn progress(label: &str, done: u64, total: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "  {label}: {done}/{total} records, {:.0}/s",
        done as f64 / secs
    );
}

async fn fill(
    kafka: &KafkaConfig,
    codec: &Codec,
    topic: &str,
    options: &PassthroughOptions,
) -> Result<usize> {
    let mut size = 0;
    let records = (0..options.records).map(|i| {
        let record = sample(i, options.record_bytes);
        let bytes = codec.encode(&record)?;
        size = bytes.len();
        Ok((record.session_id, bytes))
    });
    kafka::produce_all(kafka, topic, records).await?;
    Ok(size)
}

/// Waits for a stage's first record (its clock starts there, so joining the group is not
/// counted); fails if the stage stops first.
pub async fn first_record<T>(
    consumed: &prometheus::IntCounter,
    stage: &tokio::task::JoinHandle<T>,
) -> Result<Instant> {
    while consumed.get() == 0 {
        if stage.is_finished() {
            return Err(Error::Invalid(
                "the stage stopped before its first record".into(),
            ));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(Instant::now())
}

async fn raw(
    kafka: &KafkaConfig,
    input: &str,
    output: &str,
    group: &str,
    total: u64,
) -> Result<f64> {
    let consumer: kafka::KafkaConsumer = kafka::consumer(kafka, group, 100, None, None)?;
    consumer.subscribe(&[input])?;
    let producer: FutureProducer = kafka::producer(kafka, ProducerProfile::Throughput)?;
    // Acknowledgements are awaited off the consume loop, so it never stalls on them.
    let (acks, mut pending) = tokio::sync::mpsc::channel(100_000);
    let acknowledger = tokio::spawn(async move {
        let mut failed = 0u64;
        while let Some(delivery) = pending.recv().await {
            let delivery: rdkafka::producer::DeliveryFuture = delivery;
            if !matches!(delivery.await, Ok(Ok(_))) {
                failed += 1;
            }
        }
        failed
    });
    // The clock starts at the first record, so joining the group is not counted.
    let mut started: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut done = 0u64;
    while done < total {
        let message = consumer.recv().await?;
        let clock = *started.get_or_insert_with(Instant::now);
        loop {
            let mut record =
                FutureRecord::to(output).payload(message.payload().unwrap_or_default());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    acks.send(delivery)
                        .await
                        .map_err(|_| Error::Invalid("acknowledger stopped".into()))?;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        done += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("raw", done, total, clock);
            last_report = Instant::now();
        }
    }
    drop(acks);
    let failed = acknowledger
        .await
        .map_err(|e| Error::Invalid(format!("acknowledger: {e}")))?;
    if failed > 0 {
        return Err(Error::Invalid(format!("{failed} raw deliveries failed")));
    }
    let elapsed = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(f64::MAX);
    Ok(total as f64 / elapsed)
}

async fn pipeline(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    topics: (&str, &str, &str),
    group: &str,
    options: &PassthroughOptions,
) -> Result<f64> {
    let (input, output, dlq) = topics;
    let metrics = Arc::new(Metrics::new().map_err(|e| Error::Config(e.to_string()))?);
    let deps = StageDeps {
        kafka: kafka.clone(),
        codec,
        metrics: metrics.clone(),
        readiness: Readiness::default(),
    };
    let mut spec = StageSpec::new("bench", group, input, dlq);
    spec.lanes = options.lanes;
    let operator = Passthrough {
        output: output.to_owned(),
    };
    let cancel = CancellationToken::new();
    let stage = tokio::spawn(runtime::run_operator(
        move |_| operator.clone(),
        spec,
        deps,
        cancel.clone(),
    ));
    let consumed = metrics.records_in.with_label_values(&["bench"]);
    let started = first_record(&consumed, &stage).await?;
    let written = metrics.records_out.with_label_values(&["bench", output]);
    let dead = metrics.dlq_records.with_label_values(&["bench"]);
    let mut last_report = Instant::now();
    loop {
        let done = written.get() + dead.get();
        if done >= options.records {
            break;
        }
        if stage.is_finished() {
            return Err(Error::Invalid(
                "the pipeline stopped before finishing".into(),
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("pipeline", done, options.records, started);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if dead.get() > 0 {
        return Err(Error::Invalid(format!(
            "{} records went to the DLQ",
            dead.get()
        )));
    }
    cancel.cancel();
    stage
        .await
        .map_err(|e| Error::Invalid(format!("pipeline task: {e}")))??;
    Ok(options.records as f64 / elapsed)
}

/// Runs the benchmark on fresh topics and deletes nothing (topics are named `bench-<id>.*`).
pub async fn passthrough(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    options: &PassthroughOptions,
) -> Result<PassthroughReport> {
    codec.register::<ChatRequest>().await?;
    let id = format!("bench-{}", crate::now_ms());
    let input = format!("{id}.in");
    let raw_out = format!("{id}.raw-out");
    let pipe_out = format!("{id}.pipeline-out");
    let dlq = format!("{id}.dlq");
    kafka::ensure_topics(kafka, &[&input, &raw_out, &pipe_out, &dlq]).await?;
    eprintln!("filling {input} with {} records...", options.records);
    let record_bytes = fill(kafka, &codec, &input, options).await?;
    let mut raws = Vec::new();
    let mut pipelines = Vec::new();
    for round in 1..=options.rounds.max(1) {
        eprintln!("round {round}: raw librdkafka consume + produce...");
        let raw_rate = raw(
            kafka,
            &input,
            &raw_out,
            &format!("{id}.raw.{round}"),
            options.records,
        )
        .await?;
        eprintln!("round {round}: pipeline consume -> decode -> operator -> encode -> produce -> commit...");
        let group = format!("{id}.pipeline.{round}");
        let pipeline_rate = pipeline(
            kafka,
            codec.clone(),
            (&input, &pipe_out, &dlq),
            &group,
            options,
        )
        .await?;
        eprintln!("round {round}: raw {raw_rate:.0}/s, pipeline {pipeline_rate:.0}/s");
        raws.push(raw_rate);
        pipelines.push(pipeline_rate);
    }
    let (raw_per_sec, raw_range) = summarize(&mut raws);
    let (pipeline_per_sec, pipeline_range) = summarize(&mut pipelines);
    Ok(PassthroughReport {
        records: options.records,
        record_bytes,
        raw_per_sec,
        raw_range,
        pipeline_per_sec,
        pipeline_range,
    })
}

/// The median of per-round rates and their (slowest, fastest) round.
pub fn summarize(rates: &mut [f64]) -> (f64, (f64, f64)) {
    let median = median(rates);
    let slowest = rates.first().copied().unwrap_or(0.0);
    let fastest = rates.last().copied().unwrap_or(0.0);
    (median, (slowest, fastest))
}

/// `part` over `limit`; zero when the limit is zero.
pub fn ratio(part: f64, limit: f64) -> f64 {
    if limit > 0.0 {
        part / limit
    } else {
        0.0
    }
}

/// The median (sorts `values`).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn sample_records_are_about_the_asked_size() {
        let record = sample(7, 1024);
        let bytes = sluice_schemas::codec::encode_body(&record).unwrap();
        assert!((900..1200).contains(&bytes.len()), "{}", bytes.len());
    }
}
