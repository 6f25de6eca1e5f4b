//! `sluice bench workflows`: workflow runs through the broker, and what the tool guard costs.
//!
//! 1. The guard (bulkhead, circuit breaker, per-attempt timeout) around a call that does
//!    nothing, against the bare call, in process: its added cost per tool call; and one real
//!    built-in tool call (`lookup_order` in PostgreSQL) for scale.
//! 2. One broker hop, produce → consume: no step can beat it (each step is one event).
//! 3. A `sluice up` of its own on fresh topics, with the simulated model answering at once: at
//!    each concurrency level, closed-loop clients run `workflow/customer_support` (a model
//!    triage, a branch, a knowledge search, a branch, a model answer, an end: six steps, seven
//!    events), then, in the same run, a plain chat completion on the same model: runs/s,
//!    p50/p99 per run, and per step.
//!
//! The last line is `runs_per_s=<best> step_p50_ms=<at 10 clients> guard_ns_per_call=<n>
//! ratio=<one hop ÷ a step's p50 at 10 clients>`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use sluice_orchestrator::tools::{BuiltinTools, Failure, Resilience, ResilienceConfig};
use sluice_pipelines::{bench::hop, kafka, metrics::Metrics};
use sluice_stores::postgres::{self, business, knowledge, tenants};

use super::{
    load::{self, Target},
    under_test::SluiceUnderTest,
};
use crate::config::Config;

/// Steps of the benchmark's run of `customer_support` on the simulated model, with one document
/// in the tenant's knowledge (triage, route, faq search, faq_known, faq_answer, faq_cited: its
/// golden sequence, `workflows/golden/customer_support.events`).
const STEPS_PER_RUN: f64 = 6.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct WorkflowOptions {
    pub clients: Vec<usize>,
    pub seconds: u64,
    pub warmup_seconds: u64,
    pub guard_calls: u64,
    pub hop_samples: usize,
}

/// Nanoseconds per call of `calls` calls of a call that does nothing, bare and through the guard.
async fn guard_cost(calls: u64) -> anyhow::Result<(f64, f64)> {
    let resilience = Resilience::new(ResilienceConfig::default(), Arc::new(Metrics::new()?));
    let nothing = |_: u32| async { Ok::<u64, Failure>(1) };
    let mut total = 0u64;
    let started = Instant::now();
    for _ in 0..calls {
        total += nothing(1).await.unwrap_or(0);
    }
    let bare = started.elapsed().as_nanos() as f64 / calls as f64;
    let started = Instant::now();
    for _ in 0..calls {
        total += resilience
            .call("bench", "tenant", nothing)
            .await
            .unwrap_or(0);
    }
    let guarded = started.elapsed().as_nanos() as f64 / calls as f64;
    anyhow::ensure!(total == 2 * calls, "a guarded call failed");
    Ok((bare, guarded))
}

