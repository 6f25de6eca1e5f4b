//! A tenant's analytics over a range, in buckets of a step: per model, requests, failed calls
//! and the error rate, tokens, cost (usage priced by the version in force when it happened, as
//! invoices price it), latency percentiles and each model's share of the requests (the routing
//! mix). Read from the facts (`usage_events`, billable calls) and `failed_calls` (calls that
//! failed before producing anything), both through `FINAL`.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate};
use serde::{Deserialize, Serialize};

use super::{usage::FAILED_TABLE, usage::TABLE, ClickHouse};
use crate::{
    billing::{money::Exact, prices::model_item, PriceBook},
    Error, Result,
};

/// Bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Minute,
    Hour,
    Day,
}

impl Step {
    /// `minute`, `hour` or `day`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "minute" => Ok(Self::Minute),
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            other => Err(Error::Invalid(format!(
                "step {other:?} is not minute, hour or day"
            ))),
        }
    }

    pub fn ms(self) -> i64 {
        match self {
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }
}

/// Buckets one query may answer at most.
pub const MAX_BUCKETS: i64 = 1_500;

/// A range's bounds from `start` and `end` (each `YYYY-MM-DD` or RFC 3339; default: the last
/// day), aligned down and up to `step`, and checked for size.
pub fn range(
    start: Option<&str>,
    end: Option<&str>,
    step: Step,
    now_ms: i64,
) -> Result<(i64, i64)> {
    let moment = |text: &str| -> Result<i64> {
        let text = text.trim();
        if let Ok(t) = DateTime::parse_from_rfc3339(text) {
            return Ok(t.timestamp_millis());
        }
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{text:?} is neither a day (YYYY-MM-DD) nor an RFC 3339 time"
                ))
            })
    };
    let end = match end {
        Some(text) => moment(text)?,
        None => now_ms,
    };
    let start = match start {
        Some(text) => moment(text)?,
        None => end - 86_400_000,
    };
    let width = step.ms();
    let (start, end) = (
        start.div_euclid(width) * width,
        end.div_euclid(width) * width + if end.rem_euclid(width) == 0 { 0 } else { width },
    );
    if start >= end {
        return Err(Error::Invalid("start must come before end".into()));
    }
    if (end - start) / width > MAX_BUCKETS {
        return Err(Error::Invalid(format!(
            "at most {MAX_BUCKETS} buckets: widen the step or shorten the range"
        )));
    }
    Ok((start, end))
}

/// Usage of one model in one bucket and price segment (see [`query`]).
#[derive(Debug, Clone, ::clickhouse::Row, Deserialize)]
struct UsageBucket {
    bucket: i64,
    model: String,
    segment: u32,
    requests: u64,
    broken: u64,
    input_tokens: u64,
    output_tokens: u64,
    cached_input_tokens: u64,
}

/// Failed calls and latency percentiles of one model in one bucket.
#[derive(Debug, Clone, ::clickhouse::Row, Deserialize)]
struct CallBucket {
    bucket: i64,
    model: String,
    failed: u64,
    measured: u64,
    latency: Vec<f64>,
}

/// Latency percentiles, milliseconds (of the calls that were measured).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// One model's figures (in a bucket, or over the range).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModelFigures {
    pub model: String,
    /// Calls: billable ones and those that failed before producing anything.
    pub requests: u64,
    /// Calls that failed: before producing anything, or part-way (billed for what they made).
    pub errors: u64,
    pub error_rate: f64,
    /// This model's share of the bucket's calls.
    pub share: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// Exact cost, a decimal string in the report's currency.
    pub cost: String,
    pub latency_ms: Latency,
    #[serde(skip)]
    exact: Exact,
}

/// One bucket.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Bucket {
    /// Start, Unix milliseconds.
    pub start_ms: i64,
    /// Start, RFC 3339 (UTC).
    pub start: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cost: String,
    pub models: Vec<ModelFigures>,
}

