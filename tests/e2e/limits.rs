//! Plans, limits and the key lifecycle, with two edge instances sharing the counters: a limit
//! holds in total, not per instance; a burst cannot overrun a token budget; `Retry-After` is
//! honest; a revoked key stops on every edge within moments; a rotated key's grace ends.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use crate::harness::*;

/// `sluice up` and a second `sluice edge` on the same topics.
struct TwoEdges {
    sluice: Sluice,
    _second: Part,
    urls: [String; 2],
}

impl TwoEdges {
    async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// With `extra_env` for both processes.
    async fn start_with(extra_env: Vec<(String, String)>) -> Self {
        let sluice = Sluice::start_with(&unique("t"), extra_env.clone());
        let env: Vec<(&str, String)> = extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let (second, second_url) = sluice.spawn_edge(&env);
        ready_within(&second_url).await;
        let urls = [sluice.url.clone(), second_url];
        Self {
            sluice,
            _second: second,
            urls,
        }
    }

    /// A plan with these `sluice plan create` flags, and a tenant on it.
    fn tenant_on_plan(&self, flags: &[&str]) -> Tenant {
        let plan = unique("plan-");
        let mut args = vec!["plan", "create", &plan];
        args.extend_from_slice(flags);
        run_cli(&self.sluice.prefix, &args);
        let name = unique("tenant-");
        let out = run_cli(
            &self.sluice.prefix,
            &["tenant", "create", &name, "--plan", &plan, "--json"],
        );
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        Tenant {
            id: v["tenant_id"].as_str().unwrap().to_owned(),
            name,
            key: v["api_key"].as_str().unwrap().to_owned(),
        }
    }
}

