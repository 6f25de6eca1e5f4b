//! `sluice bench gateway`: chat completions through the whole Sluice dataflow against the same
//! upstream called directly, in one run on one machine.
//!
//! 1. A local OpenAI-compatible upstream starts ([`upstream`](super::upstream)).
//! 2. One broker hop, produce → consume, is timed with the interactive path's clients: the
//!    dataflow's three hops (requests → routed → replies) cannot beat three of these.
//! 3. A full `sluice up` starts as its own process on fresh topics (`bench-<id>.*`, deleted at
//!    the end), with a tenant and a catalogue model pointing at the upstream: edge → requests →
//!    router → routed → orchestrator → replies → edge, with metering and the SQL pipelines on.
//! 4. Its CPU with no traffic is measured (and the broker's, when it runs on this machine).
//! 5. At each concurrency level, the upstream direct and then Sluice get the same closed-loop
//!    load: requests/s, p50/p99, and Sluice's added latency (tax) at each percentile.
//!
//! The last line is `max_rps=<Sluice's best requests/s> p99_tax_ms_c10=<p99 tax at 10 clients>`.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_pipelines::{bench::hop, kafka, now_ms};
use sluice_stores::{
    postgres::{
        self, models,
        plans::{self, Limits},
        tenants,
    },
    ModelSpec, ProviderKind,
};

use super::{
    load::{self, LoadReport, Target},
    under_test::SluiceUnderTest,
    upstream::Upstream,
};
use crate::config::Config;

/// Price per million tokens of the benchmark's model (a trillion dollars).
const BENCH_PRICE_MICROS: i64 = 1_000_000_000_000_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Concurrency levels, in order.
    pub clients: Vec<usize>,
    /// Measured seconds per level and path.
    pub seconds: u64,
    /// Unmeasured seconds before each measurement.
    pub warmup_seconds: u64,
    /// Whether clients ask for streamed (SSE) replies.
    pub stream: bool,
    /// Samples of the one-hop latency.
    pub hop_samples: usize,
    /// Seconds of idle CPU measured before the load.
    pub idle_seconds: u64,
    /// Name of the broker's process on this machine, for its CPU (skipped if none runs).
    pub broker_process: String,
    /// Whether the tenant is on a plan whose limits it never reaches (every request goes
    /// through the limits' counters).
    pub limits: bool,
    /// Whether each level is also measured for a second tenant on such a plan, alternately
    /// with the first (which then has none).
    pub compare_limits: bool,
}

/// What the limits cost, from clients with and without them measured together.
struct LimitsComparison {
    /// The limited clients' rate ÷ the unlimited clients' rate, at the busiest level.
    rate_ratio: f64,
    /// The limited clients' p99 − the unlimited clients', at the level nearest ten clients.
    p99_added_ms: f64,
    /// Sluice's CPU per request at the busiest level (see [`Level::cpu_us_per_request`]).
    cpu_us_per_request: Option<(f64, f64)>,
}

fn limits_comparison(levels: &[Level]) -> Option<LimitsComparison> {
    let pairs: Vec<(&LoadReport, &LoadReport)> = levels
        .iter()
        .map(|l| l.mixed.as_ref().map(|(off, on)| (off, on)))
        .collect::<Option<_>>()?;
    // The rate where it matters most: the level carrying the most requests.
    let total = |pair: &(&LoadReport, &LoadReport)| pair.0.rps + pair.1.rps;
    let (busiest, (off_busiest, on_busiest)) = levels
        .iter()
        .zip(&pairs)
        .max_by(|a, b| total(a.1).total_cmp(&total(b.1)))?;
    let at_ten = levels
        .iter()
        .zip(&pairs)
        .min_by_key(|(l, _)| l.sluice.clients.abs_diff(10))
        .map(|(_, pair)| pair)?;
    Some(LimitsComparison {
        rate_ratio: if off_busiest.rps > 0.0 {
            on_busiest.rps / off_busiest.rps
        } else {
            f64::NAN
        },
        p99_added_ms: at_ten.1.p99_ms - at_ten.0.p99_ms,
        cpu_us_per_request: busiest.cpu_us_per_request(),
    })
}