/// A tenant's analytics over a range.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Report {
    pub tenant_id: String,
    pub currency: String,
    pub step: Step,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Buckets with any calls, oldest first.
    pub buckets: Vec<Bucket>,
    /// Each model over the whole range (latency percentiles are the buckets' calls' merged:
    /// `null` here, read them per bucket).
    pub models: Vec<ModelFigures>,
}

/// `tenant`'s analytics over `[start_ms, end_ms)` in buckets of `step`, priced by `book`.
pub async fn report(
    clickhouse: &ClickHouse,
    book: &PriceBook,
    tenant: &str,
    (start_ms, end_ms): (i64, i64),
    step: Step,
) -> Result<Report> {
    let changes = book.changes_between(start_ms, end_ms);
    let segment = if changes.is_empty() {
        "toUInt32(0)"
    } else {
        "toUInt32(arrayCount(b -> b <= occurred_at_ms, ?))"
    };
    let width = step.ms();
    // `occurred_at` bounds pick the monthly partitions; `occurred_at_ms` the exact range.
    let usage_sql = format!(
        "SELECT intDiv(occurred_at_ms, {width}) * {width} AS bucket, model, {segment} AS segment, \
                count() AS requests, countIf(outcome != '') AS broken, \
                sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
                sum(cached_input_tokens) AS cached_input_tokens \
           FROM {TABLE} FINAL \
          WHERE tenant_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
            AND occurred_at_ms >= ? AND occurred_at_ms < ? \
          GROUP BY bucket, model, segment"
    );
    let from_s = u32::try_from(start_ms.div_euclid(1000)).unwrap_or(0);
    let to_s = u32::try_from(end_ms.div_euclid(1000) + 1).unwrap_or(u32::MAX);
    let mut usage = clickhouse.client().query(&usage_sql);
    if !changes.is_empty() {
        usage = usage.bind(&changes);
    }
    let usage: Vec<UsageBucket> = usage
        .bind(tenant)
        .bind(from_s)
        .bind(to_s)
        .bind(start_ms)
        .bind(end_ms)
        .fetch_all()
        .await?;
    let calls_sql = format!(
        "SELECT intDiv(occurred_at_ms, {width}) * {width} AS bucket, model, \
                sum(failed) AS failed, countIf(latency_ms >= 0) AS measured, \
                quantilesIf(0.5, 0.95, 0.99)(toFloat64(latency_ms), latency_ms >= 0) AS latency \
           FROM ( \
             SELECT occurred_at_ms, model, latency_ms, 0 AS failed FROM {TABLE} FINAL \
              WHERE tenant_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
                AND occurred_at_ms >= ? AND occurred_at_ms < ? \
             UNION ALL \
             SELECT occurred_at_ms, model, latency_ms, 1 AS failed FROM {FAILED_TABLE} FINAL \
              WHERE tenant_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
                AND occurred_at_ms >= ? AND occurred_at_ms < ? \
           ) GROUP BY bucket, model"
    );
    let mut calls = clickhouse.client().query(&calls_sql);
    for _ in 0..2 {
        calls = calls
            .bind(tenant)
            .bind(from_s)
            .bind(to_s)
            .bind(start_ms)
            .bind(end_ms);
    }
    let calls: Vec<CallBucket> = calls.fetch_all().await?;
    Ok(assemble(
        book,
        tenant,
        (start_ms, end_ms),
        step,
        &changes,
        &usage,
        &calls,
    ))
}

