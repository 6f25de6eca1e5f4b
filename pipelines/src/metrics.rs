//! Prometheus metrics: every name in one place, shared by the code and `dashboards/`.
//!
//! One [`Metrics`] value per process, registered in its own registry and served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Records a stage consumed, by `stage`.
pub const RECORDS_IN: &str = "sluice_records_in_total";
/// Records a stage produced and the broker acknowledged, by `stage` and `topic`.
pub const RECORDS_OUT: &str = "sluice_records_out_total";
/// Records sent to the DLQ, by `stage`.
pub const DLQ_RECORDS: &str = "sluice_dlq_records_total";
/// Retries after a retriable failure, by `stage`.
pub const RETRIES: &str = "sluice_retries_total";
/// Seconds from a batch's arrival at a stage to its outputs being acknowledged, by `stage`.
pub const PROCESS_SECONDS: &str = "sluice_process_seconds";
/// Records per batch an operator processed, by `stage`.
pub const BATCH_RECORDS: &str = "sluice_batch_records";
/// Times a stage's consumer waited for room in a full lane (backpressure), by `stage`.
pub const LANE_FULL_WAITS: &str = "sluice_lane_full_waits_total";
/// Times a stage paused its input partitions because downstream stayed full (backpressure),
/// by `stage`.
pub const CONSUMER_PAUSES: &str = "sluice_consumer_pauses_total";
/// 1 while a stage's input partitions are paused for backpressure, else 0, by `stage`.
pub const CONSUMER_PAUSED: &str = "sluice_consumer_paused";
/// Event-time watermark of a stage's input partition (ms since the epoch), by `stage` and
/// `partition`; now minus this is how far behind event time the stage is.
pub const WATERMARK_MS: &str = "sluice_watermark_ms";
/// Records that arrived after their window closed (beyond the allowed lateness), counted and
/// left out of the window's result, by `stage`.
pub const LATE_RECORDS: &str = "sluice_late_records_total";
/// Windows a streaming SQL stage's query failed on (logged with their partition and first
/// offset, and left out), by `stage`.
pub const WINDOW_FAILURES: &str = "sluice_window_failures_total";
/// Rows of window results a streaming SQL stage emitted, by `stage`.
pub const WINDOW_ROWS: &str = "sluice_window_rows_total";
/// Rows a streaming SQL stage keeps in its open windows right now (partial aggregate states,
/// or records' rows for a query kept whole), by `stage`: what its windows' memory follows.
pub const WINDOW_HELD_ROWS: &str = "sluice_window_held_rows";
/// Records being processed right now, by `stage`.
pub const IN_FLIGHT: &str = "sluice_in_flight_records";
/// Records not yet committed by a consumer group, by `group`, `topic` and `partition`
/// (high watermark minus committed offset). Scale a stage on this (e.g. KEDA's Prometheus
/// scaler on `sum by (group) (sluice_consumer_lag)`).
pub const CONSUMER_LAG: &str = "sluice_consumer_lag";
/// Rebalances a consumer went through (partitions assigned or revoked), by `group`.
pub const REBALANCES: &str = "sluice_rebalances_total";
/// Rows a sink wrote, by `sink`.
pub const SINK_ROWS: &str = "sluice_sink_rows_total";
/// Rows a sink skipped because they were already stored (redeliveries), by `sink`.
pub const SINK_DUPLICATES: &str = "sluice_sink_duplicates_total";
/// Seconds a sink batch took to write, by `sink`.
pub const SINK_BATCH_SECONDS: &str = "sluice_sink_batch_seconds";
/// HTTP requests the edge answered, by `route` and `status`.
pub const HTTP_REQUESTS: &str = "sluice_http_requests_total";
/// Seconds the edge took to answer (to the first byte for streams), by `route`.
pub const HTTP_SECONDS: &str = "sluice_http_request_seconds";
/// Reply chunks the edge received for requests no longer waiting (client gone), total.
pub const ORPHAN_REPLIES: &str = "sluice_edge_orphan_replies_total";
/// Chat requests the edge turned away because it was at `edge.max_in_flight`, total.
pub const EDGE_SHED: &str = "sluice_edge_shed_total";
/// Open streams (SSE and WebSocket) on the edge.
pub const OPEN_STREAMS: &str = "sluice_edge_open_streams";
/// Chat requests refused with 429 for a limit, by the limit's kind, total.
pub const LIMIT_REFUSALS: &str = "sluice_edge_limit_refusals_total";
/// Times the limits' counters (Redis) could not be reached, total.
pub const LIMIT_STORE_ERRORS: &str = "sluice_edge_limit_store_errors_total";
/// Calls to the limits' counters (Redis), by `purpose`: `admit` (a request no share could
/// cover), `settle` (a batch of settlements), `sync` (shares topped up, handed back or
/// renewed), `renew` (a long request's own concurrency place), `login`.
pub const LIMIT_STORE_CALLS: &str = "sluice_edge_limit_store_calls_total";
/// WebSocket sessions closed, by `reason` (normal, heartbeat, slow_reader, unauthorized, drain).
pub const WS_CLOSES: &str = "sluice_edge_ws_closes_total";
/// WebSocket streams resumed, by `outcome` (complete, refused, stream_not_found, timeout, failed).
pub const WS_RESUMES: &str = "sluice_edge_ws_resumes_total";
/// Changes to keys, plans or subscriptions the edge was told of, total.
pub const AUTH_CHANGES: &str = "sluice_edge_auth_changes_total";
/// Webhook delivery attempts, by `outcome`: `delivered`, `retrying`, `failed` (no attempts
/// left), total.
pub const WEBHOOK_ATTEMPTS: &str = "sluice_webhook_attempts_total";
/// Notifications (webhook events) a process put on `sluice.notifications`, by `type`, total.
pub const NOTIFICATIONS: &str = "sluice_notifications_total";

