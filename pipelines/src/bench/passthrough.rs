//! `sluice bench passthrough`: how much of the broker's speed the operator runtime keeps.
//!
//! The same N records of about 1 KB Avro go through two paths on the same broker in the same run:
//! - **raw**: a hand-built librdkafka consume → produce pipe, tuned for throughput, passes each
//!   payload on unchanged — the limit ([`raw_path`](super::raw_path));
//! - **pipeline**: the operator runtime consumes, decodes, hands each record to a passthrough
//!   operator, re-encodes, produces and stores offsets after the broker acknowledged.
//!
//! It prints records/s for both and, last, `ratio=<pipeline/raw>`.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_schemas::{ChatMessage, ChatRequest, Codec, ReplyAddress};

use super::{
    fill, raw_path, stage_metrics, BenchError, Comparison, Result, StageUnderTest, Workspace,
};
use crate::{
    config::{KafkaConfig, Wiring},
    kafka::ProducerProfile,
    runtime::StageSpec,
    BatchError, Emitter, Input, Operator, Runnable,
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

/// The measurements: raw (the limit) against the pipeline.
#[derive(Debug, Clone)]
pub struct PassthroughReport {
    /// The run's workspace id: its topics were `<id>.*`, deleted when it ended.
    pub workspace: String,
    pub records: u64,
    pub record_bytes: usize,
    pub comparison: Comparison,
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
        messages: vec![ChatMessage::text("user", content)],
        max_tokens: Some(64),
        temperature: None,
        stream: false,
        reply_to: ReplyAddress {
            topic: "bench.replies".into(),
            partition: 0,
        },
        received_at_ms: crate::now_ms(),
        allowed_models: None,
        key_id: None,
        user_id: None,
        ..Default::default()
    }
}

/// The pipeline path: the passthrough stage over `input`, timed from its first record until
/// every record is written out (or dead-lettered, which fails the benchmark).
async fn pipeline(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    (input, output, dlq): (&str, &str, &str),
    group: &str,
    options: &PassthroughOptions,
) -> Result<f64> {
    let mut spec = StageSpec::new(Wiring::new("bench", group, input, dlq));
    spec.lanes = options.lanes;
    // A bulk stage, like the limit: large compressed batches out.
    spec.producer = ProducerProfile::Throughput;
    let operator = Passthrough {
        output: output.to_owned(),
    };
    let stage = StageUnderTest::start(
        "pipeline",
        kafka,
        codec,
        stage_metrics()?,
        Runnable::operator(move |_| operator.clone(), spec),
        Some(output),
    )
    .await?;
    let written = stage
        .metrics
        .records_out
        .with_label_values(&["bench", output]);
    let dead = stage.metrics.dlq_records.with_label_values(&["bench"]);
    let seconds = stage
        .time(
            options.records,
            || written.get() + dead.get(),
            || written.get() + dead.get() >= options.records,
        )
        .await?;
    if dead.get() > 0 {
        return Err(BenchError::DeadLettered {
            path: "pipeline".into(),
            count: dead.get(),
        });
    }
    stage.stop().await?;
    Ok(options.records as f64 / seconds)
}

/// Runs the benchmark on fresh topics (`bench-<id>.*`), deleted when it ends.
pub async fn passthrough(
    kafka: &KafkaConfig,
    codec: Arc<Codec>,
    options: &PassthroughOptions,
) -> Result<PassthroughReport> {
    codec.register::<ChatRequest>().await?;
    let workspace = Workspace::create(kafka, &["in", "raw-out", "pipeline-out", "dlq"]).await?;
    let (input, dlq) = (workspace.topic("in"), workspace.topic("dlq"));
    let (raw_out, pipe_out) = (workspace.topic("raw-out"), workspace.topic("pipeline-out"));
    eprintln!("filling {input} with {} records...", options.records);
    let records = (0..options.records).map(|i| {
        let record = sample(i, options.record_bytes);
        (record.session_id.clone(), record)
    });
    let work = async {
        let record_bytes = fill(kafka, &codec, &input, records).await?;
        let comparison = Comparison::run(options.rounds, ("raw", "pipeline"), |round| {
            let (workspace, codec) = (&workspace, codec.clone());
            let (input, raw_out, pipe_out, dlq) = (&input, &raw_out, &pipe_out, &dlq);
            async move {
                eprintln!("round {round}: raw librdkafka consume + produce...");
                let group = workspace.group("raw", round);
                let raw = raw_path(kafka, input, Some(raw_out), &group, options.records).await?;
                eprintln!("round {round}: pipeline consume -> decode -> operator -> encode -> produce -> commit...");
                let group = workspace.group("pipeline", round);
                let measured =
                    pipeline(kafka, codec, (input, pipe_out, dlq), &group, options).await?;
                Ok((raw, measured))
            }
        })
        .await?;
        Ok(PassthroughReport {
            workspace: workspace.id().to_owned(),
            records: options.records,
            record_bytes,
            comparison,
        })
    };
    workspace.run(kafka, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_records_are_about_the_asked_size() {
        let record = sample(7, 1024);
        let bytes = sluice_schemas::codec::encode_body(&record).unwrap();
        assert!((900..1200).contains(&bytes.len()), "{}", bytes.len());
    }
}