/// The report from the queries' rows. Pure.
fn assemble(
    book: &PriceBook,
    tenant: &str,
    (start_ms, end_ms): (i64, i64),
    step: Step,
    changes: &[i64],
    usage: &[UsageBucket],
    calls: &[CallBucket],
) -> Report {
    let mut buckets: BTreeMap<i64, BTreeMap<String, ModelFigures>> = BTreeMap::new();
    let figures =
        |buckets: &mut BTreeMap<i64, BTreeMap<String, ModelFigures>>, bucket: i64, model: &str| {
            buckets
                .entry(bucket)
                .or_default()
                .entry(model.to_owned())
                .or_insert_with(|| ModelFigures {
                    model: model.to_owned(),
                    ..ModelFigures::default()
                })
                .clone()
        };
    for row in usage {
        let mut f = figures(&mut buckets, row.bucket, &row.model);
        // The slice's first moment: the bucket's start, or the price change it follows.
        let after_change = match usize::try_from(row.segment).unwrap_or(0) {
            0 => i64::MIN,
            k => changes.get(k - 1).copied().unwrap_or(i64::MIN),
        };
        let at = row.bucket.max(after_change);
        if let Some(price) = book.in_force(&model_item(&row.model), at) {
            f.exact = f.exact
                + price.usage_cost(
                    row.requests,
                    row.input_tokens,
                    row.output_tokens,
                    row.cached_input_tokens,
                );
        }
        f.requests += row.requests;
        f.errors += row.broken;
        f.input_tokens += row.input_tokens;
        f.output_tokens += row.output_tokens;
        f.cached_input_tokens += row.cached_input_tokens;
        buckets
            .entry(row.bucket)
            .or_default()
            .insert(row.model.clone(), f);
    }
    for row in calls {
        let mut f = figures(&mut buckets, row.bucket, &row.model);
        f.requests += row.failed;
        f.errors += row.failed;
        if row.measured > 0 {
            let at = |i: usize| row.latency.get(i).copied().filter(|v| v.is_finite());
            f.latency_ms = Latency {
                p50: at(0),
                p95: at(1),
                p99: at(2),
            };
        }
        buckets
            .entry(row.bucket)
            .or_default()
            .insert(row.model.clone(), f);
    }
    let rate = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    };
    let mut totals: BTreeMap<String, ModelFigures> = BTreeMap::new();
    let buckets = buckets
        .into_iter()
        .map(|(start, models)| {
            let requests: u64 = models.values().map(|m| m.requests).sum();
            let errors: u64 = models.values().map(|m| m.errors).sum();
            let exact: Exact = models.values().map(|m| m.exact).sum();
            let models: Vec<ModelFigures> = models
                .into_values()
                .map(|mut m| {
                    m.error_rate = rate(m.errors, m.requests);
                    m.share = rate(m.requests, requests);
                    m.cost = money(m.exact);
                    let t = totals
                        .entry(m.model.clone())
                        .or_insert_with(|| ModelFigures {
                            model: m.model.clone(),
                            ..ModelFigures::default()
                        });
                    t.requests += m.requests;
                    t.errors += m.errors;
                    t.input_tokens += m.input_tokens;
                    t.output_tokens += m.output_tokens;
                    t.cached_input_tokens += m.cached_input_tokens;
                    t.exact = t.exact + m.exact;
                    m
                })
                .collect();
            Bucket {
                start_ms: start,
                start: DateTime::from_timestamp_millis(start)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default(),
                requests,
                errors,
                error_rate: rate(errors, requests),
                input_tokens: models.iter().map(|m| m.input_tokens).sum(),
                output_tokens: models.iter().map(|m| m.output_tokens).sum(),
                cached_input_tokens: models.iter().map(|m| m.cached_input_tokens).sum(),
                cost: money(exact),
                models,
            }
        })
        .collect();
    let all: u64 = totals.values().map(|m| m.requests).sum();
    let models = totals
        .into_values()
        .map(|mut m| {
            m.error_rate = rate(m.errors, m.requests);
            m.share = rate(m.requests, all);
            m.cost = money(m.exact);
            m
        })
        .collect();
    Report {
        tenant_id: tenant.to_owned(),
        currency: book.currency.code().to_owned(),
        step,
        start_ms,
        end_ms,
        buckets,
        models,
    }
}