/// Tool calls, by `tool` and `outcome`: `ok`, `failed` (refused by the tool, not retried),
/// `exhausted` (retriable failures until no attempt was left), `breaker_open` and
/// `bulkhead_full` (turned away before reaching the tool), total.
pub const TOOL_CALLS: &str = "sluice_tool_calls_total";
/// Attempts at a tool call after its first, by `tool`, total.
pub const TOOL_RETRIES: &str = "sluice_tool_retries_total";
/// Circuit breakers (one per tool and tenant) in each state, by `tool` and `state` (`open`,
/// `half_open`; a breaker not counted is closed).
pub const TOOL_BREAKERS: &str = "sluice_tool_breakers";
/// Seconds a tool call took, retries and backoff included, by `tool`.
pub const TOOL_SECONDS: &str = "sluice_tool_call_seconds";
/// Workflow step transitions written, by `workflow` and `kind` (`step_completed`, `branched`,
/// `step_failed`, `compensated`, and the run's end: `ended`, `handed_off`, `failed`), total.
pub const WORKFLOW_STEPS: &str = "sluice_workflow_steps_total";
/// Seconds the workflow stage took to run one step (its tool or model calls included, the
/// broker hop to the next event not), by `workflow`.
pub const WORKFLOW_STEP_SECONDS: &str = "sluice_workflow_step_seconds";

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    pub records_in: IntCounterVec,
    pub records_out: IntCounterVec,
    pub dlq_records: IntCounterVec,
    pub retries: IntCounterVec,
    pub process_seconds: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub batch_records: HistogramVec,
    pub lane_full_waits: IntCounterVec,
    pub consumer_pauses: IntCounterVec,
    pub consumer_paused: IntGaugeVec,
    pub watermark_ms: IntGaugeVec,
    pub late_records: IntCounterVec,
    pub window_rows: IntCounterVec,
    pub window_held_rows: IntGaugeVec,
    pub window_failures: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub rebalances: IntCounterVec,
    pub sink_rows: IntCounterVec,
    pub sink_duplicates: IntCounterVec,
    pub sink_batch_seconds: HistogramVec,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub orphan_replies: IntCounter,
    pub edge_shed: IntCounter,
    pub open_streams: IntGaugeVec,
    pub ws_closes: IntCounterVec,
    pub ws_resumes: IntCounterVec,
    pub limit_refusals: IntCounterVec,
    pub limit_store_errors: IntCounter,
    pub limit_store_calls: IntCounterVec,
    pub auth_changes: IntCounter,
    pub webhook_attempts: IntCounterVec,
    pub notifications: IntCounterVec,
    pub tool_calls: IntCounterVec,
    pub tool_retries: IntCounterVec,
    pub tool_breakers: IntGaugeVec,
    pub tool_seconds: HistogramVec,
    pub workflow_steps: IntCounterVec,
    pub workflow_step_seconds: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<HistogramVec> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            records_in: counter(RECORDS_IN, "Records a stage consumed.", &["stage"])?,
            records_out: counter(
                RECORDS_OUT,
                "Records a stage produced (acknowledged).",
                &["stage", "topic"],
            )?,
            dlq_records: counter(DLQ_RECORDS, "Records sent to the DLQ.", &["stage"])?,
            retries: counter(RETRIES, "Retries after retriable failures.", &["stage"])?,
            process_seconds: histogram(
                PROCESS_SECONDS,
                "Batch arrival to outputs acknowledged.",
                &["stage"],
            )?,
            in_flight: gauge(IN_FLIGHT, "Records being processed.", &["stage"])?,
            batch_records: {
                let h = HistogramVec::new(
                    HistogramOpts::new(BATCH_RECORDS, "Records per processed batch.").buckets(
                        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                    ),
                    &["stage"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            lane_full_waits: counter(
                LANE_FULL_WAITS,
                "Waits for room in a full lane (backpressure).",
                &["stage"],
            )?,
            consumer_pauses: counter(
                CONSUMER_PAUSES,
                "Pauses of a stage's input partitions (backpressure).",
                &["stage"],
            )?,
            consumer_paused: gauge(
                CONSUMER_PAUSED,
                "1 while a stage's input partitions are paused (backpressure).",
                &["stage"],
            )?,
            watermark_ms: gauge(
                WATERMARK_MS,
                "Event-time watermark per input partition.",
                &["stage", "partition"],
            )?,
            late_records: counter(
                LATE_RECORDS,
                "Records later than the allowed lateness.",
                &["stage"],
            )?,
            window_rows: counter(WINDOW_ROWS, "Window result rows emitted.", &["stage"])?,
            window_held_rows: gauge(
                WINDOW_HELD_ROWS,
                "Rows kept in open windows (aggregate states or rows).",
                &["stage"],
            )?,
            window_failures: counter(
                WINDOW_FAILURES,
                "Windows the query failed on, left out.",
                &["stage"],
            )?,
            consumer_lag: gauge(
                CONSUMER_LAG,
                "Records not yet committed by a consumer group.",
                &["group", "topic", "partition"],
            )?,
            rebalances: counter(REBALANCES, "Rebalances (assign or revoke).", &["group"])?,
            sink_rows: counter(SINK_ROWS, "Rows a sink wrote.", &["sink"])?,
            sink_duplicates: counter(
                SINK_DUPLICATES,
                "Rows skipped as already stored.",
                &["sink"],
            )?,
            sink_batch_seconds: histogram(SINK_BATCH_SECONDS, "Sink batch write time.", &["sink"])?,
            http_requests: counter(
                HTTP_REQUESTS,
                "HTTP requests answered.",
                &["route", "status"],
            )?,
            http_seconds: histogram(HTTP_SECONDS, "HTTP time to response head.", &["route"])?,
            orphan_replies: {
                let c = IntCounter::new(ORPHAN_REPLIES, "Reply chunks with nobody waiting.")?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            edge_shed: {
                let c = IntCounter::new(EDGE_SHED, "Chat requests turned away at capacity.")?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            open_streams: gauge(OPEN_STREAMS, "Open SSE and WebSocket streams.", &["kind"])?,
            ws_closes: counter(
                WS_CLOSES,
                "WebSocket sessions closed, by reason.",
                &["reason"],
            )?,
            ws_resumes: counter(
                WS_RESUMES,
                "WebSocket streams resumed, by outcome.",
                &["outcome"],
            )?,
            webhook_attempts: counter(
                WEBHOOK_ATTEMPTS,
                "Webhook delivery attempts, by outcome.",
                &["outcome"],
            )?,
            tool_calls: counter(
                TOOL_CALLS,
                "Tool calls, by tool and outcome.",
                &["tool", "outcome"],
            )?,
            tool_retries: counter(
                TOOL_RETRIES,
                "Attempts at a tool call after its first, by tool.",
                &["tool"],
            )?,
            tool_breakers: gauge(
                TOOL_BREAKERS,
                "Circuit breakers (per tool and tenant) open or half-open, by tool and state.",
                &["tool", "state"],
            )?,
            tool_seconds: histogram(
                TOOL_SECONDS,
                "Seconds a tool call took, retries included, by tool.",
                &["tool"],
            )?,
            workflow_steps: counter(
                WORKFLOW_STEPS,
                "Workflow step transitions written, by workflow and kind.",
                &["workflow", "kind"],
            )?,
            workflow_step_seconds: histogram(
                WORKFLOW_STEP_SECONDS,
                "Seconds the workflow stage took to run one step, by workflow.",
                &["workflow"],
            )?,
            notifications: counter(
                NOTIFICATIONS,
                "Notifications put on the notifications topic, by type.",
                &["type"],
            )?,
            limit_refusals: counter(
                LIMIT_REFUSALS,
                "Chat requests refused for a limit, by kind.",
                &["kind"],
            )?,
            limit_store_calls: counter(
                LIMIT_STORE_CALLS,
                "Calls to the limits' counters, by purpose.",
                &["purpose"],
            )?,
            limit_store_errors: {
                let c = IntCounter::new(
                    LIMIT_STORE_ERRORS,
                    "Times the limits' counters could not be reached.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            auth_changes: {
                let c = IntCounter::new(
                    AUTH_CHANGES,
                    "Key, plan or subscription changes the edge was told of.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            registry,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Every metric name, for checks that dashboards and alerts use only real names.
pub const ALL: &[&str] = &[
    RECORDS_IN,
    RECORDS_OUT,
    DLQ_RECORDS,
    RETRIES,
    PROCESS_SECONDS,
    IN_FLIGHT,
    BATCH_RECORDS,
    LANE_FULL_WAITS,
    CONSUMER_PAUSES,
    CONSUMER_PAUSED,
    WATERMARK_MS,
    LATE_RECORDS,
    WINDOW_ROWS,
    WINDOW_HELD_ROWS,
    WINDOW_FAILURES,
    CONSUMER_LAG,
    REBALANCES,
    SINK_ROWS,
    SINK_DUPLICATES,
    SINK_BATCH_SECONDS,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    ORPHAN_REPLIES,
    EDGE_SHED,
    OPEN_STREAMS,
    WS_CLOSES,
    WS_RESUMES,
    LIMIT_REFUSALS,
    LIMIT_STORE_ERRORS,
    LIMIT_STORE_CALLS,
    AUTH_CHANGES,
    WEBHOOK_ATTEMPTS,
    NOTIFICATIONS,
    TOOL_CALLS,
    TOOL_RETRIES,
    TOOL_BREAKERS,
    TOOL_SECONDS,
    WORKFLOW_STEPS,
    WORKFLOW_STEP_SECONDS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboards_and_autoscalers_use_only_defined_names() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut checked = 0;
        let files = ["dashboards", "deploy/k8s"]
            .iter()
            .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
            .map(|entry| entry.unwrap().path());
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("sluice_") && !word.ends_with('_') {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| word.strip_suffix(suffix))
                        .unwrap_or(word);
                    assert!(
                        ALL.contains(&base),
                        "{word} in {path:?} is not a Sluice metric"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 0,
            "no metric names found in dashboards/ or deploy/k8s/"
        );
    }
}
