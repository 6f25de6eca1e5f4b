//! Tool adapters against a real HTTP server on loopback that fails on command: retries with the
//! same idempotency key, refusals not retried, timeouts, the circuit breaker per tool and tenant
//! (open, half-open, closed again), and the bulkhead. No stack needed.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use sluice_orchestrator::tools::{
    BreakerState, Failure, HttpTool, HttpToolConfig, Reach, Resilience, ResilienceConfig, ToolError,
};
use sluice_pipelines::metrics::Metrics;

use crate::harness::{app_database_url, create_tenant, run_cli, unique};

/// What the server answers next: a status, after a delay.
#[derive(Clone, Copy)]
struct Step {
    status: u16,
    delay_ms: u64,
}

/// One request the server received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    idempotency_key: Option<String>,
    body: String,
}

#[derive(Default)]
struct Script {
    steps: VecDeque<Step>,
    seen: Vec<Seen>,
}

/// A local HTTP server that answers each request with the next scripted step (200 with
/// `{"ok": true, "order": {"id": …}}` when none is left) and records what it received.
struct FlakyServer {
    url: String,
    script: Arc<Mutex<Script>>,
}

impl FlakyServer {
    async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new().fallback(answer).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, script }
    }

    /// Answers the next requests with these steps, in order.
    fn fail_with(&self, steps: &[(u16, u64)]) {
        let mut script = self.script.lock().unwrap();
        script.steps.extend(
            steps
                .iter()
                .map(|&(status, delay_ms)| Step { status, delay_ms }),
        );
    }

    /// Forgets the steps not yet used.
    fn clear(&self) {
        self.script.lock().unwrap().steps.clear();
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let step = {
        let mut script = script.lock().unwrap();
        script.seen.push(Seen {
            method: method.to_string(),
            uri: uri.to_string(),
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        script.steps.pop_front()
    };
    let step = step.unwrap_or(Step {
        status: 200,
        delay_ms: 0,
    });
    tokio::time::sleep(Duration::from_millis(step.delay_ms)).await;
    let status = StatusCode::from_u16(step.status).unwrap();
    let body = if status.is_success() {
        json!({"ok": true, "order": {"id": "A-17", "status": "shipped"}}).to_string()
    } else {
        format!("scripted {}", step.status)
    };
    (status, body).into_response()
}

/// A tool calling `url` (on loopback: allowed to reach any address).
fn tool(url: String, method: &str) -> HttpTool {
    HttpTool::new(HttpToolConfig {
        url,
        method: method.into(),
        bearer_token_env: None,
        headers: BTreeMap::new(),
        result_pointer: None,
    })
    .unwrap()
    .reaching(Reach::Any)
}

/// The count of `tool`'s calls that ended with `outcome`.
fn calls(metrics: &Metrics, tool: &str, outcome: &str) -> u64 {
    metrics.tool_calls.with_label_values(&[tool, outcome]).get()
}

fn quick() -> ResilienceConfig {
    ResilienceConfig {
        timeout_ms: 1_000,
        max_attempts: 3,
        backoff_base_ms: 5,
        backoff_max_ms: 20,
        breaker_failures: 100,
        breaker_open_ms: 150,
        bulkhead: 8,
    }
}

/// One guarded call of `tool` named `name` for `tenant`.
async fn call(
    resilience: &Resilience,
    tool: &HttpTool,
    name: &str,
    tenant: &str,
    key: &str,
) -> Result<Value, ToolError> {
    let arguments = json!({"order_id": "A-17", "quantity": 2});
    resilience
        .call(name, tenant, |_attempt| tool.call(&arguments, key))
        .await
}

#[tokio::test]
async fn retriable_failures_are_retried_with_the_same_idempotency_key_until_one_succeeds() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let resilience = Resilience::new(quick(), metrics.clone());
    let orders = tool(format!("{}/orders", server.url), "POST");
    server.fail_with(&[(503, 0), (500, 0)]);
    let answer = call(&resilience, &orders, "create_order", "t1", "run-1:step-2")
        .await
        .unwrap();
    assert_eq!(answer["order"]["id"], "A-17");
    let seen = server.seen();
    assert_eq!(seen.len(), 3, "two failures, then the answer");
    assert!(seen
        .iter()
        .all(|s| s.idempotency_key.as_deref() == Some("run-1:step-2") && s.method == "POST"));
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body, json!({"order_id": "A-17", "quantity": 2}));
    assert_eq!(
        metrics
            .tool_retries
            .with_label_values(&["create_order"])
            .get(),
        2
    );
    assert_eq!(calls(&metrics, "create_order", "ok"), 1);

    // Every attempt failing: exhausted, with the last failure.
    server.fail_with(&[(503, 0), (429, 0), (502, 0)]);
    let e = call(&resilience, &orders, "create_order", "t1", "run-1:step-3")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ToolError::Exhausted { attempts: 3, message } if message.contains("502")),
        "{e:?}"
    );
    assert_eq!(calls(&metrics, "create_order", "exhausted"), 1);
}

