//! The benchmark harness every `sluice bench` uses: fresh topics, the raw librdkafka path that
//! is the limit, a stage timed from its first record, rounds that alternate the paths, and the
//! summary with the ratio each benchmark prints last.
//!
//! A benchmark measures Sluice against what a user could build by hand with the same client on
//! the same broker, in the same run: the limit is measured, never assumed.

pub mod hop;
pub mod passthrough;
mod raw;

pub use raw::raw_path;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_schemas::{Codec, Record};
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaConfig, kafka, metrics::Metrics, ops::Readiness, runtime::StageDeps, Runnable,
};

/// Why a benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The runtime or the broker failed.
    #[error(transparent)]
    Runtime(#[from] crate::Error),
    /// A record could not be encoded or a schema registered.
    #[error(transparent)]
    Schema(#[from] sluice_schemas::Error),
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The stage under test stopped before it was done.
    #[error("{path}: the stage stopped before {when}")]
    Stopped { path: String, when: &'static str },
    /// The stage under test panicked or was aborted.
    #[error("{path}: the stage's task failed: {source}")]
    Task {
        path: String,
        source: tokio::task::JoinError,
    },
    /// Records that should have gone through went to the DLQ.
    #[error("{path}: {count} records went to the DLQ")]
    DeadLettered { path: String, count: u64 },
    /// The benchmark's own set-up failed (a definition it uses does not compile, say).
    #[error("setting up: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Outputs the broker did not acknowledge.
    #[error("{path}: {count} deliveries failed")]
    Undelivered { path: String, count: u64 },
}

/// Result with [`BenchError`].
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// One benchmark run's fresh topics and groups, all named `bench-<id>.…`.
pub struct Workspace {
    id: String,
    topics: Vec<String>,
}

impl Workspace {
    /// A new workspace; creates the topics `bench-<id>.<suffix>` for each of `suffixes`.
    pub async fn create(kafka: &KafkaConfig, suffixes: &[&str]) -> Result<Self> {
        let mut workspace = Self {
            id: format!("bench-{}", crate::now_ms()),
            topics: Vec::new(),
        };
        workspace.topics = suffixes.iter().map(|s| workspace.topic(s)).collect();
        let names: Vec<&str> = workspace.topics.iter().map(String::as_str).collect();
        kafka::ensure_topics(kafka, &names).await?;
        Ok(workspace)
    }

    /// Deletes the workspace's topics, so that repeated runs do not pile records up in the
    /// broker (the local one keeps them in memory). A failure is reported, not returned: the
    /// measurements stand.
    pub async fn remove(&self, kafka: &KafkaConfig) {
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        remove_topics(kafka, &self.id, &names).await;
    }

    /// Runs `work` (a benchmark on this workspace), then [removes](Self::remove) the topics
    /// whatever its outcome.
    pub async fn run<T>(&self, kafka: &KafkaConfig, work: impl Future<Output = T>) -> T {
        let outcome = work.await;
        self.remove(kafka).await;
        outcome
    }

    /// The workspace's id (`bench-<ms>`), for names outside the broker (tenant ids, say).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The topic `bench-<id>.<suffix>`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.id)
    }

    /// A fresh consumer group for `path` in `round`.
    pub fn group(&self, path: &str, round: usize) -> String {
        format!("{}.{path}.{round}", self.id)
    }
}

/// Deletes a benchmark run's `topics` (all named `<id>.…`) and says so on stderr; a failure is
/// reported, not returned: the measurements stand.
pub async fn remove_topics(kafka: &KafkaConfig, id: &str, topics: &[&str]) {
    match kafka::delete_topics(kafka, topics).await {
        Ok(deleted) => eprintln!("deleted {} topic(s) {id}.*", deleted.len()),
        Err(e) => eprintln!("could not delete the topics {id}.*: {e}"),
    }
}

/// Encodes `records` and produces them to `topic` keyed as given, waiting for every
/// acknowledgement; returns the size of the last record's frame (bytes).
pub async fn fill<T: Record>(
    kafka: &KafkaConfig,
    codec: &Codec,
    topic: &str,
    records: impl Iterator<Item = (String, T)>,
) -> Result<usize> {
    let mut size = 0;
    let frames = records.map(|(key, record)| {
        let bytes = codec.encode(&record)?;
        size = bytes.len();
        Ok((key, bytes))
    });
    kafka::produce_all(kafka, topic, frames).await?;
    Ok(size)
}

/// Prints `label`'s progress: records done of `total`, and the rate since `started`.
pub fn progress(label: &str, done: u64, total: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "  {label}: {done}/{total} records, {:.0}/s",
        done as f64 / secs
    );
}

