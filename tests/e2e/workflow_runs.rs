//! Workflow runs through the whole stack: `model: "workflow/<name>"` → router → orchestrator
//! (`started`) → the workflow stage, one step per event on `workflow-events`, with each tool
//! call and result on `tool-calls`/`tool-results`, usage on `usage`, and the reply back to the
//! caller. Sagas undo in reverse; a run killed mid-saga finishes once after a restart.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::HeaderMap, response::IntoResponse, routing::post, Json, Router};
use rdkafka::Message;
use serde_json::{json, Value};
use sluice_schemas::{Codec, RegistryClient, ToolInvocation, ToolOutcome, WorkflowEvent};

use crate::harness::{
    chat, clickhouse, create_tenant, eventually, find_record, http, run_cli, topic_reader, unique,
    Sluice, Tenant,
};

/// What `track_order` answers for the order Z-9, which no tenant has.
pub const UNKNOWN_ORDER_REPLY: &str = "I could not find an order Z-9. Could you check the number?";

/// Loads a customer and its orders into `tenant` through `sluice tenant load`.
fn seed_orders(prefix: &str, tenant: &Tenant) {
    let data = json!({
        "customers": [{"id": "c-1", "name": "Ada Lovelace", "email": "ada@example.com"}],
        "orders": [
            {"id": "A-1", "customer_id": "c-1", "status": "shipped", "total_minor": 2999, "currency": "EUR",
             "items": [{"sku": "kettle", "quantity": 1, "unit_price_minor": 2999}], "tracking": "TRACK-A-1"},
            {"id": "A-2", "customer_id": "c-1", "status": "pending", "total_minor": 3700, "currency": "EUR",
             "items": [{"sku": "teapot", "quantity": 2, "unit_price_minor": 1850}]},
        ],
    });
    let file = std::env::temp_dir().join(format!("{}.json", unique("orders-")));
    std::fs::write(&file, data.to_string()).unwrap();
    let out = run_cli(
        prefix,
        &["tenant", "load", &tenant.name, file.to_str().unwrap()],
    );
    assert!(out.contains("loaded 1 customers and 2 orders"), "{out}");
    let _ = std::fs::remove_file(file);
}

/// Every record of `T` on `topic` for which `mine` holds, read until `done` says the list is
/// complete (at most `seconds`).
async fn records_until<T: sluice_schemas::Record>(
    sluice: &Sluice,
    topic: &str,
    seconds: u64,
    mine: impl Fn(&T) -> bool,
    done: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let reader = topic_reader(&sluice.topic(topic));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut found = Vec::new();
    while !done(&found) {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs();
        assert!(left > 0, "{topic}: only {} records in time", found.len());
        let bytes = find_record(&reader, left, |m| m.payload().map(<[u8]>::to_vec)).await;
        let record: T = codec.decode(&bytes).await.unwrap();
        if mine(&record) {
            found.push(record);
        }
    }
    found
}

/// The events of run `run` up to the one that ends it.
async fn run_events(sluice: &Sluice, run: &str) -> Vec<WorkflowEvent> {
    records_until(
        sluice,
        "workflow-events",
        60,
        |e: &WorkflowEvent| e.run_id == run,
        |found| found.iter().any(WorkflowEvent::ends_run),
    )
    .await
}

/// `(kind, step)` of each event the run followed: the first written for each sequence number
/// (a step run again after a crash may write its event twice; the run ignores the repeat).
fn path(events: &[WorkflowEvent]) -> Vec<(String, String)> {
    let mut seen = std::collections::BTreeSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e.seq))
        .map(|e| (e.kind.clone(), e.step.clone().unwrap_or_default()))
        .collect()
}

fn expected(path: &[(&str, &str)]) -> Vec<(String, String)> {
    path.iter()
        .map(|(k, s)| ((*k).to_owned(), (*s).to_owned()))
        .collect()
}

/// The usage rows of `request_id` in ClickHouse: `(event_id, model)`, once they number `n`.
async fn usage_rows(request_id: &str, n: usize) -> Vec<(String, String)> {
    eventually(60, "the run's usage rows", || {
        let request_id = request_id.to_owned();
        async move {
            let rows: Vec<(String, String)> = clickhouse()
                .query("SELECT event_id, model FROM usage_events WHERE request_id = ? ORDER BY event_id")
                .bind(&request_id)
                .fetch_all()
                .await
                .ok()?;
            (rows.len() >= n).then_some(rows)
        }
    })
    .await
}

