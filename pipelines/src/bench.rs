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
    consumer::{Consumer, StreamConsumer},
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
    Emitter, Error, Operator, ProcessError, RecordContext, Result,
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
}

/// The measurements.
#[derive(Debug, Clone)]
pub struct PassthroughReport {
    pub records: u64,
    pub record_bytes: usize,
    pub raw_per_sec: f64,
    pub pipeline_per_sec: f64,
}

impl PassthroughReport {
    /// Pipeline throughput over raw throughput.
    pub fn ratio(&self) -> f64 {
        if self.raw_per_sec > 0.0 {
            self.pipeline_per_sec / self.raw_per_sec
        } else {
            0.0
        }
    }
}

/// The operator under test: decodes and re-emits each record unchanged.
struct Passthrough {
    output: String,
}

#[async_trait]
impl Operator for Passthrough {
    type Input = ChatRequest;

    async fn process(
        &self,
        input: ChatRequest,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let key = ctx.key.clone().unwrap_or_default();
        out.emit(&self.output, None, &key, &input).await
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

fn progress(label: &str, done: u64, total: u64, started: Instant) {
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
    let producer = kafka::producer(kafka, ProducerProfile::Throughput)?;
    let mut pending = Vec::new();
    let mut size = 0;
    for i in 0..options.records {
        let record = sample(i, options.record_bytes);
        let bytes = codec.encode(&record)?;
        size = bytes.len();
        loop {
            let future = FutureRecord::to(topic)
                .key(&record.session_id)
                .payload(&bytes);
            match producer.send_result(future) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await
                    .map_err(|_| Error::Invalid("fill delivery cancelled".into()))?
                    .map_err(|(e, _)| Error::Kafka(e))?;
            }
        }
    }
    for d in pending {
        d.await
            .map_err(|_| Error::Invalid("fill delivery cancelled".into()))?
            .map_err(|(e, _)| Error::Kafka(e))?;
    }
    Ok(size)
}

async fn raw(
    kafka: &KafkaConfig,
    input: &str,
    output: &str,
    group: &str,
    total: u64,
) -> Result<f64> {
    let consumer: StreamConsumer = kafka::consumer(kafka, group, 100)?;
    consumer.subscribe(&[input])?;
    let producer: FutureProducer = kafka::producer(kafka, ProducerProfile::Throughput)?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut pending = Vec::with_capacity(4096);
    let mut done = 0u64;
    while done < total {
        let message = consumer.recv().await?;
        loop {
            let mut record =
                FutureRecord::to(output).payload(message.payload().unwrap_or_default());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        done += 1;
        if pending.len() >= 4096 {
            for d in pending.drain(..) {
                let _ = d.await;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress("raw", done, total, started);
            last_report = Instant::now();
        }
    }
    for d in pending {
        d.await
            .map_err(|_| Error::Invalid("delivery cancelled".into()))?
            .map_err(|(e, _)| Error::Kafka(e))?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
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
    let operator = Arc::new(Passthrough {
        output: output.to_owned(),
    });
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let stage = tokio::spawn(runtime::run_operator(operator, spec, deps, cancel.clone()));
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
    eprintln!("raw librdkafka consume + produce...");
    let raw_per_sec = raw(
        kafka,
        &input,
        &raw_out,
        &format!("{id}.raw"),
        options.records,
    )
    .await?;
    eprintln!("pipeline consume -> decode -> operator -> encode -> produce -> commit...");
    let pipeline_per_sec = pipeline(
        kafka,
        codec,
        (&input, &pipe_out, &dlq),
        &format!("{id}.pipeline"),
        options,
    )
    .await?;
    Ok(PassthroughReport {
        records: options.records,
        record_bytes,
        raw_per_sec,
        pipeline_per_sec,
    })
}