/// The stage a benchmark measures, running in this process with its own metrics.
pub struct StageUnderTest {
    /// Label for progress lines and errors.
    path: String,
    /// The stage's metrics (its counters say how far it got).
    pub metrics: Arc<Metrics>,
    /// Records the stage has consumed (its clock starts at the first).
    consumed: prometheus::IntCounter,
    task: tokio::task::JoinHandle<crate::Result<()>>,
    cancel: CancellationToken,
}

/// Fresh metrics for a stage under test, for operators that take their handles when built.
pub fn stage_metrics() -> Result<Arc<Metrics>> {
    Ok(Arc::new(Metrics::new().map_err(crate::Error::from)?))
}

impl StageUnderTest {
    /// Starts `stage` (built with `metrics`) on `kafka`, labelled `path`; its producers are
    /// warmed up on `output` first, if it writes to a topic ([`Producers::warm_up`]).
    ///
    /// [`Producers::warm_up`]: crate::kafka::Producers::warm_up
    pub async fn start(
        path: &str,
        kafka: &KafkaConfig,
        codec: Arc<Codec>,
        metrics: Arc<Metrics>,
        stage: Runnable,
        output: Option<&str>,
    ) -> Result<Self> {
        let consumed = metrics.records_in.with_label_values(&[stage.name()]);
        let producers = crate::kafka::Producers::new(kafka)?;
        if let Some(topic) = output {
            producers.warm_up(topic).await?;
        }
        let deps = StageDeps {
            kafka: kafka.clone(),
            producers,
            codec,
            metrics: metrics.clone(),
            readiness: Readiness::default(),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(stage.run(deps, cancel.clone()));
        Ok(Self {
            path: path.to_owned(),
            metrics,
            consumed,
            task,
            cancel,
        })
    }

    /// Records the stage has consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed.get()
    }

    /// Seconds from the stage's first record until `done()` holds, with progress (records
    /// `progressed()` of `total`) once a second. Fails if the stage stops first.
    pub async fn time(
        &self,
        total: u64,
        progressed: impl Fn() -> u64,
        done: impl Fn() -> bool,
    ) -> Result<f64> {
        while self.consumed() == 0 {
            self.check_running("its first record")?;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let started = Instant::now();
        let mut last_report = Instant::now();
        while !done() {
            self.check_running("finishing")?;
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(&self.path, progressed(), total, started);
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    fn check_running(&self, when: &'static str) -> Result<()> {
        if self.task.is_finished() {
            return Err(BenchError::Stopped {
                path: self.path.clone(),
                when,
            });
        }
        Ok(())
    }

    /// Stops the stage (it drains and commits) and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        let path = self.path;
        self.task
            .await
            .map_err(|source| BenchError::Task { path, source })??;
        Ok(())
    }
}

/// Rates of one path over rounds: the median and the slowest and fastest round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub slowest: f64,
    pub fastest: f64,
}

impl Summary {
    /// Summarizes per-round rates.
    pub fn of(rates: &[f64]) -> Self {
        let mut sorted = rates.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Self {
            median,
            slowest: sorted.first().copied().unwrap_or(0.0),
            fastest: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

/// The limit and the measured path, summarized over the same rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub limit: Summary,
    pub measured: Summary,
}

impl Comparison {
    /// Runs `rounds` rounds (at least one) of `round(n)`, which measures the limit then the
    /// path under test and returns both rates (records/s), and summarizes them; each round's
    /// rates are printed under `labels` (the limit's, the measured path's).
    pub async fn run<F, Fut>(rounds: usize, labels: (&str, &str), mut round: F) -> Result<Self>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<(f64, f64)>>,
    {
        let (mut limits, mut measured) = (Vec::new(), Vec::new());
        for n in 1..=rounds.max(1) {
            let (limit, rate) = round(n).await?;
            eprintln!(
                "round {n}: {} {limit:.0}/s, {} {rate:.0}/s",
                labels.0, labels.1
            );
            limits.push(limit);
            measured.push(rate);
        }
        Ok(Self {
            limit: Summary::of(&limits),
            measured: Summary::of(&measured),
        })
    }

    /// The measured path's median over the limit's; zero when the limit is zero.
    pub fn ratio(&self) -> f64 {
        if self.limit.median > 0.0 {
            self.measured.median / self.limit.median
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_take_the_median_and_the_extremes() {
        assert_eq!(
            Summary::of(&[3.0, 1.0, 2.0]),
            Summary {
                median: 2.0,
                slowest: 1.0,
                fastest: 3.0
            }
        );
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert_eq!(Summary::of(&[]).median, 0.0);
        let comparison = Comparison {
            limit: Summary::of(&[100.0]),
            measured: Summary::of(&[50.0]),
        };
        assert_eq!(comparison.ratio(), 0.5);
    }
}