pub async fn run(config: &Config, options: &WorkflowOptions) -> anyhow::Result<()> {
    let (bare, guarded) = guard_cost(options.guard_calls).await?;
    let guard_ns = (guarded - bare).max(0.0);
    println!(
        "tool guard ({} calls of a call that does nothing): bare {bare:.0} ns, guarded {guarded:.0} ns: the bulkhead, breaker and timeout add {guard_ns:.0} ns per call",
        options.guard_calls
    );

    let id = format!("bench-wf-{}", sluice_pipelines::now_ms());
    super::print_topics(&id);
    let hop_topic = format!("{id}.hop");
    let outcome: anyhow::Result<()> = async {
        kafka::ensure_topics(&config.kafka, &[&hop_topic]).await?;
        let hop = hop::hop_latency(&config.kafka, &hop_topic, options.hop_samples).await?;
        println!(
            "one broker hop, produce -> consume ({} samples): p50 {:.2} ms, p99 {:.2} ms",
            hop.samples, hop.p50_ms, hop.p99_ms
        );

        let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
        let (tenant, api_key) = tenants::create_tenant(&admin, &id).await?;
        let mut conn = admin.acquire().await?;
        let customer = business::Customer {
            id: "bench".into(),
            name: "Bench".into(),
            email: None,
            phone: None,
        };
        business::upsert_customer(&mut conn, tenant.id, &customer).await?;
        let order = business::Order {
            id: "BENCH-1".into(),
            customer_id: customer.id.clone(),
            status: "shipped".into(),
            items: json!([]),
            total_minor: 0,
            currency: "USD".into(),
            tracking: None,
        };
        business::upsert_order(&mut conn, tenant.id, &order).await?;
        let document = knowledge::Version {
            id: "descaling",
            title: "Descaling your kettle",
            format: "text",
            version_ms: 1,
            deleted: false,
            chunks: vec![(None, "Fill the kettle with water and citric acid, boil, rinse twice.")],
        };
        knowledge::apply(&mut conn, tenant.id, &document).await?;
        drop(conn);
        let app = postgres::connect(&config.postgres.url, 2).await?;
        let builtin = BuiltinTools::new(app);
        let calls = 200u32;
        let started = Instant::now();
        for n in 0..calls {
            builtin
                .call(tenant.id, "lookup_order", &json!({"order_id": "BENCH-1"}), &n.to_string())
                .await
                .map_err(|e| anyhow::anyhow!("lookup_order: {e:?}"))?;
        }
        let lookup_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(calls);
        println!(
            "a built-in tool call (lookup_order, {calls} calls): {lookup_us:.0} µs; the guard adds {:.2}% to it",
            guard_ns / 10.0 / lookup_us
        );

        let mut child = config.clone();
        child.orchestrator.sim.first_token_ms = 0;
        child.orchestrator.sim.tokens_per_second = 0.0;
        eprintln!("starting sluice up on topics {id}.* ...");
        let sluice = SluiceUnderTest::start(&child, &id).await?;
        let body = |model: &str| -> axum::body::Bytes {
            json!({"model": model, "messages": [{"role": "user", "content": "How do I descale my kettle?"}]})
                .to_string()
                .into()
        };
        let target = |model: &str| Target {
            url: format!("{}/v1/chat/completions", sluice.edge_url),
            api_key: Some(api_key.clone()),
            body: body(model),
        };
        let (workflow, chat) = (target("workflow/customer_support"), target("sim-small"));
        let (warmup, window) = (
            Duration::from_secs(options.warmup_seconds),
            Duration::from_secs(options.seconds.max(1)),
        );
        println!(
            "{:>7} | {:>7} {:>7} {:>7} {:>8} | {:>7} {:>7} {:>7} | {:>6}",
            "clients", "runs/s", "p50 ms", "p99 ms", "step p50", "chats/s", "p50 ms", "p99 ms", "failed"
        );
        let mut best = 0.0f64;
        let mut step_at_ten = None;
        for &clients in &options.clients {
            let http = load::client(clients)?;
            let runs = load::run(&http, &workflow, clients, warmup, window).await;
            let chats = load::run(&http, &chat, clients, warmup, window).await;
            if let Some(why) = &runs.first_failure {
                println!("(a run failed: {why})");
            }
            let step_p50 = runs.p50_ms / STEPS_PER_RUN;
            println!(
                "{clients:>7} | {:>7.0} {:>7.1} {:>7.1} {:>8.2} | {:>7.0} {:>7.1} {:>7.1} | {:>6}",
                runs.rps, runs.p50_ms, runs.p99_ms, step_p50, chats.rps, chats.p50_ms, chats.p99_ms,
                runs.failed + chats.failed
            );
            best = best.max(runs.rps);
            if clients == 10 || step_at_ten.is_none() {
                step_at_ten = Some(step_p50);
            }
        }
        drop(sluice);
        anyhow::ensure!(best > 0.0, "no workflow run succeeded (its log is in the temp directory)");
        let step = step_at_ten.unwrap_or(f64::NAN);
        println!(
            "runs_per_s={best:.0} step_p50_ms={step:.2} guard_ns_per_call={guard_ns:.0} ratio={:.3}",
            hop.p50_ms / step
        );
        Ok(())
    }
    .await;
    super::remove_topics(config, &id, &[&hop_topic]).await;
    outcome
}