/// Calls the edge at `edge_url` has made to the limits' counters so far, from its `/metrics`.
async fn limiter_calls(http: &reqwest::Client, edge_url: &str) -> Option<f64> {
    let page = http
        .get(format!("{edge_url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let series = format!("{}{{", sluice_pipelines::metrics::LIMIT_STORE_CALLS);
    Some(
        page.lines()
            .filter(|l| l.starts_with(&series))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum(),
    )
}

/// Limits a benchmark never reaches, each of them counted.
fn unreachable_limits() -> Limits {
    Limits {
        requests_per_minute: Some(2_000_000_000),
        tokens_per_minute: Some(2_000_000_000),
        monthly_tokens: Some(1_000_000_000_000_000),
        max_concurrent: Some(1_000_000),
        allowed_models: None,
    }
}

/// CPU time of a process so far, seconds (Linux: `/proc/<pid>/stat`, in USER_HZ = 100 ticks).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The pid of the first process named `name` (its `comm`), if one runs.
fn find_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == name).then_some(pid)
        })
}

/// Percent of one core that `pid` used between two readings `seconds` apart.
struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
    at: Instant,
}

impl CpuMeter {
    fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            start: pid.and_then(cpu_seconds),
            at: Instant::now(),
        }
    }

    /// Percent of a core since the start, if the process could be read.
    fn percent(&self) -> Option<f64> {
        let now = cpu_seconds(self.pid?)?;
        Some((now - self.start?) / self.at.elapsed().as_secs_f64() * 100.0)
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |p| format!("{p:.0}%"))
}

fn chat_body(model: &str, stream: bool) -> axum::body::Bytes {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say something about streams."}],
        "max_tokens": 16,
        "stream": stream,
    });
    axum::body::Bytes::from(body.to_string())
}

/// One concurrency level: the upstream direct, and Sluice with its and the broker's CPU; when
/// comparing limits, also the same number of clients split between a tenant without limits
/// and one with, in one window.
struct Level {
    direct: LoadReport,
    sluice: LoadReport,
    sluice_cpu: Option<f64>,
    broker_cpu: Option<f64>,
    /// (without limits, with limits), measured together.
    mixed: Option<(LoadReport, LoadReport)>,
    /// Sluice's and the broker's CPU while the mixed clients ran.
    mixed_cpu: (Option<f64>, Option<f64>),
    /// Calls the edge made to the limits' counters (Redis) during the mixed run, warm-up
    /// included, read from its `/metrics`.
    mixed_limiter_calls: Option<f64>,
}

impl Level {
    /// Sluice's CPU time per completed request, microseconds: with every client unlimited,
    /// and with half of them limited.
    fn cpu_us_per_request(&self) -> Option<(f64, f64)> {
        let (off, on) = self.mixed.as_ref()?;
        let per = |cpu: Option<f64>, rps: f64| cpu.map(|c| c / 100.0 * 1e6 / rps.max(1.0));
        Some((
            per(self.sluice_cpu, self.sluice.rps)?,
            per(self.mixed_cpu.0, off.rps + on.rps)?,
        ))
    }
}

fn print_row(
    clients: usize,
    d: &LoadReport,
    s: &LoadReport,
    cpu: (Option<f64>, Option<f64>),
    label: &str,
) {
    println!(
        "{:>7} | {:>8.0} {:>7.2} {:>7.2} | {:>8.0} {:>7.2} {:>7.2} | {:>7.2} {:>7.2} | {:>6} {:>6} | {:>6} {:>6}{label}",
        clients,
        d.rps,
        d.p50_ms,
        d.p99_ms,
        s.rps,
        s.p50_ms,
        s.p99_ms,
        s.p50_ms - d.p50_ms,
        s.p99_ms - d.p99_ms,
        s.shed,
        s.failed,
        percent(cpu.0),
        percent(cpu.1),
    );
    for (path, report) in [("direct", d), ("sluice", s)] {
        if let Some(why) = &report.first_failure {
            println!("        {path}: {} failed, first: {why}", report.failed);
        }
    }
}

fn print_level(level: &Level) {
    let (d, s) = (&level.direct, &level.sluice);
    print_row(s.clients, d, s, (level.sluice_cpu, level.broker_cpu), "");
    if let Some((off, on)) = &level.mixed {
        print_row(
            s.clients,
            d,
            off,
            level.mixed_cpu,
            &format!("  ({} of them: no plan; CPU of both)", off.clients),
        );
        print_row(
            s.clients,
            d,
            on,
            (None, None),
            &format!(
                "  ({} of them: limits on; {} Redis calls)",
                on.clients,
                level
                    .mixed_limiter_calls
                    .map_or_else(|| "?".to_owned(), |c| format!("{c:.0}"))
            ),
        );
    }
}