#[tokio::test]
async fn a_workflow_runs_one_step_per_event_with_its_tool_calls_usage_and_reply_on_the_topics() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    seed_orders(&sluice.prefix, &tenant);

    let (status, body) = chat(
        &sluice,
        &tenant.key,
        json!({"model": "workflow/track_order", "inputs": {"order_id": "A-1"},
               "messages": [{"role": "user", "content": "Where is my kettle?"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "workflow/track_order");
    let run = body["id"].as_str().unwrap().to_owned();
    let reply = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!reply.is_empty());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let events = run_events(&sluice, &run).await;
    assert_eq!(
        path(&events),
        expected(&[
            ("started", ""),
            ("step_completed", "lookup"),
            ("branched", "found"),
            ("step_completed", "answer"),
            ("ended", "done"),
        ])
    );
    for (seq, event) in events.iter().enumerate() {
        assert_eq!(event.seq, seq as i32);
        assert_eq!(event.tenant_id, tenant.id);
        assert_eq!(event.version, 1);
    }
    // Each event carries the run's state after it; the last one holds every answer.
    let state: Value = serde_json::from_str(&events[4].state_json).unwrap();
    assert_eq!(state["answers"]["lookup"]["order"]["status"], "shipped");
    assert_eq!(state["answers"]["answer"]["text"], reply.as_str());
    assert_eq!(state["inputs"]["order_id"], "A-1");
    let ended: Value = serde_json::from_str(events[4].detail_json.as_deref().unwrap()).unwrap();
    assert_eq!(ended["reply"], reply.as_str());
    // The model step's prompt had the order's facts in it.
    assert_eq!(
        body["usage"]["completion_tokens"],
        state["answers"]["answer"]["output_tokens"]
    );

    // The tool call and its result are records, keyed by run, with the idempotency key.
    let calls = records_until(
        &sluice,
        "tool-calls",
        30,
        |c: &ToolInvocation| c.run_id == run,
        |found| !found.is_empty(),
    )
    .await;
    assert_eq!(calls[0].tool, "lookup_order");
    assert_eq!(calls[0].idempotency_key, format!("{run}:lookup"));
    let arguments: Value = serde_json::from_str(&calls[0].arguments_json).unwrap();
    assert_eq!(arguments, json!({"order_id": "A-1"}));
    let results = records_until(
        &sluice,
        "tool-results",
        30,
        |r: &ToolOutcome| r.run_id == run,
        |found| !found.is_empty(),
    )
    .await;
    assert_eq!(
        (results[0].outcome.as_str(), results[0].attempts),
        ("ok", 1)
    );
    assert!(results[0]
        .result_json
        .as_deref()
        .unwrap()
        .contains("TRACK-A-1"));

    // Usage: the tool call, the model call and the run, each once.
    let rows = usage_rows(&run, 3).await;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{run}:answer"),
            format!("{run}:lookup"),
            format!("{run}:run")
        ]
    );
    let models: BTreeMap<&str, &str> = rows
        .iter()
        .map(|(id, m)| (id.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        models[format!("{run}:lookup").as_str()],
        "tool:lookup_order"
    );
    assert_eq!(
        models[format!("{run}:run").as_str()],
        "workflow:track_order"
    );

    // Another way through the same definition: an order that is not there.
    let (status, body) = chat(
        &sluice,
        &tenant.key,
        json!({"model": "workflow/track_order", "inputs": {"order_id": "Z-9"},
               "messages": [{"role": "user", "content": "Where is it?"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        UNKNOWN_ORDER_REPLY
    );

    // The X-Sluice-Workflow header runs the workflow whatever `model` says (an SDK must send one).
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .header("X-Sluice-Workflow", "track_order")
        .json(&json!({"model": "gpt-4o", "inputs": {"order_id": "Z-9"},
                      "messages": [{"role": "user", "content": "Where is it?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "workflow/track_order");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        UNKNOWN_ORDER_REPLY
    );

    // Streamed, the reply comes as server-sent events like any chat reply.
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .json(
            &json!({"model": "workflow/track_order", "stream": true, "inputs": {"order_id": "Z-9"},
                      "messages": [{"role": "user", "content": "Where is it?"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("I could not find an order Z-9."), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test]
async fn a_workflow_request_that_cannot_run_gets_a_clear_4xx() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let other = create_tenant(&sluice.prefix);
    let ask = |model: &str, inputs: Value| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        if !inputs.is_null() {
            body["inputs"] = inputs;
        }
        body
    };
    // Each refusal: (model, inputs) → status, the error's param, words its message holds.
    let refusals = [
        (
            "workflow/track_order",
            Value::Null,
            400,
            "inputs.order_id",
            "Workflow track_order needs the input `order_id`.",
        ),
        (
            "workflow/track_order",
            json!({"order_id": 17}),
            400,
            "inputs.order_id",
            "must be of type string",
        ),
        (
            "workflow/track_order",
            json!({"order": "A-1"}),
            400,
            "inputs.order",
            "takes no input `order`",
        ),
        (
            "sim-small",
            json!({"order_id": "A-1"}),
            400,
            "inputs",
            "`inputs` is for workflow runs",
        ),
        (
            "workflow/no_such_flow",
            Value::Null,
            404,
            "model",
            "does not exist",
        ),
    ];
    for (model, inputs, want_status, param, says) in refusals {
        let (status, body) = chat(&sluice, &tenant.key, ask(model, inputs)).await;
        let error = &body["error"];
        assert_eq!(status, want_status, "{body}");
        assert!(error["message"].as_str().unwrap().contains(says), "{body}");
        if param != "model" && param.starts_with("inputs.") {
            // The run's own checks come back as an error chunk: the message names the input.
            assert!(error["message"]
                .as_str()
                .unwrap()
                .contains(&param["inputs.".len()..]));
        } else {
            assert_eq!(error["param"].as_str(), Some(param), "{body}");
        }
    }

    // `workflow/auto` leaves the choice to the registry: the tenant's triage workflow.
    let (status, body) = chat(&sluice, &tenant.key, ask("workflow/auto", Value::Null)).await;
    assert_eq!(status, 200, "{body}");
    let events = run_events(&sluice, body["id"].as_str().unwrap()).await;
    assert_eq!(events[0].workflow, "customer_support");

    // A tenant's own workflow is its own: another tenant gets model_not_found.
    let folder = std::env::temp_dir().join(unique("own-flow-"));
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("greet.yaml");
    std::fs::write(
        &file,
        "name: greet\nversion: 1\ndescription: Greets.\nsteps:\n  - id: hello\n    end:\n      reply: Hello from ${tenant.id}\n",
    )
    .unwrap();
    run_cli(
        &sluice.prefix,
        &[
            "workflow",
            "publish",
            file.to_str().unwrap(),
            "--tenant",
            &tenant.name,
        ],
    );
    let (status, body) = chat(&sluice, &tenant.key, ask("workflow/greet", Value::Null)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        format!("Hello from {}", tenant.id)
    );
    let (status, body) = chat(&sluice, &other.key, ask("workflow/greet", Value::Null)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{body}"
    );

    // Turned off for the tenant, it is not there.
    run_cli(
        &sluice.prefix,
        &["workflow", "disable", "greet", "--tenant", &tenant.name],
    );
    let (status, _) = chat(&sluice, &tenant.key, ask("workflow/greet", Value::Null)).await;
    assert_eq!(status, 404);
    let _ = std::fs::remove_dir_all(folder);
}

/// What the shop's endpoints do next.
#[derive(Default)]
struct ShopScript {
    /// Refuse the next charge (402).
    decline_charge: bool,
    /// Hold each charge this long before answering.
    charge_delay_ms: u64,
    /// Answer every stock check with 503 (an outage).
    stock_down: bool,
    /// Every request: (path, idempotency key, body).
    seen: Vec<(String, String, Value)>,
}

/// A local shop: stock reservations and payments, the tenant's own HTTP tools of the
/// `create_order` saga. Each write is done once per idempotency key (a repeat answers the same).
#[derive(Clone)]
struct Shop {
    url: String,
    script: Arc<Mutex<ShopScript>>,
}

impl Shop {
    async fn start() -> Self {
        let script = Arc::new(Mutex::new(ShopScript::default()));
        let app = Router::new()
            .route("/{action}", post(shop_answer))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, script }
    }

    /// The distinct idempotency keys each action was called with.
    fn effects(&self) -> BTreeMap<String, Vec<String>> {
        let mut effects: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, key, _) in &self.script.lock().unwrap().seen {
            let keys = effects.entry(path.clone()).or_default();
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        effects
    }

    fn calls(&self, action: &str) -> Vec<Value> {
        let script = self.script.lock().unwrap();
        script
            .seen
            .iter()
            .filter(|(p, _, _)| p == action)
            .map(|(_, _, b)| b.clone())
            .collect()
    }

    /// Adds the tenant tools the shipped workflows call (the saga's four, the lead's two) to
    /// `tenant`, pointing here.
    fn register(&self, prefix: &str, tenant: &Tenant) {
        for (tool, action) in [
            ("reserve_stock", "reserve"),
            ("release_stock", "release"),
            ("charge_payment", "charge"),
            ("refund_payment", "refund"),
            ("store_lead", "lead"),
            ("notify_sales", "notify"),
        ] {
            let url = format!("{}/{action}", self.url);
            let out = run_cli(
                prefix,
                &["tool", "add", tool, "--tenant", &tenant.name, "--url", &url],
            );
            assert!(out.contains(&format!("added tool {tool}")), "{out}");
        }
    }
}

async fn shop_answer(
    State(script): State<Arc<Mutex<ShopScript>>>,
    axum::extract::Path(action): axum::extract::Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> axum::response::Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (decline, delay, down) = {
        let mut script = script.lock().unwrap();
        script.seen.push((action.clone(), key.clone(), body));
        let decline = action == "charge" && std::mem::take(&mut script.decline_charge);
        let delay = if action == "charge" {
            script.charge_delay_ms
        } else {
            0
        };
        (decline, delay, action == "stock" && script.stock_down)
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if decline {
        return (axum::http::StatusCode::PAYMENT_REQUIRED, "card declined").into_response();
    }
    if down {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "stock service down",
        )
            .into_response();
    }
    Json(match action.as_str() {
        "reserve" => json!({"reservation_id": format!("res-{key}")}),
        "charge" => json!({"charge_id": format!("ch-{key}")}),
        "lead" => json!({"lead_id": format!("lead-{key}")}),
        "stock" => json!({"in_stock": true}),
        _ => json!({"ok": true}),
    })
    .into_response()
}

/// The status of `order` of `tenant`, through the built-in lookup.
async fn order_status(tenant: &Tenant, order: &str) -> String {
    let app = sqlx::PgPool::connect(&crate::harness::app_database_url())
        .await
        .unwrap();
    let tools = sluice_orchestrator::tools::BuiltinTools::new(app);
    let found = tools
        .call(
            tenant.uuid(),
            "lookup_order",
            &json!({"order_id": order}),
            "look",
        )
        .await
        .unwrap();
    found["order"]["status"].as_str().unwrap().to_owned()
}

fn private_tools() -> Vec<(String, String)> {
    vec![(
        "SLUICE_ORCHESTRATOR__TOOLS__PRIVATE_NETWORK".to_owned(),
        "true".to_owned(),
    )]
}

#[tokio::test]
async fn a_saga_places_the_order_or_undoes_its_steps_in_reverse_when_one_fails() {
    let sluice = Sluice::start_with(&unique("t"), private_tools());
    let tenant = create_tenant(&sluice.prefix);
    seed_orders(&sluice.prefix, &tenant);
    let shop = Shop::start().await;
    shop.register(&sluice.prefix, &tenant);
    // Tool calls and runs are priced per unit from now on (these items are used by no other test's invoices).
    run_cli(
        &sluice.prefix,
        &["price", "set", "tool:reserve_stock", "--per-unit", "0.05"],
    );
    run_cli(
        &sluice.prefix,
        &[
            "price",
            "set",
            "workflow:create_order",
            "--per-unit",
            "0.25",
        ],
    );
    let place = json!({"model": "workflow/create_order",
                       "inputs": {"order_id": "A-2", "payment_method": "pm_card"},
                       "messages": [{"role": "user", "content": "Place my order"}]});

    // The charge is declined: the reservation is released, the order cancelled.
    shop.script.lock().unwrap().decline_charge = true;
    let (status, body) = chat(&sluice, &tenant.key, place.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "We could not place order A-2; nothing was charged."
    );
    let run = body["id"].as_str().unwrap().to_owned();
    let events = run_events(&sluice, &run).await;
    assert_eq!(
        path(&events),
        expected(&[
            ("started", ""),
            ("step_completed", "order"),
            ("branched", "exists"),
            ("step_completed", "reserve"),
            ("step_failed", "charge"),
            ("compensated", "charge"),
            ("step_completed", "cancel"),
            ("ended", "failed"),
        ])
    );
    let undone: Value = serde_json::from_str(events[5].detail_json.as_deref().unwrap()).unwrap();
    assert_eq!(undone["all_undone"], true, "{undone}");
    assert_eq!(undone["compensated"][0]["step"], "reserve");
    let release = shop.calls("release");
    assert_eq!(
        release,
        [json!({"reservation_id": format!("res-{run}:reserve")})]
    );
    assert_eq!(shop.effects()["release"], [format!("{run}:reserve:undo")]);
    let charge = shop.calls("charge");
    assert_eq!(
        charge[0],
        json!({"order_id": "A-2", "amount_minor": 3700, "currency": "EUR", "payment_method": "pm_card"})
    );
    assert_eq!(order_status(&tenant, "A-2").await, "cancelled");

    // The order again, as a new order: this time it is placed and paid.
    let mut again = place.clone();
    again["inputs"]["order_id"] = json!("A-1");
    let (status, body) = chat(&sluice, &tenant.key, again).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Your order A-1 is placed and paid."
    );
    assert_eq!(order_status(&tenant, "A-1").await, "paid");
    assert_eq!(shop.calls("refund").len(), 0);

    // Both runs and both reservations are on the month's invoice, each at its price per unit.
    let preview = eventually(60, "the runs on the invoice preview", || {
        let prefix = sluice.prefix.clone();
        let name = tenant.name.clone();
        async move {
            let preview: Value =
                serde_json::from_str(&run_cli(&prefix, &["invoices", "preview", &name, "--json"]))
                    .ok()?;
            let runs = preview["lines"]
                .as_array()?
                .iter()
                .find(|l| l["model"] == "workflow:create_order")?;
            (runs["requests"] == 2).then_some(preview)
        }
    })
    .await;
    let line = |model: &str| {
        preview["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["model"] == model)
            .unwrap_or_else(|| panic!("no {model} line in {preview}"))
            .clone()
    };
    let reserve = line("tool:reserve_stock");
    assert_eq!(
        (&reserve["requests"], &reserve["amount"]),
        (&json!(2), &json!("0.10")),
        "{reserve}"
    );
    let runs = line("workflow:create_order");
    assert_eq!(runs["amount"], "0.50", "{runs}");
    assert!(
        runs["description"]
            .as_str()
            .unwrap()
            .starts_with("workflow:create_order: 2 runs at 0.25 USD each"),
        "{runs}"
    );
}

#[tokio::test]
async fn a_run_killed_mid_saga_finishes_once_after_a_restart() {
    let mut sluice = Sluice::start_with(&unique("t"), private_tools());
    let tenant = create_tenant(&sluice.prefix);
    seed_orders(&sluice.prefix, &tenant);
    let shop = Shop::start().await;
    shop.register(&sluice.prefix, &tenant);
    shop.script.lock().unwrap().charge_delay_ms = 4_000;

    let body = json!({"model": "workflow/create_order",
                      "inputs": {"order_id": "A-2", "payment_method": "pm_card"},
                      "messages": [{"role": "user", "content": "Place my order"}]});
    let request = {
        let url = sluice.v1("/chat/completions");
        let key = tenant.key.clone();
        tokio::spawn(async move { http().post(url).bearer_auth(key).json(&body).send().await })
    };
    // Killed while the charge is in flight: the reservation is done, the charge is not.
    eventually(60, "the charge to be in flight", || {
        let shop = shop.clone();
        async move { (!shop.calls("charge").is_empty()).then_some(()) }
    })
    .await;
    let killed_at = Instant::now();
    sluice.kill();
    let _ = request.await;
    shop.script.lock().unwrap().charge_delay_ms = 0;
    sluice.restart_after_crash(killed_at).await;

    // The run goes on from its last event and ends once.
    let events = records_until(
        &sluice,
        "workflow-events",
        90,
        |e: &WorkflowEvent| e.tenant_id == tenant.id,
        |found| found.iter().any(WorkflowEvent::ends_run),
    )
    .await;
    let run = events[0].run_id.clone();
    assert_eq!(
        path(&events),
        expected(&[
            ("started", ""),
            ("step_completed", "order"),
            ("branched", "exists"),
            ("step_completed", "reserve"),
            ("step_completed", "charge"),
            ("step_completed", "confirm"),
            ("ended", "placed"),
        ])
    );
    // No step's side effect twice: one key per write, whatever the attempts.
    let effects = shop.effects();
    assert_eq!(effects["reserve"], [format!("{run}:reserve")]);
    assert_eq!(effects["charge"], [format!("{run}:charge")]);
    assert!(!effects.contains_key("release") && !effects.contains_key("refund"));
    assert_eq!(order_status(&tenant, "A-2").await, "paid");
    // Billed once each: four tool calls and the run.
    let rows = usage_rows(&run, 5).await;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{run}:charge"),
            format!("{run}:confirm"),
            format!("{run}:order"),
            format!("{run}:reserve"),
            format!("{run}:run"),
        ]
    );
}

/// One line per event a run followed: `seq kind step -> next`.
fn transcript(events: &[WorkflowEvent]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e.seq))
        .map(|e| {
            format!(
                "{} {} {} -> {}\n",
                e.seq,
                e.kind,
                e.step.as_deref().unwrap_or("-"),
                e.next_step.as_deref().unwrap_or("end")
            )
        })
        .collect()
}

/// Each shipped workflow's reference run on the simulated model and the real stores follows the
/// event sequence in `workflows/golden/<name>.events`. `SLUICE_BLESS_GOLDEN=1` writes the files
/// from this run instead (then read the difference before committing it).
#[tokio::test]
async fn every_shipped_workflow_follows_its_golden_event_sequence() {
    let sluice = Sluice::start_with(&unique("t"), private_tools());
    let tenant = create_tenant(&sluice.prefix);
    seed_orders(&sluice.prefix, &tenant);
    let shop = Shop::start().await;
    shop.register(&sluice.prefix, &tenant);
    crate::knowledge::store_document(
        &sluice,
        &tenant.key,
        "descaling",
        json!({"title": "Descaling your kettle", "format": "markdown",
               "content": "# Descaling\n\nFill the kettle with water and citric acid, boil, and rinse twice."}),
    )
    .await;
    let runs = [
        (
            "track_order",
            json!({"order_id": "A-1"}),
            "Where is my kettle?",
        ),
        (
            "create_order",
            json!({"order_id": "A-2", "payment_method": "pm_card"}),
            "Place my order",
        ),
        (
            "order_management",
            json!({"order_id": "A-2", "action": "cancel"}),
            "Cancel it, please",
        ),
        ("customer_support", json!({}), "How do I descale my kettle?"),
        ("faq", json!({}), "How do I descale my kettle?"),
        (
            "complaint_handling",
            json!({"customer_id": "c-1"}),
            "The kettle arrived broken.",
        ),
        (
            "technical_support",
            json!({}),
            "The kettle does not switch on.",
        ),
        (
            "lead_capture",
            json!({}),
            "I am Grace from Navy Labs, grace@navy.example; we want 500 kettles.",
        ),
    ];
    let bless = std::env::var("SLUICE_BLESS_GOLDEN").is_ok_and(|v| v == "1");
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/golden");
    let mut shipped: Vec<String> = sluice_orchestrator::workflow::SHIPPED
        .iter()
        .map(|(file, _)| {
            file.trim_start_matches("workflows/")
                .trim_end_matches(".yaml")
                .to_owned()
        })
        .collect();
    shipped.sort();
    let mut covered: Vec<String> = runs.iter().map(|(name, _, _)| (*name).to_owned()).collect();
    covered.sort();
    assert_eq!(
        covered, shipped,
        "every shipped workflow has a reference run"
    );
    for (name, inputs, message) in runs {
        let (status, body) = chat(
            &sluice,
            &tenant.key,
            json!({"model": format!("workflow/{name}"), "inputs": inputs,
                   "messages": [{"role": "user", "content": message}]}),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        let run = body["id"].as_str().unwrap().to_owned();
        let got = transcript(&run_events(&sluice, &run).await);
        let file = folder.join(format!("{name}.events"));
        if bless {
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(&file, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!("{}: {e} (SLUICE_BLESS_GOLDEN=1 writes it)", file.display())
        });
        assert_eq!(
            got,
            want,
            "{name}'s run left its golden sequence ({})",
            file.display()
        );
    }
}

/// Publishes a tenant's own workflow that waits for `approved` at most `timeout_s` seconds.
fn publish_approval(prefix: &str, tenant: &Tenant, name: &str, timeout_s: u64) {
    let folder = std::env::temp_dir().join(unique("approval-"));
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "name: {name}\nversion: 1\ndescription: Waits for a manager's approval.\ninputs:\n  amount:\n    type: integer\n\
             steps:\n  - id: approve\n    wait:\n      event: approved\n      timeout_s: {timeout_s}\n    on_timeout: expired\n\
             \x20 - id: done\n    end:\n      reply: Approved by ${{steps.approve.by}} for ${{inputs.amount}}.\n\
             \x20 - id: expired\n    end:\n      reply: No approval came in time.\n"
        ),
    )
    .unwrap();
    let out = run_cli(
        prefix,
        &[
            "workflow",
            "publish",
            file.to_str().unwrap(),
            "--tenant",
            &tenant.name,
        ],
    );
    assert!(out.contains(&format!("published {name} v1")), "{out}");
    let _ = std::fs::remove_dir_all(folder);
}

/// The run's status once `done` accepts it (at most 30 s).
async fn run_status(sluice: &Sluice, key: &str, run: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually(30, "the run's status", || {
        let url = sluice.v1(&format!("/workflows/runs/{run}"));
        let key = key.to_owned();
        let done = &done;
        async move {
            let (status, body) = crate::harness::get_json(&url, &key).await;
            (status == 200 && done(&body)).then_some(body)
        }
    })
    .await
}

async fn signal(sluice: &Sluice, key: &str, run: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(sluice.v1(&format!("/workflows/runs/{run}/events")))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_waiting_run_goes_on_when_its_event_comes_or_when_its_timeout_passes() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let other = create_tenant(&sluice.prefix);
    publish_approval(&sluice.prefix, &tenant, "approval", 300);
    publish_approval(&sluice.prefix, &tenant, "approval_quick", 1);
    let start = |name: &str| {
        json!({"model": format!("workflow/{name}"), "inputs": {"amount": 50},
               "messages": [{"role": "user", "content": "Please approve."}]})
    };

    // The caller hears at once that the run waits, and where its outcome will be.
    let (status, body) = chat(&sluice, &tenant.key, start("approval")).await;
    assert_eq!(status, 200, "{body}");
    let run = body["id"].as_str().unwrap().to_owned();
    let reply = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(reply.contains("waiting for the event approved"), "{reply}");
    assert!(
        reply.contains(&format!("/v1/workflows/runs/{run}")),
        "{reply}"
    );
    let waiting = run_status(&sluice, &tenant.key, &run, |b| b["status"] == "waiting").await;
    assert_eq!(waiting["waiting_event"], "approved");

    // Another tenant cannot see or signal it; another event is not the one it waits for.
    let (status, _) =
        crate::harness::get_json(&sluice.v1(&format!("/workflows/runs/{run}")), &other.key).await;
    assert_eq!(status, 404);
    let (status, _) = signal(&sluice, &other.key, &run, json!({"event": "approved"})).await;
    assert_eq!(status, 404);
    let (status, body) = signal(&sluice, &tenant.key, &run, json!({"event": "rejected"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("run_not_waiting")),
        "{body}"
    );

    // The event comes: the run goes on with its data, and ends.
    let (status, body) = signal(
        &sluice,
        &tenant.key,
        &run,
        json!({"event": "approved", "data": {"by": "Ada"}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ended = run_status(&sluice, &tenant.key, &run, |b| b["status"] == "ended").await;
    assert_eq!(ended["reply"], "Approved by Ada for 50.");
    let (status, _) = signal(&sluice, &tenant.key, &run, json!({"event": "approved"})).await;
    assert_eq!(status, 409, "a run resumes once");
    let events = run_events(&sluice, &run).await;
    assert_eq!(
        path(&events),
        expected(&[
            ("started", ""),
            ("waiting", "approve"),
            ("event_received", "approve"),
            ("ended", "done"),
        ])
    );

    // Nobody answers: after its timeout the run takes its on_timeout way.
    let (status, body) = chat(&sluice, &tenant.key, start("approval_quick")).await;
    assert_eq!(status, 200, "{body}");
    let run = body["id"].as_str().unwrap().to_owned();
    let ended = run_status(&sluice, &tenant.key, &run, |b| b["status"] == "ended").await;
    assert_eq!(ended["reply"], "No approval came in time.");
    let events = run_events(&sluice, &run).await;
    assert_eq!(
        path(&events),
        expected(&[
            ("started", ""),
            ("waiting", "approve"),
            ("timed_out", "approve"),
            ("ended", "expired"),
        ])
    );
}

#[tokio::test]
async fn a_tool_outage_opens_its_breaker_for_the_tenant_and_a_probe_closes_it_again() {
    let guard = [
        ("MAX_ATTEMPTS", "1"),
        ("BREAKER_FAILURES", "2"),
        ("BREAKER_OPEN_MS", "1500"),
        ("TIMEOUT_MS", "2000"),
    ];
    let mut env = private_tools();
    env.extend(guard.iter().map(|(k, v)| {
        (
            format!("SLUICE_ORCHESTRATOR__TOOLS__RESILIENCE__{k}"),
            (*v).to_owned(),
        )
    }));
    let sluice = Sluice::start_with(&unique("t"), env);
    let tenant = create_tenant(&sluice.prefix);
    let shop = Shop::start().await;
    let url = format!("{}/stock", shop.url);
    run_cli(
        &sluice.prefix,
        &[
            "tool",
            "add",
            "check_stock",
            "--tenant",
            &tenant.name,
            "--url",
            &url,
        ],
    );
    let folder = std::env::temp_dir().join(unique("stock-"));
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("stock.yaml");
    std::fs::write(
        &file,
        "name: stock\nversion: 1\ndescription: Checks the stock.\ntools: [check_stock]\nsteps:\n\
         \x20 - id: check\n    tool: check_stock\n    arguments:\n      sku: kettle\n    on_error: down\n\
         \x20 - id: known\n    end:\n      reply: In stock.\n\
         \x20 - id: down\n    end:\n      reply: The stock service is down.\n",
    )
    .unwrap();
    run_cli(
        &sluice.prefix,
        &[
            "workflow",
            "publish",
            file.to_str().unwrap(),
            "--tenant",
            &tenant.name,
        ],
    );
    let _ = std::fs::remove_dir_all(folder);
    let ask = || async {
        let body = json!({"model": "workflow/stock", "messages": [{"role": "user", "content": "Any kettles?"}]});
        let (status, body) = chat(&sluice, &tenant.key, body).await;
        assert_eq!(status, 200, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    let outcome = |run: String| {
        let sluice = &sluice;
        async move {
            let found = records_until(
                sluice,
                "tool-results",
                30,
                |r: &ToolOutcome| r.run_id == run,
                |found| !found.is_empty(),
            )
            .await;
            found[0].outcome.clone()
        }
    };

    // Down: two calls fail and open the breaker; the third is turned away without a call.
    shop.script.lock().unwrap().stock_down = true;
    for _ in 0..2 {
        let (run, reply) = ask().await;
        assert_eq!(reply, "The stock service is down.");
        assert_eq!(outcome(run).await, "exhausted");
    }
    let calls = shop.calls("stock").len();
    let (run, reply) = ask().await;
    assert_eq!(reply, "The stock service is down.");
    assert_eq!(outcome(run).await, "breaker_open");
    assert_eq!(
        shop.calls("stock").len(),
        calls,
        "an open breaker makes no call"
    );

    // Up again: once the breaker's time is over, a probe goes through and closes it.
    shop.script.lock().unwrap().stock_down = false;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for _ in 0..2 {
        let (run, reply) = ask().await;
        assert_eq!(reply, "In stock.");
        assert_eq!(outcome(run).await, "ok");
    }
    assert_eq!(shop.calls("stock").len(), calls + 2);
}