/// POSTs a chat completion to the edge at `base`: status, headers and JSON body.
async fn post_chat(base: &str, key: &str, body: &Value) -> (u16, HeaderMap, Value) {
    let response = http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn short(max_tokens: u32, text: &str) -> Value {
    json!({"model": "auto", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn a_limit_of_n_a_minute_admits_n_across_two_edges_and_retry_after_is_honest() {
    let edges = TwoEdges::start().await;
    let tenant = edges.tenant_on_plan(&["--requests-per-minute", "6"]);
    let mut calls = Vec::new();
    for i in 0..10 {
        let (base, key) = (edges.urls[i % 2].clone(), tenant.key.clone());
        calls.push(tokio::spawn(async move {
            post_chat(&base, &key, &short(2, &format!("call {i}"))).await
        }));
    }
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for call in calls {
        let (status, headers, body) = call.await.unwrap();
        match status {
            200 => admitted.push(headers),
            429 => refused.push((headers, body)),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(
        (admitted.len(), refused.len()),
        (6, 4),
        "6 a minute in total, not 6 per edge"
    );
    for headers in &admitted {
        assert_eq!(
            header(headers, "x-ratelimit-limit-requests").as_deref(),
            Some("6")
        );
        assert!(header(headers, "x-ratelimit-remaining-requests").is_some());
        assert!(header(headers, "x-ratelimit-reset-requests").is_some());
    }
    for (headers, body) in &refused {
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        assert_eq!(
            header(headers, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
    }
    // A request comes back every 10 s: a retry after Retry-After succeeds.
    let (status, headers, _) = post_chat(&edges.urls[0], &tenant.key, &short(2, "again")).await;
    assert_eq!(status, 429);
    let wait: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "Retry-After {wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, body) = post_chat(&edges.urls[1], &tenant.key, &short(2, "after")).await;
    assert_eq!(status, 200, "a retry after Retry-After is admitted: {body}");
}

/// Calls an edge has made to the limits' counters (Redis), for every purpose.
async fn redis_calls(base: &str) -> f64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("sluice_edge_limit_store_calls_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn large_limits_are_drawn_on_through_shares_with_few_redis_calls() {
    let edges = TwoEdges::start().await;
    let tenant = edges.tenant_on_plan(&[
        "--requests-per-minute",
        "100000",
        "--tokens-per-minute",
        "10000000",
        "--monthly-tokens",
        "100000000",
        "--max-concurrent",
        "1000",
    ]);
    let before = redis_calls(&edges.urls[0]).await + redis_calls(&edges.urls[1]).await;
    // 40 clients, each sending 10 requests one after another, half of them to each edge.
    let (clients, each) = (40, 10);
    let started = Instant::now();
    let mut calls = Vec::new();
    for client in 0..clients {
        let (base, key) = (edges.urls[client % 2].clone(), tenant.key.clone());
        calls.push(tokio::spawn(async move {
            for i in 0..each {
                let (status, headers, body) =
                    post_chat(&base, &key, &short(4, &format!("share {client} {i}"))).await;
                assert_eq!(status, 200, "{body}");
                let remaining: u64 = header(&headers, "x-ratelimit-remaining-requests")
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    (99_000..=100_000).contains(&remaining),
                    "the bucket refills faster than 400 requests drain it: {remaining}"
                );
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let requests = (clients * each) as f64;
    let calls = redis_calls(&edges.urls[0]).await + redis_calls(&edges.urls[1]).await - before;
    // Besides the calls the requests cause, each edge's budget share hands its used tokens
    // over at least every two seconds while it is drawn on, however few the requests: on a
    // loaded machine the requests take longer, and those calls count too.
    let hand_overs = 2.0 * (started.elapsed().as_secs_f64() / 2.0).ceil();
    eprintln!("{calls} Redis calls for {requests} requests (hand-overs allowed for: {hand_overs})");
    assert!(
        calls <= requests / 4.0 + hand_overs,
        "{calls} Redis calls for {requests} requests and {hand_overs} hand-overs"
    );
    // The budget's share hands the tokens used over: the month's counter is what is billed.
    let billed = billed_tokens(&edges.urls[0], &tenant.key, (clients * each) as u64).await;
    eventually(5, "the shares to hand their tokens over", || async {
        (month_counter(&tenant.id) == Some(billed)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_limit_drawn_on_through_shares_still_holds_in_total_across_two_edges() {
    let edges = TwoEdges::start().await;
    // 160 a minute: a sixteenth is ten requests, so each edge holds a share of up to ten.
    let tenant = edges.tenant_on_plan(&["--requests-per-minute", "160"]);
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..200 {
        let (base, key) = (edges.urls[i % 2].clone(), tenant.key.clone());
        calls.push(tokio::spawn(async move {
            post_chat(&base, &key, &short(2, &format!("shared {i}")))
                .await
                .0
        }));
    }
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    // The bucket refills 160 a minute while the burst runs.
    let refilled = (started.elapsed().as_secs_f64() * 160.0 / 60.0).ceil() as u64;
    assert!(
        admitted <= 160 + refilled,
        "{admitted} admitted of a 160 limit (+{refilled} refilled)"
    );
    assert!(
        admitted >= 160 - 2 * 10,
        "no more than a share per edge may sit unused: {admitted}"
    );
}

#[tokio::test]
async fn a_burst_against_a_small_token_budget_overshoots_it_by_nothing() {
    let edges = TwoEdges::start().await;
    // Each request reserves its prompt (about 8 tokens) plus max_tokens 20.
    let tenant = edges.tenant_on_plan(&["--monthly-tokens", "300"]);
    let mut calls = Vec::new();
    for i in 0..24 {
        let (base, key) = (edges.urls[i % 2].clone(), tenant.key.clone());
        calls.push(tokio::spawn(async move {
            post_chat(&base, &key, &short(20, &format!("budget burst {i}"))).await
        }));
    }
    let (mut used, mut admitted, mut refused) = (0, 0, 0);
    for call in calls {
        let (status, _, body) = call.await.unwrap();
        match status {
            200 => {
                used += body["usage"]["total_tokens"].as_u64().unwrap();
                admitted += 1;
            }
            429 => {
                assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(refused > 0, "24 requests of ~28 tokens do not fit in 300");
    // With max_tokens set, a reservation is never exceeded, so the bound is zero.
    assert!(used <= 300, "the burst used {used} tokens of a 300 budget");
    assert!(
        admitted >= 10,
        "300 tokens hold ten reservations: {admitted}"
    );
}

#[tokio::test]
async fn a_plans_models_and_concurrency_hold() {
    let edges = TwoEdges::start_with(sim_speed(10.0)).await;
    let tenant = edges.tenant_on_plan(&["--models", "sim-large", "--max-concurrent", "1"]);
    let named = json!({"model": "sim-small", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, body) = post_chat(&edges.urls[0], &tenant.key, &named).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{body}"
    );
    let (status, _, body) = post_chat(&edges.urls[1], &tenant.key, &short(2, "hi")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["model"], "sim-large",
        "auto chooses among the allowed models"
    );

    // One at a time: while a long stream runs on one edge, the other edge refuses a second.
    let long = json!({"model": "auto", "max_tokens": 400, "stream": true, "messages": [{"role": "user", "content": "long"}]});
    let response = http()
        .post(format!("{}/v1/chat/completions", edges.urls[0]))
        .bearer_auth(&tenant.key)
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (status, headers, body) = post_chat(&edges.urls[1], &tenant.key, &short(2, "second")).await;
    assert_eq!(status, 429, "{body}");
    assert!(header(&headers, "retry-after").is_some());
    // Once the stream is read to its end, the place is free again.
    response.text().await.unwrap();
    eventually(10, "the place freed", || async {
        let (status, _, _) = post_chat(&edges.urls[1], &tenant.key, &short(2, "third")).await;
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revoked_key_stops_on_every_edge_within_moments_and_a_rotated_one_after_its_grace() {
    let edges = TwoEdges::start().await;
    let tenant = create_tenant(&edges.sluice.prefix);
    let me = |base: &str| format!("{base}/v1/me");
    // Both edges have the key cached.
    for url in &edges.urls {
        assert_eq!(get_json(&me(url), &tenant.key).await.0, 200);
    }

    // Rotation: the new key works at once, the old one until its grace ends.
    let out = run_cli(
        &edges.sluice.prefix,
        &["key", "rotate", &tenant.key, "--grace-secs", "3", "--json"],
    );
    let rotated: Value = serde_json::from_str(out.trim()).unwrap();
    let new_key = rotated["api_key"].as_str().unwrap().to_owned();
    let rotated_at = Instant::now();
    for url in &edges.urls {
        assert_eq!(get_json(&me(url), &new_key).await.0, 200);
        assert_eq!(get_json(&me(url), &tenant.key).await.0, 200, "in its grace");
    }
    for url in &edges.urls {
        eventually(10, "the old key's grace to end", || async {
            (get_json(&me(url), &tenant.key).await.0 == 401).then_some(())
        })
        .await;
    }
    assert!(rotated_at.elapsed() >= Duration::from_secs(3), "not before");

    // Revocation, by the prefix `key list` shows.
    let listed = run_cli(
        &edges.sluice.prefix,
        &["key", "list", &tenant.name, "--json"],
    );
    let active: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|k| k["active"] == true)
        .collect();
    assert_eq!(active.len(), 1, "{listed}");
    assert!(!listed.contains(&new_key[12..]), "never the secret");
    let prefix = active[0]["prefix"].as_str().unwrap();
    assert!(new_key.starts_with(prefix));
    run_cli(&edges.sluice.prefix, &["key", "revoke", prefix]);
    let revoked_at = Instant::now();
    for url in &edges.urls {
        eventually(5, "every edge to refuse the revoked key", || async {
            (get_json(&me(url), &new_key).await.0 == 401).then_some(())
        })
        .await;
    }
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "revocation reached both edges in {took:?}"
    );
}

#[tokio::test]
async fn a_plan_change_applies_at_once_on_every_edge() {
    let edges = TwoEdges::start().await;
    let tenant = edges.tenant_on_plan(&["--requests-per-minute", "1000"]);
    for url in &edges.urls {
        let (status, headers, _) = post_chat(url, &tenant.key, &short(2, "before")).await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "x-ratelimit-limit-requests").as_deref(),
            Some("1000")
        );
    }
    let tight = unique("plan-");
    run_cli(
        &edges.sluice.prefix,
        &[
            "plan",
            "create",
            &tight,
            "--requests-per-minute",
            "10",
            "--tokens-per-minute",
            "500",
        ],
    );
    run_cli(
        &edges.sluice.prefix,
        &["tenant", "plan", &tenant.name, &tight],
    );
    for url in &edges.urls {
        eventually(5, "the new plan on every edge", || async {
            let (_, headers, _) = post_chat(url, &tenant.key, &short(2, "after")).await;
            (header(&headers, "x-ratelimit-limit-requests").as_deref() == Some("10")).then_some(())
        })
        .await;
    }
    let plans = run_cli(&edges.sluice.prefix, &["plan", "list", "--json"]);
    let listed: Value = plans
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|p| p["name"] == tight.as_str())
        .unwrap();
    assert_eq!(listed["tokens_per_minute"], 500);
    assert_eq!(listed["tenants"], 1);
    // A plan with tenants on it cannot be deleted.
    let refused = sluice(&edges.sluice.prefix)
        .args(["plan", "delete", &tight])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("tenant(s) are on plan"));
    // The tenant reads its plan; another tenant sees its own (none), not this one's.
    let (_, me) = get_json(&format!("{}/v1/me", edges.urls[1]), &tenant.key).await;
    assert_eq!(me["plan"]["name"], tight.as_str(), "{me}");
    assert_eq!(me["plan"]["limits"]["requests_per_minute"], 10, "{me}");
    let other = create_tenant(&edges.sluice.prefix);
    let (_, theirs) = get_json(&format!("{}/v1/me", edges.urls[0]), &other.key).await;
    assert_eq!(theirs["plan"], Value::Null, "{theirs}");
    assert_eq!(theirs["id"], other.id.as_str());
    // A request larger than the plan's tokens a minute can never fit: 429, no Retry-After.
    let (status, headers, body) =
        post_chat(&edges.urls[0], &tenant.key, &short(600, "too big")).await;
    assert_eq!(status, 429, "{body}");
    assert!(header(&headers, "retry-after").is_none(), "{headers:?}");
}

/// Runs `redis-cli` against the stack's Redis on the tenant's monthly token counter (as
/// `sluice_stores::limits` names it) and returns what it printed.
fn month_counter_command(tenant_id: &str, command: &str) -> String {
    counter_command(tenant_id, "tenant:tokens", command)
}

/// Runs `redis-cli` on one of the tenant's monthly counters: `holder_and_kind` is
/// `tenant:tokens`, `tenant:spend` or `key:<id without dashes>:spend`.
fn counter_command(tenant_id: &str, holder_and_kind: &str, command: &str) -> String {
    let month = std::process::Command::new("date")
        .args(["-u", "+%Y-%m"])
        .output()
        .unwrap();
    let key = format!(
        "sluice:{{{}}}:{holder_and_kind}:{}",
        tenant_id.replace('-', ""),
        String::from_utf8_lossy(&month.stdout).trim()
    );
    let url = env_or("SLUICE_REDIS__URL", "redis://127.0.0.1:6379");
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &url, command, &key])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The tenant's monthly token counter, or `None` if Redis does not hold it.
fn month_counter(tenant_id: &str) -> Option<u64> {
    month_counter_command(tenant_id, "GET").parse().ok()
}

/// The tenant's tokens in the usage facts, once they hold `requests` requests.
async fn billed_tokens(base: &str, key: &str, requests: u64) -> u64 {
    eventually(30, "the usage facts", || async {
        let (_, usage) = get_json(&format!("{base}/v1/usage"), key).await;
        let totals = &usage["totals"];
        (totals["requests"] == requests).then(|| {
            totals["input_tokens"].as_u64().unwrap() + totals["output_tokens"].as_u64().unwrap()
        })
    })
    .await
}

#[tokio::test]
async fn the_monthly_counter_settles_to_the_usage_facts_and_is_seeded_from_them_when_lost() {
    let edges = TwoEdges::start().await;
    let tenant = edges.tenant_on_plan(&["--monthly-tokens", "100000"]);
    for (i, url) in edges.urls.iter().enumerate() {
        let (status, _, body) =
            post_chat(url, &tenant.key, &short(30, &format!("month {i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    // Reservations settle to the replies' usage: the counter is what is billed.
    let billed = billed_tokens(&edges.urls[0], &tenant.key, 2).await;
    eventually(5, "the counter to settle", || async {
        (month_counter(&tenant.id) == Some(billed)).then_some(())
    })
    .await;

    // Redis loses the counter (a restart without persistence): the next request seeds it from
    // the usage facts, so the month's spending is not forgotten.
    month_counter_command(&tenant.id, "DEL");
    assert_eq!(month_counter(&tenant.id), None);
    let (status, _, body) = post_chat(&edges.urls[1], &tenant.key, &short(30, "after")).await;
    assert_eq!(status, 200, "{body}");
    let billed = billed_tokens(&edges.urls[0], &tenant.key, 3).await;
    eventually(5, "the seeded counter to settle", || async {
        (month_counter(&tenant.id) == Some(billed)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn with_redis_down_limited_keys_are_refused_and_unlimited_ones_served() {
    // Nothing listens on the port Redis is said to be on.
    let down = format!("redis://127.0.0.1:{}", free_port());
    let sluice = Sluice::start_with(&unique("t"), vec![("SLUICE_REDIS__URL".into(), down)]);
    let plan = unique("plan-");
    run_cli(
        &sluice.prefix,
        &["plan", "create", &plan, "--requests-per-minute", "100"],
    );
    let limited = unique("tenant-");
    let out = run_cli(
        &sluice.prefix,
        &["tenant", "create", &limited, "--plan", &plan, "--json"],
    );
    let limited: Value = serde_json::from_str(out.trim()).unwrap();
    let (status, headers, body) = post_chat(
        &sluice.url,
        limited["api_key"].as_str().unwrap(),
        &short(2, "limited"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(header(&headers, "retry-after").as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "service_unavailable");
    let free = create_tenant(&sluice.prefix);
    let (status, _, body) = post_chat(&sluice.url, &free.key, &short(2, "free")).await;
    assert_eq!(status, 200, "keys with no limits never need Redis: {body}");
    assert!(metric(&sluice.url, "sluice_edge_limit_store_errors_total").await >= 1.0);
    drop(sluice);

    // Told to admit when the counters are down, the edge lets limited keys through unchecked.
    let down = format!("redis://127.0.0.1:{}", free_port());
    let admitting = Sluice::start_with(
        &unique("t"),
        vec![
            ("SLUICE_REDIS__URL".into(), down),
            (
                "SLUICE_EDGE__LIMITS__WHEN_STORE_DOWN".into(),
                "admit".into(),
            ),
        ],
    );
    let (status, _, body) = post_chat(
        &admitting.url,
        limited["api_key"].as_str().unwrap(),
        &short(2, "admitted unchecked"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_caller_that_hangs_up_is_settled_to_what_the_reply_used() {
    let edges = TwoEdges::start_with(sim_speed(20.0)).await;
    let tenant = edges.tenant_on_plan(&["--monthly-tokens", "100000", "--max-concurrent", "5"]);
    // No max_tokens: the request reserves its prompt plus 512 tokens.
    let ask = json!({"model": "sim-small", "stream": true,
        "messages": [{"role": "user", "content": "a story, then hang up"}]});
    let mut response = http()
        .post(format!("{}/v1/chat/completions", edges.urls[0]))
        .bearer_auth(&tenant.key)
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.chunk().await.unwrap().unwrap();
    drop(response);
    // The edge read the rest of the reply for it: the counter holds what was used and billed,
    // not the reservation.
    let billed = billed_tokens(&edges.urls[1], &tenant.key, 1).await;
    assert!(billed < 400, "{billed}");
    eventually(10, "the abandoned request to settle", || async {
        (month_counter(&tenant.id) == Some(billed)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_keys_own_limits_and_expiry_hold_under_a_plan_with_none() {
    let edges = TwoEdges::start().await;
    let tenant = create_tenant(&edges.sluice.prefix);
    let prefix = &tenant.key[..16];
    run_cli(
        &edges.sluice.prefix,
        &[
            "key",
            "limits",
            prefix,
            "--requests-per-minute",
            "2",
            "--models",
            "sim-small",
        ],
    );
    // The key's own rules: sim-small only, two a minute, across both edges.
    eventually(5, "the key's limits on every edge", || async {
        let (_, headers, _) = post_chat(&edges.urls[0], &tenant.key, &short(2, "limits")).await;
        (header(&headers, "x-ratelimit-limit-requests").as_deref() == Some("2")).then_some(())
    })
    .await;
    let named = json!({"model": "sim-large", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, body) = post_chat(&edges.urls[1], &tenant.key, &named).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let mut statuses = Vec::new();
    for url in &edges.urls {
        statuses.push(post_chat(url, &tenant.key, &short(2, "more")).await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // An expiry: the key stops on every edge when it comes.
    run_cli(
        &edges.sluice.prefix,
        &["key", "limits", prefix, "--expires-in-secs", "2"],
    );
    for url in &edges.urls {
        eventually(10, "the key to expire", || async {
            (get_json(&format!("{url}/v1/me"), &tenant.key).await.0 == 401).then_some(())
        })
        .await;
    }
    let audit = run_cli(
        &edges.sluice.prefix,
        &["audit", "--tenant", &tenant.name, "--json"],
    );
    assert_eq!(audit.matches("\"key.limits\"").count(), 2, "{audit}");
}

/// A chat request for `sim-small` (whose price no test changes) of at most `max_tokens`.
fn priced(max_tokens: u32, text: &str) -> Value {
    json!({"model": "sim-small", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
}

/// What an answered request's usage cost on `sim-small`, in micro-units rounded up (as the
/// spend counter counts it).
async fn spend_micros(body: &Value) -> u64 {
    let usage = &body["usage"];
    let pico = sim_small_pico(
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
    .await;
    u64::try_from((pico + 999_999) / 1_000_000).unwrap()
}

#[tokio::test]
async fn a_burst_against_a_small_spend_budget_overshoots_it_by_nothing_across_two_edges() {
    let edges = TwoEdges::start().await;
    let tenant = create_tenant(&edges.sluice.prefix);
    // 100 micro-units ($0.0001); a request of ~10 prompt tokens and max_tokens 20 on sim-small
    // ($0.10 / $0.40 per million) reserves about 9.
    run_cli(
        &edges.sluice.prefix,
        &["budget", "set", &tenant.name, "0.0001", "--alert", "50"],
    );
    let mut calls = Vec::new();
    for i in 0..24 {
        let (base, key) = (edges.urls[i % 2].clone(), tenant.key.clone());
        calls.push(tokio::spawn(async move {
            post_chat(&base, &key, &priced(20, &format!("spend burst {i}"))).await
        }));
    }
    let (mut spent, mut admitted, mut refused) = (0, 0, 0);
    for call in calls {
        let (status, _, body) = call.await.unwrap();
        match status {
            200 => {
                spent += spend_micros(&body).await;
                admitted += 1;
            }
            429 => {
                assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("spend budget of 0.0001 USD"), "{message}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        refused > 0,
        "24 requests of ~9 micro-units do not fit in 100"
    );
    // With max_tokens set, a reservation is never exceeded, so the bound is zero.
    assert!(spent <= 100, "the burst spent {spent} of a 100 budget");
    assert!(
        admitted >= 8,
        "100 micro-units hold ten reservations: {admitted}"
    );
    // Settled to what the replies cost: the counter is what was spent.
    eventually(10, "the spend counter to settle", || async {
        let counter: Option<u64> = counter_command(&tenant.id, "tenant:spend", "GET")
            .parse()
            .ok();
        (counter == Some(spent)).then_some(())
    })
    .await;
    // The budget's report prices the usage facts as the invoice will: the same spend, once
    // the facts are in, and past its 50% alert.
    // Every fact first, then the report: a report read before the last batch landed would
    // price only part of the month.
    eventually(30, "every admitted request's usage fact", || async {
        let facts = billed_per_request(&tenant.id).await.unwrap_or_default();
        (facts.len() == admitted).then_some(())
    })
    .await;
    let out = run_cli(
        &edges.sluice.prefix,
        &["budget", "list", &tenant.name, "--json"],
    );
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    let budget = &report["budgets"][0];
    assert_eq!(budget["monthly"], "0.0001", "{report}");
    assert!(budget["key_id"].is_null());
    assert_eq!(budget["alerting"], true, "{report}");
    let reported =
        sluice_stores::billing::money::parse_micros(budget["spent"].as_str().unwrap()).unwrap();
    // Rounded up once over the month, not once per request.
    assert!(
        (reported as u64) <= spent && reported as u64 + admitted as u64 >= spent,
        "{reported} reported, {spent} counted"
    );
}

#[tokio::test]
async fn a_keys_spend_budget_is_its_own_and_only_its_tenants_admins_see_or_change_it() {
    let sluice = Sluice::start();
    let (_, session) = register_tenant_admin(&sluice).await;
    let token = session["access_token"].as_str().unwrap().to_owned();
    let tenant_id = session["tenant_id"].as_str().unwrap().to_owned();
    let (capped_id, capped) = create_key(&sluice, &token, "capped").await;
    let (_, free) = create_key(&sluice, &token, "free").await;
    let base = sluice.url.clone();
    let send = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut request = http()
            .request(method, format!("{base}/v1/budgets{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let key_path = format!("/keys/{capped_id}");

    // Wrong input is a 400 naming the field.
    for bad in [
        json!({"monthly": "-1"}),
        json!({"monthly": "1.0000001"}),
        json!({"monthly": "0"}),
        json!({"monthly": "1", "alert_percent": 0}),
        json!({"monthly": "1", "extra": true}),
    ] {
        let (status, body) = send(reqwest::Method::PUT, &key_path, &token, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // 30 micro-units: about three requests of ~9.
    let (status, body) = send(
        reqwest::Method::PUT,
        &key_path,
        &token,
        Some(json!({"monthly": "0.00003", "alert_percent": 80})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["monthly"], "0.00003");

    // Another tenant's admin can neither set, remove nor see it; an API key is no admin.
    let (_, other) = register_tenant_admin(&sluice).await;
    let other_token = other["access_token"].as_str().unwrap();
    let (status, _) = send(
        reqwest::Method::PUT,
        &key_path,
        other_token,
        Some(json!({"monthly": "100"})),
    )
    .await;
    assert_eq!(status, 404, "another tenant's key is unknown to it");
    let (status, _) = send(reqwest::Method::DELETE, &key_path, other_token, None).await;
    assert_eq!(status, 404);
    let (status, theirs) = send(reqwest::Method::GET, "", other_token, None).await;
    assert_eq!(status, 200);
    assert_eq!(theirs["budgets"], json!([]), "{theirs}");
    let (status, _) = send(reqwest::Method::GET, "", &capped, None).await;
    assert_eq!(status, 403);

    // The capped key runs out; the tenant's other key does not.
    let (mut answered, mut exact_pico, mut spent) = (0, 0i128, 0);
    let mut refusal = Value::Null;
    for i in 0..20 {
        let (status, _, body) =
            post_chat(&sluice.url, &capped, &priced(20, &format!("capped {i}"))).await;
        match status {
            200 => {
                answered += 1;
                spent += spend_micros(&body).await;
                let usage = &body["usage"];
                exact_pico += sim_small_pico(
                    usage["prompt_tokens"].as_u64().unwrap(),
                    usage["completion_tokens"].as_u64().unwrap(),
                )
                .await;
            }
            429 => {
                refusal = body;
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(refusal["error"]["code"], "insufficient_quota", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.contains("this API key"), "{message}");
    assert!(
        answered >= 2 && spent <= 30,
        "{answered} answered, {spent} spent"
    );
    let (status, _, body) = post_chat(&sluice.url, &free, &priced(20, "free")).await;
    assert_eq!(status, 200, "{body}");

    // Redis loses the counter: it is seeded again from the usage facts, priced as the
    // invoice prices them (rounded up once).
    let holder = format!("key:{}:spend", capped_id.replace('-', ""));
    eventually(30, "the facts of both keys", || async {
        let facts = billed_per_request(&tenant_id).await.unwrap_or_default();
        (facts.len() == answered + 1).then_some(())
    })
    .await;
    counter_command(&tenant_id, &holder, "DEL");
    let seeded = u64::try_from((exact_pico + 999_999) / 1_000_000).unwrap();
    let (status, _, body) = post_chat(&sluice.url, &capped, &priced(20, "after the loss")).await;
    let after = match status {
        200 => spend_micros(&body).await,
        429 => 0,
        other => panic!("unexpected {other}: {body}"),
    };
    eventually(10, "the counter seeded from the facts", || async {
        let counter: Option<u64> = counter_command(&tenant_id, &holder, "GET").parse().ok();
        (counter == Some(seeded + after)).then_some(())
    })
    .await;

    // The report shows it; removing the budget frees the key (every edge drops its grants).
    let (status, report) = send(reqwest::Method::GET, "", &token, None).await;
    assert_eq!(status, 200);
    assert_eq!(report["budgets"][0]["key_id"], capped_id, "{report}");
    assert_eq!(report["currency"], "USD");
    let (status, _) = send(reqwest::Method::DELETE, &key_path, &token, None).await;
    assert_eq!(status, 200);
    let (_, audit) = get_json(&sluice.v1("/audit"), &token).await;
    let budget_actions: Vec<(&str, &str)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap_or("").starts_with("budget."))
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        budget_actions.contains(&("budget.set", capped_id.as_str()))
            && budget_actions.contains(&("budget.remove", capped_id.as_str())),
        "{audit}"
    );
    eventually(10, "the key to be free again", || async {
        let (status, _, _) = post_chat(&sluice.url, &capped, &priced(2, "free again")).await;
        (status == 200).then_some(())
    })
    .await;
}