/// Runs the benchmark and prints its report, the summary line last.
pub async fn run(config: &Config, options: &GatewayOptions) -> anyhow::Result<()> {
    let id = format!("bench-{}", now_ms());
    let upstream = Upstream::start()?;
    let mode = if options.stream {
        "streamed (SSE)"
    } else {
        "whole"
    };
    println!(
        "upstream: {} (a fixed reply, {mode}); {} s per level after {} s of warm-up",
        upstream.base_url, options.seconds, options.warmup_seconds
    );

    println!("topics: {id}.* (deleted when the run ends)");
    let hop_topic = format!("{id}.hop");
    // Whatever step fails, the topics made so far go.
    let outcome: anyhow::Result<()> = async {
        kafka::ensure_topics(&config.kafka, &[&hop_topic]).await?;
        let hop = hop::hop_latency(&config.kafka, &hop_topic, options.hop_samples).await?;
        let three_hops = 3.0 * hop.p50_ms;
        println!(
            "one broker hop, produce -> consume ({} samples): p50 {:.2} ms, p99 {:.2} ms; three hops {three_hops:.2} ms",
            hop.samples, hop.p50_ms, hop.p99_ms
        );

        let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
        let (tenant, api_key) = tenants::create_tenant(&admin, &id).await?;
        let model = ModelSpec {
            name: id.clone(),
            provider: ProviderKind::Openai,
            upstream_model: "bench-upstream".into(),
            base_url: Some(upstream.base_url.clone()),
            api_key_env: None,
            context_window: 8192,
            // The catalogue is shared with every tenant while the benchmark runs: priced above
            // anything real, `auto` never routes their requests to this upstream.
            input_price_micros: BENCH_PRICE_MICROS,
            output_price_micros: BENCH_PRICE_MICROS,
            created_at: 0,
        };
        models::upsert_model(&admin, &model).await?;
        let limited_name = format!("{id}-limited");
        let limited = if options.compare_limits {
            Some(tenants::create_tenant(&admin, &limited_name).await?)
        } else {
            None
        };
        let on_plan = match (&limited, options.limits) {
            (Some((limited, _)), _) => Some(limited.id),
            (None, true) => Some(tenant.id),
            (None, false) => None,
        };
        if let Some(on_plan) = on_plan {
            plans::create_plan(&mut *admin.acquire().await?, &id, &unreachable_limits()).await?;
            plans::subscribe(&admin, on_plan, &id).await?;
        }
        match (&limited, options.limits) {
            (Some(_), _) => println!("limits: compared (after each level, the same clients again, half of them for a tenant with no plan and half for one on plan {id}, with every limit set beyond reach and each request counted)"),
            (None, true) => println!("limits: on (plan {id}: every limit set beyond reach, each request counted)"),
            (None, false) => println!("limits: off (the tenant has no plan; run with --compare-limits to compare)"),
        }
        let limited_key = limited.as_ref().map(|(_, key)| key.as_str());
        let outcome = measure(
            config,
            options,
            &id,
            &upstream,
            (&api_key, limited_key),
            three_hops,
        )
        .await;
        models::disable_model(&admin, &id).await?;
        if let Some(on_plan) = on_plan {
            plans::unsubscribe(&admin, on_plan).await?;
            plans::delete_plan(&mut *admin.acquire().await?, &id).await?;
        }
        tracing::debug!(tenant = %tenant.id, "benchmark tenant left in place");
        outcome
    }
    .await;
    super::remove_topics(config, &id, &[&hop_topic]).await;
    outcome
}