#[tokio::test]
async fn a_refusal_is_not_retried() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let resilience = Resilience::new(quick(), metrics.clone());
    let orders = tool(format!("{}/orders", server.url), "POST");
    server.fail_with(&[(400, 0)]);
    let e = call(&resilience, &orders, "create_order", "t1", "k")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ToolError::Refused { attempts: 1, message } if message.contains("400")),
        "{e:?}"
    );
    assert_eq!(server.seen().len(), 1);
    assert_eq!(
        metrics
            .tool_retries
            .with_label_values(&["create_order"])
            .get(),
        0
    );
    assert_eq!(
        resilience.breaker("create_order", "t1"),
        BreakerState::Closed { failures: 0 },
        "a refusal says nothing about the tool's health"
    );
    // Nor does it wipe out failures in a row.
    let config = ResilienceConfig {
        max_attempts: 1,
        ..quick()
    };
    let one_shot = Resilience::new(config, Arc::new(Metrics::new().unwrap()));
    server.fail_with(&[(503, 0), (400, 0)]);
    for _ in 0..2 {
        assert!(call(&one_shot, &orders, "create_order", "t1", "k")
            .await
            .is_err());
    }
    assert_eq!(
        one_shot.breaker("create_order", "t1"),
        BreakerState::Closed { failures: 1 }
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_and_is_retried() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = ResilienceConfig {
        timeout_ms: 500,
        ..quick()
    };
    let resilience = Resilience::new(config, metrics);
    let lookup = tool(format!("{}/orders/{{order_id}}", server.url), "GET");
    server.fail_with(&[(200, 3_000)]);
    let answer = call(&resilience, &lookup, "lookup_order", "t1", "k")
        .await
        .unwrap();
    assert_eq!(answer["order"]["status"], "shipped");
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "the slow attempt, then one in time");
    assert_eq!(seen[1].uri, "/orders/A-17?quantity=2");
    assert_eq!(seen[1].idempotency_key, None, "a read carries no key");
}

#[tokio::test]
async fn the_breaker_opens_per_tool_and_tenant_and_closes_after_a_good_probe() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    // Open long enough that a loaded machine cannot outlast it between two calls.
    let config = ResilienceConfig {
        max_attempts: 1,
        breaker_failures: 2,
        breaker_open_ms: 1_000,
        ..quick()
    };
    let resilience = Resilience::new(config, metrics.clone());
    let orders = tool(format!("{}/orders", server.url), "POST");
    let open = || {
        metrics
            .tool_breakers
            .with_label_values(&["create_order", "open"])
            .get()
    };

    server.fail_with(&[(503, 0), (503, 0)]);
    for _ in 0..2 {
        let e = call(&resilience, &orders, "create_order", "t1", "k").await;
        assert!(matches!(e, Err(ToolError::Exhausted { .. })), "{e:?}");
    }
    assert!(matches!(
        resilience.breaker("create_order", "t1"),
        BreakerState::Open { .. }
    ));
    assert_eq!(open(), 1);
    // Open: turned away without reaching the tool.
    let e = call(&resilience, &orders, "create_order", "t1", "k").await;
    assert_eq!(e, Err(ToolError::BreakerOpen));
    assert_eq!(server.seen().len(), 2);
    // Another tenant's calls, and another tool's, are not affected.
    assert!(call(&resilience, &orders, "create_order", "t2", "k")
        .await
        .is_ok());
    assert!(call(&resilience, &orders, "lookup_order", "t1", "k")
        .await
        .is_ok());
    assert_eq!(calls(&metrics, "create_order", "breaker_open"), 1);

    // Its time up, one probe goes through; it fails, and the breaker opens again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    server.fail_with(&[(503, 0)]);
    let e = call(&resilience, &orders, "create_order", "t1", "k").await;
    assert!(matches!(e, Err(ToolError::Exhausted { .. })), "{e:?}");
    assert_eq!(
        call(&resilience, &orders, "create_order", "t1", "k").await,
        Err(ToolError::BreakerOpen)
    );
    // Next time the probe succeeds and the breaker closes.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(call(&resilience, &orders, "create_order", "t1", "k")
        .await
        .is_ok());
    assert_eq!(
        resilience.breaker("create_order", "t1"),
        BreakerState::Closed { failures: 0 }
    );
    assert_eq!(open(), 0);
    assert_eq!(
        metrics
            .tool_breakers
            .with_label_values(&["create_order", "half_open"])
            .get(),
        0
    );
}

