//! The pipelines Sluice runs unless configured otherwise: per-tenant per-minute request, token
//! and cost rates (for quotas and the live dashboards) and per-model latency percentiles per
//! minute. Their ClickHouse tables are created by `sluice setup`.

use crate::{OutputConfig, PipelineConfig};

/// Per tenant and minute: requests, tokens and cost (micro-dollars, at catalogue prices) of
/// the billable calls.
pub const TENANT_USAGE_SQL: &str = "\
SELECT window_start, window_end, u.tenant_id AS tenant_id,
       count(*) AS records,
       count(DISTINCT u.request_id) AS requests,
       sum(u.input_tokens) AS input_tokens,
       sum(u.output_tokens) AS output_tokens,
       sum(u.input_tokens * coalesce(m.input_price_micros, 0)
         + u.output_tokens * coalesce(m.output_price_micros, 0)) / 1000000.0 AS cost_micros
FROM usage u LEFT JOIN models m ON u.model = m.name
WHERE u.billable
GROUP BY tumble(interval '1 minute'), u.tenant_id";

/// Per model and minute: latency percentiles of the model calls, failed ones included.
pub const MODEL_LATENCY_SQL: &str = "\
SELECT window_start, window_end, model,
       count(*) AS records,
       approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
       approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms,
       approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_ms,
       max(latency_ms) AS max_ms
FROM usage
WHERE latency_ms IS NOT NULL
GROUP BY tumble(interval '1 minute'), model";

/// The built-in pipelines.
pub fn pipelines() -> Vec<PipelineConfig> {
    vec![
        PipelineConfig {
            name: "tenant_usage_1m".into(),
            source: "usage".into(),
            sql: TENANT_USAGE_SQL.into(),
            event_time: "occurred_at_ms".into(),
            max_out_of_orderness: crate::pipeline::default_out_of_orderness(),
            allowed_lateness: crate::pipeline::default_lateness(),
            idle_after: crate::pipeline::default_idle_after(),
            output: OutputConfig::Clickhouse("tenant_usage_1m".into()),
        },
        PipelineConfig {
            name: "model_latency_1m".into(),
            source: "usage".into(),
            sql: MODEL_LATENCY_SQL.into(),
            event_time: "occurred_at_ms".into(),
            max_out_of_orderness: crate::pipeline::default_out_of_orderness(),
            allowed_lateness: crate::pipeline::default_lateness(),
            idle_after: crate::pipeline::default_idle_after(),
            output: OutputConfig::Clickhouse("model_latency_1m".into()),
        },
    ]
}