async fn measure(
    config: &Config,
    options: &GatewayOptions,
    id: &str,
    upstream: &Upstream,
    (api_key, limited_key): (&str, Option<&str>),
    three_hops: f64,
) -> anyhow::Result<()> {
    eprintln!("starting sluice up on topics {id}.* ...");
    let sluice = SluiceUnderTest::start(config, id).await?;
    let sluice_pid = Some(sluice.pid());
    let broker_pid = find_process(&options.broker_process);
    let idle = (CpuMeter::start(sluice_pid), CpuMeter::start(broker_pid));
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let (sluice_idle, broker_idle) = (idle.0.percent(), idle.1.percent());
    let one_decimal = |p: Option<f64>| p.map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"));
    println!(
        "idle for {} s: sluice {} of a core, broker {}, together {} (goal: under 5%)",
        options.idle_seconds,
        one_decimal(sluice_idle),
        one_decimal(broker_idle),
        one_decimal(sluice_idle.map(|s| s + broker_idle.unwrap_or(0.0))),
    );

    let direct = Target {
        url: format!("{}/chat/completions", upstream.base_url),
        api_key: None,
        body: chat_body("bench-upstream", options.stream),
    };
    let through_sluice = Target {
        url: format!("{}/v1/chat/completions", sluice.edge_url),
        api_key: Some(api_key.to_owned()),
        body: chat_body(id, options.stream),
    };
    let limited = limited_key.map(|key| Target {
        api_key: Some(key.to_owned()),
        ..through_sluice.clone()
    });
    let (warmup, window) = (
        Duration::from_secs(options.warmup_seconds),
        Duration::from_secs(options.seconds.max(1)),
    );
    println!(
        "{:>7} | {:>8} {:>7} {:>7} | {:>8} {:>7} {:>7} | {:>7} {:>7} | {:>6} {:>6} | {:>6} {:>6}",
        "clients",
        "direct/s",
        "p50 ms",
        "p99 ms",
        "sluice/s",
        "p50 ms",
        "p99 ms",
        "tax p50",
        "tax p99",
        "shed",
        "failed",
        "sluice",
        "broker"
    );
    let mut levels = Vec::new();
    for &clients in &options.clients {
        let http = load::client(clients)?;
        let direct = load::run(&http, &direct, clients, warmup, window).await;
        let cpu = (CpuMeter::start(sluice_pid), CpuMeter::start(broker_pid));
        let measured = load::run(&http, &through_sluice, clients, warmup, window).await;
        let (sluice_cpu, broker_cpu) = (cpu.0.percent(), cpu.1.percent());
        let cpu = (CpuMeter::start(sluice_pid), CpuMeter::start(broker_pid));
        let calls_before = limiter_calls(&http, &sluice.edge_url).await;
        let mixed = match &limited {
            Some(limited) => {
                let targets = [through_sluice.clone(), limited.clone()];
                let mut reports = load::run_mixed(&http, &targets, clients, warmup, window).await;
                let on = reports.pop().unwrap_or_default();
                let off = reports.pop().unwrap_or_default();
                Some((off, on))
            }
            None => None,
        };
        let mixed_cpu = (cpu.0.percent(), cpu.1.percent());
        let calls_after = limiter_calls(&http, &sluice.edge_url).await;
        let level = Level {
            mixed_limiter_calls: calls_after.zip(calls_before).map(|(a, b)| a - b),
            direct,
            sluice: measured,
            sluice_cpu,
            broker_cpu,
            mixed,
            mixed_cpu,
        };
        print_level(&level);
        levels.push(level);
    }
    drop(sluice);
    if levels.iter().all(|l| l.sluice.completed == 0) {
        anyhow::bail!("no request through Sluice succeeded (its log is in the temp directory)");
    }
    let max_rps = levels.iter().map(|l| l.sluice.rps).fold(0.0, f64::max);
    let at_ten = levels
        .iter()
        .min_by_key(|l| l.sluice.clients.abs_diff(10))
        .map(|l| (l.sluice.clients, l.sluice.p99_ms - l.direct.p99_ms));
    let (tax_clients, p99_tax) = at_ten.unwrap_or((0, f64::NAN));
    if tax_clients != 10 {
        println!("(no level with 10 clients: the p99 tax below is at {tax_clients})");
    }
    println!(
        "goal: p99 tax at 10 clients within three hops + 4 ms = {:.2} ms",
        three_hops + 4.0
    );
    let Some(comparison) = limits_comparison(&levels) else {
        println!("max_rps={max_rps:.0} p99_tax_ms_c10={p99_tax:.2}");
        return Ok(());
    };
    if let Some((all_off, half_on)) = comparison.cpu_us_per_request {
        println!(
            "sluice CPU per request at the busiest level: {all_off:.0} µs with no client limited, {half_on:.0} µs with half of them limited"
        );
    }
    println!("goal: limits on keep over 95% of the rate and add under 1 ms of p99 at 10 clients");
    println!(
        "max_rps={max_rps:.0} p99_tax_ms_c10={p99_tax:.2} limits_rate_ratio={:.3} limits_p99_added_ms_c10={:.2}",
        comparison.rate_ratio, comparison.p99_added_ms
    );
    Ok(())
}