#[tokio::test]
async fn a_probe_whose_caller_goes_away_lets_the_next_call_probe() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = ResilienceConfig {
        max_attempts: 1,
        breaker_failures: 1,
        breaker_open_ms: 50,
        ..quick()
    };
    let resilience = Resilience::new(config, metrics);
    let orders = tool(format!("{}/orders", server.url), "POST");
    server.fail_with(&[(500, 0)]);
    assert!(call(&resilience, &orders, "t", "t1", "k").await.is_err());
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The probe hangs; its caller gives up on it.
    server.fail_with(&[(200, 2_000)]);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        call(&resilience, &orders, "t", "t1", "k"),
    )
    .await;
    assert!(abandoned.is_err());
    // (If the abandoned probe never reached the server, its slow answer must not wait for the
    // next call.)
    server.clear();
    assert!(call(&resilience, &orders, "t", "t1", "k").await.is_ok());
}

#[tokio::test]
async fn the_bulkhead_turns_away_calls_beyond_its_bound() {
    let server = FlakyServer::start().await;
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = ResilienceConfig {
        bulkhead: 1,
        ..quick()
    };
    let resilience = Arc::new(Resilience::new(config, metrics.clone()));
    let orders = Arc::new(tool(format!("{}/orders", server.url), "POST"));
    server.fail_with(&[(200, 1_500)]);
    let slow = {
        let (resilience, orders) = (resilience.clone(), orders.clone());
        tokio::spawn(async move { call(&resilience, &orders, "create_order", "t1", "a").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        call(&resilience, &orders, "create_order", "t1", "b").await,
        Err(ToolError::BulkheadFull)
    );
    // Another tenant's calls of the same tool have places of their own.
    assert!(call(&resilience, &orders, "create_order", "t2", "c")
        .await
        .is_ok());
    assert!(slow.await.unwrap().is_ok());
    assert!(call(&resilience, &orders, "create_order", "t1", "b")
        .await
        .is_ok());
    assert_eq!(calls(&metrics, "create_order", "bulkhead_full"), 1);
}

#[tokio::test]
async fn the_answer_is_picked_by_its_pointer_and_an_unreachable_tool_is_retriable() {
    let server = FlakyServer::start().await;
    let picked = HttpTool::new(HttpToolConfig {
        url: format!("{}/orders/{{order_id}}", server.url),
        method: "GET".into(),
        bearer_token_env: None,
        headers: BTreeMap::new(),
        result_pointer: Some("/order/status".into()),
    })
    .unwrap()
    .reaching(Reach::Any);
    let answer = picked
        .call(&json!({"order_id": "A-17"}), "k")
        .await
        .unwrap();
    assert_eq!(answer, json!("shipped"));
    // A port nobody listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let gone = tool(format!("http://127.0.0.1:{closed}/x"), "POST");
    assert!(matches!(
        gone.call(&json!({}), "k").await,
        Err(Failure::Retriable(_))
    ));
    assert!(matches!(
        gone.call(&json!([1]), "k").await,
        Err(Failure::Permanent(_))
    ));
}

/// Loads a customer with two orders into tenant `name` through `sluice tenant load`.
fn seed(prefix: &str, name: &str, customer: &str) {
    let data = json!({
        "customers": [{"id": customer, "name": "Ada Lovelace", "email": "Ada@Example.com"}],
        "orders": [
            {"id": "A-1", "customer_id": customer, "status": "shipped", "total_minor": 2999,
             "items": [{"sku": "kettle", "quantity": 1, "unit_price_minor": 2999}], "tracking": "TRACK-A-1"},
            {"id": "A-2", "customer_id": customer, "status": "pending"},
        ],
    });
    let file = std::env::temp_dir().join(format!("{}.json", unique("business-")));
    std::fs::write(&file, data.to_string()).unwrap();
    let out = run_cli(prefix, &["tenant", "load", name, file.to_str().unwrap()]);
    assert!(out.contains("loaded 1 customers and 2 orders"), "{out}");
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn built_in_tools_read_and_write_a_tenants_own_data_once_per_key() {
    use sluice_orchestrator::tools::BuiltinTools;
    let prefix = unique("t");
    let alice = create_tenant(&prefix);
    let bob = create_tenant(&prefix);
    let (alice_id, bob_id) = (alice.uuid(), bob.uuid());
    let app = sqlx::PgPool::connect(&app_database_url()).await.unwrap();
    seed(&prefix, &alice.name, "c-1");
    let tools = BuiltinTools::new(app.clone());

    let order = tools
        .call(alice_id, "lookup_order", &json!({"order_id": "A-1"}), "k")
        .await
        .unwrap();
    assert_eq!(order["found"], true);
    assert_eq!(order["order"]["tracking"], "TRACK-A-1");
    let customer = tools
        .call(
            alice_id,
            "lookup_customer",
            &json!({"email": "ada@example.COM"}),
            "k",
        )
        .await
        .unwrap();
    assert_eq!(customer["customer"]["id"], "c-1");
    let listed = tools
        .call(
            alice_id,
            "list_orders",
            &json!({"customer_id": "c-1", "limit": 1}),
            "k",
        )
        .await
        .unwrap();
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1);
    // Another tenant finds none of it, and cannot change it.
    for (tool, arguments) in [
        ("lookup_order", json!({"order_id": "A-1"})),
        ("lookup_customer", json!({"customer_id": "c-1"})),
        (
            "update_order_status",
            json!({"order_id": "A-1", "status": "cancelled"}),
        ),
    ] {
        let answer = tools
            .call(bob_id, tool, &arguments, &unique("k"))
            .await
            .unwrap();
        assert_eq!(answer, json!({"found": false}), "{tool}");
    }
    let listed = tools
        .call(bob_id, "list_orders", &json!({"customer_id": "c-1"}), "k")
        .await
        .unwrap();
    assert_eq!(listed, json!({"orders": []}));

    // A write retried or redelivered with its key happens once, even when the two race.
    let ticket = json!({"subject": "Kettle broken", "body": "It leaks.", "priority": "high", "customer_id": "c-1"});
    let key = unique("run-1:step-");
    let (first, second) = tokio::join!(
        tools.call(alice_id, "create_ticket", &ticket, &key),
        tools.call(alice_id, "create_ticket", &ticket, &key),
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    let again = tools
        .call(alice_id, "create_ticket", &ticket, &key)
        .await
        .unwrap();
    assert_eq!(again["ticket"]["id"], first["ticket"]["id"]);
    let other = tools
        .call(alice_id, "create_ticket", &ticket, &unique("run-2:step-"))
        .await
        .unwrap();
    assert_ne!(other["ticket"]["id"], first["ticket"]["id"]);
    let mut tx = sluice_stores::postgres::tenant_transaction(&app, alice_id)
        .await
        .unwrap();
    let tickets = sluice_stores::postgres::business::tickets(&mut tx, alice_id, 100)
        .await
        .unwrap();
    assert_eq!(tickets.len(), 2, "one per key");
    tx.rollback().await.unwrap();
    let bob_tx_tickets = {
        let mut tx = sluice_stores::postgres::tenant_transaction(&app, bob_id)
            .await
            .unwrap();
        // Asked for Alice's, in Bob's transaction: row-level security shows none.
        sluice_stores::postgres::business::tickets(&mut tx, alice_id, 100)
            .await
            .unwrap()
    };
    assert!(bob_tx_tickets.is_empty());

    let key = unique("run-3:step-");
    // An operator's export (as the owner, whom row-level security does not bind) holds the
    // tenant's own business data only.
    seed(&prefix, &bob.name, "c-bob");
    let export: Value =
        serde_json::from_str(&run_cli(&prefix, &["tenant", "export", &alice.name])).unwrap();
    let customers: Vec<&str> = export["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(customers, ["c-1"]);
    assert_eq!(export["orders"].as_array().unwrap().len(), 2);
    assert_eq!(export["tickets"].as_array().unwrap().len(), 2);

    let cancelled = tools
        .call(
            alice_id,
            "update_order_status",
            &json!({"order_id": "A-2", "status": "cancelled"}),
            &key,
        )
        .await
        .unwrap();
    assert_eq!(cancelled["order"]["status"], "cancelled");

    // The caller's mistakes are refusals, not retried.
    for (tool, arguments, key) in [
        ("lookup_order", json!({}), unique("k")),
        ("lookup_order", json!({"order_id": 7}), unique("k")),
        (
            "update_order_status",
            json!({"order_id": "A-1", "status": "lost"}),
            unique("k"),
        ),
        (
            "create_ticket",
            json!({"subject": "x", "body": "y", "priority": "whenever"}),
            unique("k"),
        ),
        (
            "list_orders",
            json!({"customer_id": "c-1", "limit": 500}),
            unique("k"),
        ),
        ("no_such_tool", json!({}), unique("k")),
        // A key one tool used cannot be used by another.
        ("create_ticket", ticket.clone(), key),
    ] {
        let e = tools.call(alice_id, tool, &arguments, &key).await;
        assert!(
            matches!(e, Err(Failure::Permanent(_))),
            "{tool} {arguments}: {e:?}"
        );
    }
}
