//! What stands between a workflow and a tool that fails: every call runs behind a bulkhead
//! (bounded concurrency per tool and tenant), a circuit breaker per tool and tenant (closed, open,
//! half-open), a timeout per attempt, and retries with exponential backoff and full jitter for
//! retriable failures only. The caller's idempotency key stays the same across attempts, so a
//! write the tool honours the key for happens once however often it is retried.
//!
//! One [`Resilience`] per process holds the breakers and bulkheads; tools are told apart by
//! name, tenants by id, so one tenant's failing endpoint does not open another's breaker.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sluice_pipelines::metrics::Metrics;
use tokio::sync::Semaphore;

/// How tool calls are guarded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Milliseconds one attempt may take.
    pub timeout_ms: u64,
    /// Attempts in all, the first included (1: no retries).
    pub max_attempts: u32,
    /// Backoff before the second attempt, in milliseconds; it doubles with each attempt after.
    pub backoff_base_ms: u64,
    /// Longest backoff, in milliseconds.
    pub backoff_max_ms: u64,
    /// Retriable failures in a row that open a tool's breaker for a tenant.
    pub breaker_failures: u32,
    /// Milliseconds an open breaker turns calls away before letting one probe through.
    pub breaker_open_ms: u64,
    /// Calls of one tool for one tenant in flight at once; more are turned away (so a tenant
    /// whose endpoint hangs holds its own places, not other tenants').
    pub bulkhead: usize,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
            bulkhead: 32,
        }
    }
}

impl ResilienceConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!("orchestrator.tools.resilience.{what}"));
            }
        };
        need(self.timeout_ms > 0, "timeout_ms must be at least 1");
        need(self.max_attempts > 0, "max_attempts must be at least 1");
        need(
            self.backoff_base_ms <= self.backoff_max_ms,
            "backoff_base_ms must not exceed backoff_max_ms",
        );
        need(
            self.breaker_failures > 0,
            "breaker_failures must be at least 1",
        );
        need(self.bulkhead > 0, "bulkhead must be at least 1");
        problems
    }

    /// The longest wait before attempt `attempt` (2, 3, ...): the base doubled for each attempt
    /// after the second, at most the maximum. The wait itself is drawn uniformly below it
    /// ("full jitter"), so callers that failed together do not retry together.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(32);
        let ceiling = self
            .backoff_base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms);
        Duration::from_millis(ceiling)
    }
}

/// How one attempt at a tool failed, as the tool's adapter judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying again: the tool was unreachable, overloaded or failing on its side.
    Retriable(String),
    /// Trying again cannot help: the tool refused the call as made.
    Permanent(String),
}

/// Why a guarded call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The tool's breaker for this tenant is open: the call was not made.
    #[error("the tool is failing and its circuit breaker is open; try again later")]
    BreakerOpen,
    /// As many calls of the tool as its bulkhead allows are in flight: the call was not made.
    #[error("the tool is as busy as it may be; try again shortly")]
    BulkheadFull,
    /// The tool refused the call (not retried).
    #[error("the tool refused the call: {message}")]
    Refused { message: String, attempts: u32 },
    /// Every attempt failed with a retriable failure (or a timeout), or the breaker opened.
    #[error("the tool failed {attempts} time(s): {message}")]
    Exhausted { message: String, attempts: u32 },
}

