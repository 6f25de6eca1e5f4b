//! Analytics: a tenant's requests, errors, tokens, cost, latency and routing mix per model,
//! from real calls — ones that succeed and ones whose upstream cannot be reached — with the
//! failed calls kept out of the billed facts, and nothing of it visible to another tenant.

use serde_json::{json, Value};

use crate::harness::*;

async fn analytics(sluice: &Sluice, token: &str, query: &str) -> (u16, Value) {
    let response = http()
        .get(sluice.v1(&format!("/analytics/models{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn analytics_count_calls_errors_cost_and_latency_per_model() {
    let sluice = Sluice::start();
    let (_, session) = register_tenant_admin(&sluice).await;
    let token = session["access_token"].as_str().unwrap().to_owned();
    let tenant_id = session["tenant_id"].as_str().unwrap().to_owned();
    let (_, key) = create_key(&sluice, &token, "analysed").await;
    // A model whose upstream listens nowhere; priced far above the others, so that `auto`
    // never picks it for anyone else.
    let broken = unique("unreachable-");
    run_cli(
        &sluice.prefix,
        &[
            "model",
            "add",
            &broken,
            "--provider",
            "openai",
            "--base-url",
            "http://127.0.0.1:1/v1",
            "--input-price-micros",
            "900000000",
            "--output-price-micros",
            "900000000",
        ],
    );
    let mut expected_pico = 0i128;
    for i in 0..3 {
        let body = json!({"model": "sim-small", "max_tokens": 10, "messages": [{"role": "user", "content": format!("measure {i}")}]});
        let (status, body) = chat(&sluice, &key, body).await;
        assert_eq!(status, 200, "{body}");
        expected_pico += sim_small_pico(
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        )
        .await;
    }
    let failing = json!({"model": broken, "max_tokens": 10, "messages": [{"role": "user", "content": "fail"}]});
    // The catalogue reaches the edge and the router within their refresh.
    eventually(30, "the unreachable model to be routed", || async {
        let (status, _) = chat(&sluice, &key, failing.clone()).await;
        (status >= 500).then_some(())
    })
    .await;
    let (status, body) = chat(&sluice, &key, failing.clone()).await;
    assert!(status >= 500, "{status}: {body}");
    run_cli(&sluice.prefix, &["model", "remove", &broken]);

    let report = eventually(30, "the calls in the analytics", || async {
        let (status, report) = analytics(&sluice, &token, "?step=hour").await;
        assert_eq!(status, 200, "{report}");
        let models = report["models"].as_array()?;
        let failed = models.iter().find(|m| m["model"] == broken.as_str())?;
        let fine = models.iter().find(|m| m["model"] == "sim-small")?;
        (failed["requests"] == 2 && fine["requests"] == 3).then_some(report)
    })
    .await;
    let models = report["models"].as_array().unwrap();
    let failed = models
        .iter()
        .find(|m| m["model"] == broken.as_str())
        .unwrap();
    let fine = models.iter().find(|m| m["model"] == "sim-small").unwrap();
    assert_eq!(
        (failed["errors"].as_u64(), failed["error_rate"].as_f64()),
        (Some(2), Some(1.0))
    );
    assert_eq!(
        failed["cost"], "0.00",
        "nothing billed for a call that produced nothing"
    );
    assert_eq!(
        (fine["errors"].as_u64(), fine["error_rate"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert_eq!(fine["share"].as_f64(), Some(0.6), "3 of the 5 calls");
    // Priced as the invoice prices it, exactly.
    let cost = sluice_stores::billing::money::Exact::parse(fine["cost"].as_str().unwrap()).unwrap();
    assert_eq!(cost.0, expected_pico, "{fine}");
    let bucket = report["buckets"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(bucket["requests"], 5, "{bucket}");
    assert_eq!(bucket["errors"], 2);
    let in_bucket = bucket["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "sim-small")
        .unwrap()
        .clone();
    let p50 = in_bucket["latency_ms"]["p50"]
        .as_f64()
        .expect("measured calls");
    let p99 = in_bucket["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p50 >= 0.0 && p99 >= p50, "{in_bucket}");
    // The failed calls are not usage: the billed facts hold the three that answered.
    let facts = billed_per_request(&tenant_id).await.unwrap();
    assert_eq!(facts.len(), 3, "{facts:?}");

    // Minutes give the same calls; bad input is a 400; another tenant sees none of it; an API
    // key is no admin.
    let (status, by_minute) = analytics(&sluice, &token, "?step=minute").await;
    assert_eq!(status, 200);
    let calls: u64 = by_minute["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(calls, 5);
    for bad in [
        "?step=week",
        "?step=minute&start=2020-01-01",
        "?start=tomorrow",
    ] {
        let (status, body) = analytics(&sluice, &token, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (_, other) = register_tenant_admin(&sluice).await;
    let (status, theirs) = analytics(&sluice, other["access_token"].as_str().unwrap(), "").await;
    assert_eq!(status, 200);
    assert_eq!(theirs["models"], json!([]), "{theirs}");
    let (status, _) = analytics(&sluice, &key, "").await;
    assert_eq!(status, 403);
}
