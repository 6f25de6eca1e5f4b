//! Webhooks: a tenant's endpoints get `usage.threshold_reached` and `budget.exceeded` once per
//! crossing, signed so a receiver can check them with its own HMAC, retried with the same
//! delivery id until the endpoint answers, marked failed when attempts run out, and logged —
//! and another tenant's admin sees and touches none of it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// Sluice with retries fast enough for a test: three attempts, 200 ms apart at first.
fn fast_retries() -> Vec<(String, String)> {
    vec![
        ("SLUICE_WEBHOOKS__MAX_ATTEMPTS".into(), "3".into()),
        ("SLUICE_WEBHOOKS__BACKOFF_BASE_MS".into(), "200".into()),
        ("SLUICE_WEBHOOKS__RETRY_SCAN_MS".into(), "100".into()),
        ("SLUICE_WEBHOOKS__TIMEOUT_MS".into(), "2000".into()),
    ]
}

async fn call(
    sluice: &Sluice,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http().request(method, sluice.v1(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Sets the tenant's own spend budget through the API.
async fn set_budget(
    sluice: &Sluice,
    token: &str,
    monthly: &str,
    alert_percent: u8,
) -> (u16, Value) {
    let body = json!({"monthly": monthly, "alert_percent": alert_percent});
    call(
        sluice,
        reqwest::Method::PUT,
        "/budgets/tenant",
        token,
        Some(body),
    )
    .await
}

fn priced(text: &str) -> Value {
    json!({"model": "sim-small", "max_tokens": 20, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test]
async fn budget_events_reach_the_endpoint_once_per_crossing_signed_and_retried() {
    let sluice = Sluice::start_with(&unique("t"), fast_retries());
    let receiver = WebhookReceiver::start().await;
    let (_, session) = register_tenant_admin(&sluice).await;
    let token = session["access_token"].as_str().unwrap().to_owned();

    // Input is checked.
    for bad in [
        json!({"url": "ftp://example.com/hook"}),
        json!({"url": "https://example.com/hook", "events": ["invoice.paid"]}),
        json!({"url": "https://example.com/hook", "events": []}),
        json!({"url": "https://example.com/hook", "secret": "mine"}),
    ] {
        let (status, body) = call(
            &sluice,
            reqwest::Method::POST,
            "/webhooks",
            &token,
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, endpoint) = call(
        &sluice,
        reqwest::Method::POST,
        "/webhooks",
        &token,
        Some(json!({"url": receiver.url, "events": ["usage.threshold_reached", "budget.exceeded"], "description": "billing alerts"})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{endpoint}");
    let endpoint_id = endpoint["id"].as_str().unwrap().to_owned();
    let (_, listed) = call(&sluice, reqwest::Method::GET, "/webhooks", &token, None).await;
    assert_eq!(listed["data"][0]["id"], endpoint_id.as_str());
    assert!(
        listed["data"][0].get("secret").is_none(),
        "never shown again: {listed}"
    );

    // Another tenant's admin sees none of it and cannot touch it.
    let (_, other) = register_tenant_admin(&sluice).await;
    let other_token = other["access_token"].as_str().unwrap();
    let (_, theirs) = call(
        &sluice,
        reqwest::Method::GET,
        "/webhooks",
        other_token,
        None,
    )
    .await;
    assert_eq!(theirs["data"], json!([]));
    let path = format!("/webhooks/{endpoint_id}");
    let (status, _) = call(&sluice, reqwest::Method::DELETE, &path, other_token, None).await;
    assert_eq!(status, 404);
    let rotate = format!("{path}/rotate-secret");
    let (status, _) = call(&sluice, reqwest::Method::POST, &rotate, other_token, None).await;
    assert_eq!(status, 404);

    // A budget of 30 micro-units alerting at half: requests until it refuses, and a few more.
    let (status, body) = set_budget(&sluice, &token, "0.00003", 50).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&sluice, &token, "spender").await;
    // The first alert delivery fails twice, then goes through on the third attempt.
    receiver.fail_next("usage.threshold_reached", 2);
    let mut refused = 0;
    for i in 0..20 {
        let (status, body) = chat(&sluice, &key, priced(&format!("spend {i}"))).await;
        match status {
            200 => {}
            429 => refused += 1,
            other => panic!("unexpected {other}: {body}"),
        }
        if refused == 3 {
            break;
        }
    }
    assert_eq!(refused, 3, "the budget ran out");
    let alerts = eventually(20, "the alert, delivered on its third attempt", || async {
        let alerts = receiver.of_type("usage.threshold_reached");
        (alerts.iter().any(|r| r.status == 200)).then_some(alerts)
    })
    .await;
    assert_eq!(
        alerts.len(),
        3,
        "two failures, then the delivery: {alerts:?}"
    );
    let delivery = alerts[0].header("sluice-delivery").to_owned();
    assert!(
        alerts
            .iter()
            .all(|a| a.header("sluice-delivery") == delivery && a.body == alerts[0].body),
        "every attempt is the same delivery"
    );
    for alert in &alerts {
        let signed_at = verify_signature(alert, &secret);
        assert!((signed_at - sluice_pipelines::now_ms() / 1000).abs() < 60);
    }
    let event = alerts[0].json();
    assert_eq!(event["type"], "usage.threshold_reached");
    assert_eq!(event["tenant_id"], session["tenant_id"]);
    assert_eq!(event["data"]["monthly"], "0.00003");
    assert_eq!(event["data"]["alert_percent"], 50);
    assert!(event["data"]["key_id"].is_null(), "the tenant's own budget");
    let exceeded = eventually(20, "budget.exceeded", || async {
        let got = receiver.of_type("budget.exceeded");
        (!got.is_empty()).then_some(got)
    })
    .await;
    verify_signature(&exceeded[0], &secret);
    assert_eq!(exceeded[0].json()["data"]["currency"], "USD");
    assert!(
        exceeded[0].json()["data"]["exhausted"].is_boolean(),
        "whether the budget is used up, or what is left cannot cover a request"
    );
    // More requests past the alert and over the budget tell nothing new.
    for i in 0..3 {
        chat(&sluice, &key, priced(&format!("again {i}"))).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.of_type("usage.threshold_reached").len(), 3);
    assert_eq!(
        receiver.of_type("budget.exceeded").len(),
        1,
        "once per crossing"
    );

    // The log says so; the other tenant's log is empty.
    let (status, log) = call(
        &sluice,
        reqwest::Method::GET,
        "/webhooks/deliveries",
        &token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{log}");
    let logged = log["data"].as_array().unwrap();
    assert_eq!(logged.len(), 2, "{log}");
    let alert = logged
        .iter()
        .find(|d| d["event_type"] == "usage.threshold_reached")
        .unwrap();
    assert_eq!(alert["id"], delivery.as_str());
    assert_eq!(
        (alert["state"].as_str(), alert["attempts"].as_i64()),
        (Some("delivered"), Some(3))
    );
    assert_eq!(alert["last_status"], 200);
    let (_, theirs) = call(
        &sluice,
        reqwest::Method::GET,
        "/webhooks/deliveries",
        other_token,
        None,
    )
    .await;
    assert_eq!(theirs["data"], json!([]));
    let (status, _) = call(&sluice, reqwest::Method::GET, "/webhooks", &key, None).await;
    assert_eq!(status, 403, "an API key is no admin");
    let (_, audit) = get_json(&sluice.v1("/audit"), &token).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"webhook.create"), "{audit}");

    // A rotated secret signs what comes next; an endpoint that never answers ends failed.
    let (status, rotated) = call(
        &sluice,
        reqwest::Method::POST,
        &format!("/webhooks/{endpoint_id}/rotate-secret"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    receiver.fail_next("*", usize::MAX);
    let (status, body) = set_budget(&sluice, &token, "0.00004", 10).await;
    assert_eq!(status, 200, "{body}");
    // A new budget is a new crossing: it alerts again, to an endpoint that fails every time.
    eventually(10, "the new budget to be in force", || async {
        let (status, _) = chat(&sluice, &key, priced("a new budget")).await;
        (status == 200 || receiver.of_type("usage.threshold_reached").len() > 3).then_some(())
    })
    .await;
    let (_, log) = eventually(20, "the failed delivery", || async {
        let (status, log) = call(
            &sluice,
            reqwest::Method::GET,
            "/webhooks/deliveries",
            &token,
            None,
        )
        .await;
        let failed = log["data"]
            .as_array()?
            .iter()
            .any(|d| d["state"] == "failed" && d["attempts"] == 3);
        failed.then_some((status, log))
    })
    .await;
    let failed = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["state"] == "failed")
        .unwrap()
        .clone();
    assert_eq!(failed["last_status"], 503, "{failed}");
    let attempts: Vec<Received> = receiver
        .received()
        .into_iter()
        .filter(|r| r.header("sluice-delivery") == failed["id"].as_str().unwrap())
        .collect();
    assert_eq!(attempts.len(), 3, "three attempts, no more");
    for attempt in &attempts {
        verify_signature(attempt, &new_secret);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        receiver
            .received()
            .iter()
            .filter(|r| r.header("sluice-delivery") == failed["id"].as_str().unwrap())
            .count(),
        3
    );
}

#[tokio::test]
async fn a_delivery_waiting_for_its_retry_survives_a_crash() {
    // A retry 4 s after a failed attempt leaves time to kill the process before it.
    let mut sluice = Sluice::start_with(
        &unique("t"),
        vec![
            ("SLUICE_WEBHOOKS__BACKOFF_BASE_MS".into(), "4000".into()),
            ("SLUICE_WEBHOOKS__RETRY_SCAN_MS".into(), "100".into()),
        ],
    );
    let receiver = WebhookReceiver::start().await;
    let (_, session) = register_tenant_admin(&sluice).await;
    let token = session["access_token"].as_str().unwrap().to_owned();
    let (status, endpoint) = call(
        &sluice,
        reqwest::Method::POST,
        "/webhooks",
        &token,
        Some(json!({"url": receiver.url})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    let (status, _) = set_budget(&sluice, &token, "0.001", 1).await;
    assert_eq!(status, 200);
    let (_, key) = create_key(&sluice, &token, "spender").await;
    receiver.fail_next("*", 1);
    // 1% of 1,000 micro-units: one request reserving 100 output tokens (about 40) reaches it.
    let big = json!({"model": "sim-small", "max_tokens": 100, "messages": [{"role": "user", "content": "spend"}]});
    let (status, body) = chat(&sluice, &key, big).await;
    assert_eq!(status, 200, "{body}");
    eventually(20, "the first, failed attempt", || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    let killed_at = std::time::Instant::now();
    sluice.kill();
    assert_eq!(receiver.received().len(), 1, "killed before the retry");
    sluice.restart_after_crash(killed_at).await;
    let delivered = eventually(40, "the retry after the restart", || async {
        let got = receiver.received();
        got.iter().any(|r| r.status == 200).then_some(got)
    })
    .await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert_eq!(
        delivered[0].header("sluice-delivery"),
        delivered[1].header("sluice-delivery")
    );
    verify_signature(&delivered[1], &secret);
}