/// An exact amount as a decimal string: every digit that is not a trailing zero, at least two
/// places (`0.00`, `1.50`, `0.0000123`).
fn money(exact: Exact) -> String {
    let full = exact.decimal();
    let (whole, fraction) = full.split_once('.').unwrap_or((&full, ""));
    let fraction = fraction.trim_end_matches('0');
    format!("{whole}.{fraction:0<2}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{Currency, PriceVersion};

    fn book() -> PriceBook {
        let version = |id, input, output, from| PriceVersion {
            id,
            item: "model:m".into(),
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: 0,
            per_unit: 0,
            included: 0,
            valid_from_ms: from,
            created_at_ms: 0,
        };
        PriceBook::new(
            Currency::new("USD").unwrap(),
            vec![
                version(1, 1_000_000, 2_000_000, 0),
                version(2, 3_000_000, 6_000_000, 90_000),
            ],
        )
    }

    #[test]
    fn ranges_align_to_the_step_and_refuse_too_many_buckets() {
        let (start, end) = range(
            Some("2026-12-07T03:20:00Z"),
            Some("2026-12-07T05:10:00Z"),
            Step::Hour,
            0,
        )
        .unwrap();
        assert_eq!(end - start, 3 * 3_600_000, "03:00 to 06:00");
        assert!(range(Some("2026-01-01"), Some("2026-12-01"), Step::Minute, 0).is_err());
        assert!(range(Some("2026-12-02"), Some("2026-12-01"), Step::Day, 0).is_err());
        assert!(range(Some("yesterday"), None, Step::Day, 0).is_err());
        assert!(Step::parse("week").is_err());
    }

    #[test]
    fn buckets_price_each_slice_at_its_version_and_count_errors_and_shares() {
        let usage = [
            // Bucket 0 (one minute), before the change at 90 s: $1/$2 per million.
            UsageBucket {
                bucket: 0,
                model: "m".into(),
                segment: 0,
                requests: 3,
                broken: 1,
                input_tokens: 1_000,
                output_tokens: 500,
                cached_input_tokens: 0,
            },
            // Bucket 60 s: part before, part after the change.
            UsageBucket {
                bucket: 60_000,
                model: "m".into(),
                segment: 0,
                requests: 1,
                broken: 0,
                input_tokens: 1_000,
                output_tokens: 0,
                cached_input_tokens: 0,
            },
            UsageBucket {
                bucket: 60_000,
                model: "m".into(),
                segment: 1,
                requests: 1,
                broken: 0,
                input_tokens: 1_000,
                output_tokens: 0,
                cached_input_tokens: 0,
            },
        ];
        let calls = [
            CallBucket {
                bucket: 0,
                model: "m".into(),
                failed: 1,
                measured: 4,
                latency: vec![10.0, 40.0, 50.0],
            },
            CallBucket {
                bucket: 0,
                model: "other".into(),
                failed: 4,
                measured: 0,
                latency: vec![f64::NAN, f64::NAN, f64::NAN],
            },
        ];
        let report = assemble(
            &book(),
            "t",
            (0, 120_000),
            Step::Minute,
            &[90_000],
            &usage,
            &calls,
        );
        let first = &report.buckets[0];
        assert_eq!((first.requests, first.errors), (8, 6));
        let m = &first.models[0];
        assert_eq!((m.model.as_str(), m.requests, m.errors), ("m", 4, 2));
        assert_eq!(m.error_rate, 0.5);
        assert_eq!(m.share, 0.5, "4 of the bucket's 8 calls");
        assert_eq!(m.cost, "0.002", "1,000 × $1/M + 500 × $2/M");
        assert_eq!(m.latency_ms.p95, Some(40.0));
        assert_eq!(
            first.models[1].latency_ms,
            Latency::default(),
            "none measured"
        );
        assert_eq!(
            report.buckets[1].cost, "0.004",
            "$0.001 before the change, $0.003 after"
        );
        assert_eq!(report.models[0].cost, "0.006");
        assert_eq!(report.models[0].requests, 6);
        assert_eq!(report.currency, "USD");
    }
}
