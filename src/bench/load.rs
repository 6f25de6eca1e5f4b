//! A closed-loop HTTP load generator: N clients, each sending its next request as soon as the
//! previous one's whole response has arrived, over kept-alive connections, for a fixed time
//! after a warm-up. Only loopback targets are used by the benchmarks that drive it.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use reqwest::StatusCode;
use sluice_pipelines::bench::hop::quantile;

/// What every request of a run sends.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub api_key: Option<String>,
    pub body: Bytes,
}

/// One concurrency level's outcome.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub clients: usize,
    /// Successful responses completed within the measured window.
    pub completed: u64,
    /// Requests turned away with 429 or 503 (shed under load).
    pub shed: u64,
    /// Other failures (errors, unexpected statuses).
    pub failed: u64,
    /// The first failure's description, for the report.
    pub first_failure: Option<String>,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

enum Outcome {
    Ok,
    Shed,
    Failed(String),
}

async fn send(client: &reqwest::Client, target: &Target) -> Outcome {
    let mut request = client
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(target.body.clone());
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let status = response.status();
    // The whole body counts: a streamed reply is done when its last event arrived.
    let body = response.bytes().await;
    match (status, body) {
        (StatusCode::OK, Ok(_)) => Outcome::Ok,
        (StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE, _) => Outcome::Shed,
        (status, Ok(body)) => Outcome::Failed(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )),
        (status, Err(e)) => Outcome::Failed(format!("{status}: body broke: {e}")),
    }
}

/// Runs `clients` concurrent clients against `target`: `warmup` unmeasured, then `measure`.
pub async fn run(
    client: &reqwest::Client,
    target: &Target,
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadReport {
    let mut reports = run_mixed(
        client,
        std::slice::from_ref(target),
        clients,
        warmup,
        measure,
    )
    .await;
    reports.pop().unwrap_or_default()
}

/// Runs `clients` concurrent clients, client i against `targets[i % targets.len()]`, all in
/// the same window: one report per target, each measured under the same load as the others.
pub async fn run_mixed(
    client: &reqwest::Client,
    targets: &[Target],
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> Vec<LoadReport> {
    let begin = Instant::now();
    let (window_start, window_end) = (begin + warmup, begin + warmup + measure);
    let mut tasks = tokio::task::JoinSet::new();
    let kinds = targets.len().max(1);
    for i in 0..clients.max(targets.len()) {
        let Some(target) = targets.get(i % kinds) else {
            break;
        };
        let (client, target) = (client.clone(), target.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let (mut shed, mut failed, mut first_failure) = (0u64, 0u64, None);
            loop {
                let started = Instant::now();
                if started >= window_end {
                    break;
                }
                let outcome = send(&client, &target).await;
                let finished = Instant::now();
                if started < window_start || finished > window_end {
                    continue;
                }
                match outcome {
                    Outcome::Ok => {
                        latencies.push((finished - started).as_secs_f64() * 1e3);
                    }
                    Outcome::Shed => shed += 1,
                    Outcome::Failed(why) => {
                        failed += 1;
                        first_failure.get_or_insert(why);
                        // A target that fails at once must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (i % kinds, latencies, shed, failed, first_failure)
        });
    }
    let mut reports: Vec<(LoadReport, Vec<f64>)> = targets
        .iter()
        .map(|_| (LoadReport::default(), Vec::new()))
        .collect();
    for (i, (report, _)) in reports.iter_mut().enumerate() {
        report.clients = clients
            .max(targets.len())
            .saturating_sub(i)
            .div_ceil(targets.len());
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((which, mine, shed, failed, first_failure)) => {
                let Some((report, latencies)) = reports.get_mut(which) else {
                    continue;
                };
                latencies.extend(mine);
                report.shed += shed;
                report.failed += failed;
                if report.first_failure.is_none() {
                    report.first_failure = first_failure;
                }
            }
            Err(e) => {
                if let Some((report, _)) = reports.first_mut() {
                    report.failed += 1;
                    report.first_failure.get_or_insert(e.to_string());
                }
            }
        }
    }
    reports
        .into_iter()
        .map(|(mut report, mut latencies)| {
            latencies.sort_by(f64::total_cmp);
            report.completed = latencies.len() as u64;
            report.rps = report.completed as f64 / measure.as_secs_f64();
            report.p50_ms = quantile(&latencies, 0.5);
            report.p99_ms = quantile(&latencies, 0.99);
            report
        })
        .collect()
}

/// An HTTP client for `clients` concurrent connections to one host.
pub fn client(clients: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(clients.max(1))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?)
}