impl ToolError {
    /// The outcome label of the call in the metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ToolError::BreakerOpen => "breaker_open",
            ToolError::BulkheadFull => "bulkhead_full",
            ToolError::Refused { .. } => "failed",
            ToolError::Exhausted { .. } => "exhausted",
        }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` retriable failures in a row so far.
    Closed { failures: u32 },
    /// Calls are turned away until `until`.
    Open { until: Instant },
    /// One probe is through; others are turned away until it ends.
    HalfOpen,
}

impl BreakerState {
    fn label(&self) -> Option<&'static str> {
        match self {
            BreakerState::Closed { .. } => None,
            BreakerState::Open { .. } => Some("open"),
            BreakerState::HalfOpen => Some("half_open"),
        }
    }
}

/// A half-open breaker's probe while it runs: if the call is dropped before the probe's
/// attempt ends (its caller went away), the breaker goes back to open with its time up, so the
/// next call probes instead of every call being turned away for good.
struct Probe<'a> {
    armed: Option<(&'a Resilience, &'a str, &'a str)>,
}

impl Probe<'_> {
    /// The attempt ended: its outcome decides the breaker.
    fn disarm(mut self) {
        self.armed = None;
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some((resilience, tool, tenant)) = self.armed.take() {
            resilience.update(tool, tenant, |state| match state {
                BreakerState::HalfOpen => (
                    BreakerState::Open {
                        until: Instant::now(),
                    },
                    (),
                ),
                other => (other, ()),
            });
        }
    }
}

/// The breakers and bulkheads of a process's tool calls.
pub struct Resilience {
    config: ResilienceConfig,
    breakers: Mutex<HashMap<(String, String), BreakerState>>,
    bulkheads: Mutex<HashMap<(String, String), Arc<Semaphore>>>,
    metrics: Arc<Metrics>,
}

impl Resilience {
    /// Guards calls with `config`, counting them in `metrics`.
    pub fn new(config: ResilienceConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            breakers: Mutex::new(HashMap::new()),
            bulkheads: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The state of `tool`'s breaker for `tenant`.
    pub fn breaker(&self, tool: &str, tenant: &str) -> BreakerState {
        self.breakers
            .lock()
            .ok()
            .and_then(|b| b.get(&(tool.to_owned(), tenant.to_owned())).copied())
            .unwrap_or(BreakerState::Closed { failures: 0 })
    }

    /// Calls `tool` for `tenant`: `attempt(n)` makes attempt `n` (1, 2, ...). Returns its
    /// value, or why there is none.
    pub async fn call<T, F, Fut>(
        &self,
        tool: &str,
        tenant: &str,
        attempt: F,
    ) -> Result<T, ToolError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let result = self.guarded(tool, tenant, attempt).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .tool_calls
            .with_label_values(&[tool, outcome])
            .inc();
        self.metrics
            .tool_seconds
            .with_label_values(&[tool])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn guarded<T, F, Fut>(
        &self,
        tool: &str,
        tenant: &str,
        mut attempt: F,
    ) -> Result<T, ToolError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let bulkhead = self.bulkhead(tool, tenant);
        let Ok(_place) = bulkhead.try_acquire_owned() else {
            return Err(ToolError::BulkheadFull);
        };
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut last = String::new();
        for n in 1..=self.config.max_attempts {
            let Some(probe) = self.admit(tool, tenant) else {
                // Opened by this call's own failures: say what they were.
                return Err(if n == 1 {
                    ToolError::BreakerOpen
                } else {
                    ToolError::Exhausted {
                        message: format!("{last} (the circuit breaker opened)"),
                        attempts: n - 1,
                    }
                });
            };
            if n > 1 {
                self.metrics.tool_retries.with_label_values(&[tool]).inc();
            }
            let answer = tokio::time::timeout(timeout, attempt(n)).await;
            probe.disarm();
            let failure = match answer {
                Ok(Ok(value)) => {
                    self.record(tool, tenant, true);
                    return Ok(value);
                }
                Ok(Err(Failure::Permanent(message))) => {
                    // The caller's mistake, not the tool's health: the breaker does not count it
                    // either way, except that a half-open probe the tool answered closes it.
                    self.record_refusal(tool, tenant);
                    return Err(ToolError::Refused {
                        message,
                        attempts: n,
                    });
                }
                Ok(Err(Failure::Retriable(message))) => message,
                Err(_) => format!("no answer within {} ms", self.config.timeout_ms),
            };
            self.record(tool, tenant, false);
            last = failure;
            if n < self.config.max_attempts {
                let ceiling = self.config.backoff_ceiling(n + 1);
                let wait = rand::rng().random_range(Duration::ZERO..=ceiling);
                tokio::time::sleep(wait).await;
            }
        }
        Err(ToolError::Exhausted {
            message: last,
            attempts: self.config.max_attempts,
        })
    }

    fn bulkhead(&self, tool: &str, tenant: &str) -> Arc<Semaphore> {
        let mut bulkheads = match self.bulkheads.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        bulkheads
            .entry((tool.to_owned(), tenant.to_owned()))
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.bulkhead)))
            .clone()
    }

    /// Whether the breaker lets an attempt through now (an open breaker whose time is up lets
    /// this one through as the probe): `None` if not.
    fn admit<'a>(&'a self, tool: &'a str, tenant: &'a str) -> Option<Probe<'a>> {
        let probing = self.update(tool, tenant, |state| match state {
            BreakerState::Closed { .. } => (state, Some(false)),
            BreakerState::Open { until } if Instant::now() >= until => {
                (BreakerState::HalfOpen, Some(true))
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => (state, None),
        })?;
        Some(Probe {
            armed: probing.then_some((self, tool, tenant)),
        })
    }

    /// Notes how an attempt that reached the tool went.
    fn record(&self, tool: &str, tenant: &str, healthy: bool) {
        let open_for = Duration::from_millis(self.config.breaker_open_ms);
        let threshold = self.config.breaker_failures;
        self.update(tool, tenant, |state| {
            let next = match (state, healthy) {
                (_, true) => BreakerState::Closed { failures: 0 },
                (BreakerState::Closed { failures }, false) if failures + 1 < threshold => {
                    BreakerState::Closed {
                        failures: failures + 1,
                    }
                }
                // The threshold reached, or a probe failed: open (again).
                (_, false) => BreakerState::Open {
                    until: Instant::now() + open_for,
                },
            };
            (next, ())
        })
    }

    /// Notes that the tool answered an attempt with a refusal: it is up, so a probe closes the
    /// breaker; otherwise the breaker stays as it is (failures in a row still count).
    fn record_refusal(&self, tool: &str, tenant: &str) {
        self.update(tool, tenant, |state| match state {
            BreakerState::HalfOpen => (BreakerState::Closed { failures: 0 }, ()),
            other => (other, ()),
        })
    }

    /// Changes the breaker of `tool` for `tenant` with `change`, keeping the gauges in step.
    fn update<R>(
        &self,
        tool: &str,
        tenant: &str,
        change: impl FnOnce(BreakerState) -> (BreakerState, R),
    ) -> R {
        let mut breakers = match self.breakers.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (tool.to_owned(), tenant.to_owned());
        let before = breakers
            .get(&key)
            .copied()
            .unwrap_or(BreakerState::Closed { failures: 0 });
        let (after, result) = change(before);
        if before.label() != after.label() {
            if let Some(label) = before.label() {
                self.metrics
                    .tool_breakers
                    .with_label_values(&[tool, label])
                    .dec();
            }
            if let Some(label) = after.label() {
                self.metrics
                    .tool_breakers
                    .with_label_values(&[tool, label])
                    .inc();
            }
            tracing::info!(tool, tenant, from = ?before, to = ?after, "tool circuit breaker changed");
        }
        match after {
            BreakerState::Closed { failures: 0 } => breakers.remove(&key),
            other => breakers.insert(key, other),
        };
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let config = ResilienceConfig {
            backoff_base_ms: 100,
            backoff_max_ms: 700,
            ..Default::default()
        };
        let ceilings: Vec<u64> = (2..=6)
            .map(|n| config.backoff_ceiling(n).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 700, 700]);
        assert_eq!(config.backoff_ceiling(u32::MAX).as_millis(), 700);
        assert!(ResilienceConfig::default().validate().is_empty());
        let bad = ResilienceConfig {
            max_attempts: 0,
            backoff_base_ms: 10,
            backoff_max_ms: 1,
            ..Default::default()
        };
        assert_eq!(bad.validate().len(), 2);
    }
}
