//! Chat through the whole pipeline: plain, streamed (SSE), through the official OpenAI Python
//! SDK, and through the `openai` provider to an OpenAI-compatible
//! upstream.

use rdkafka::Message;
use serde_json::{json, Value};
use sluice_schemas::{Codec, RegistryClient, RoutedRequest};

use crate::harness::*;

#[tokio::test]
async fn plain_completion_is_routed_answered_and_metered() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let (status, body) = chat(
        &sluice,
        &tenant.key,
        json!({"model": "auto", "messages": [{"role": "user", "content": "Hello, Sluice"}], "max_tokens": 50}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-"));
    assert_eq!(
        body["model"], "sim-small",
        "auto picks the cheapest model that fits"
    );
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_i64().unwrap(),
        usage["completion_tokens"].as_i64().unwrap(),
    );
    assert_eq!(
        prompt,
        3 + 4,
        "`Hello`, `,`, `Sluice` and 4 for the message framing"
    );
    assert_eq!(
        completion,
        sluice_schemas::tokens::count(content) as i64,
        "honest count"
    );
    assert_eq!(usage["total_tokens"].as_i64().unwrap(), prompt + completion);

    // The routing decision is on the routed topic.
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let reader = topic_reader(&sluice.topic("routed"));
    let mut decoded = Vec::new();
    while decoded.is_empty() {
        let message = find_record(&reader, 20, |m| m.payload().map(<[u8]>::to_vec)).await;
        let routed: RoutedRequest = codec.decode(&message).await.unwrap();
        if routed.request.request_id == id {
            decoded.push(routed);
        }
    }
    let routed = &decoded[0];
    assert_eq!(routed.decision.model, "sim-small");
    assert_eq!(routed.decision.provider, "sim");
    assert!(
        routed.decision.reason.starts_with("auto"),
        "{}",
        routed.decision.reason
    );
    assert_eq!(routed.request.tenant_id, tenant.id);

    // Exactly one usage row, and /v1/usage reports it.
    let event_id = format!("{id}:0");
    let rows = eventually(30, "the usage row", || {
        let event_id = event_id.clone();
        async move {
            let n: u64 = clickhouse()
                .query("SELECT count() FROM usage_events FINAL WHERE event_id = ?")
                .bind(event_id.as_str())
                .fetch_one()
                .await
                .ok()?;
            (n > 0).then_some(n)
        }
    })
    .await;
    assert_eq!(rows, 1);
    let (status, usage) = get_json(&sluice.v1("/usage"), &tenant.key).await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["totals"]["requests"], 1);
    assert_eq!(usage["totals"]["input_tokens"].as_i64(), Some(prompt));
    assert_eq!(usage["totals"]["output_tokens"].as_i64(), Some(completion));
    assert_eq!(usage["data"][0]["model"], "sim-small");

    // Each stage's consumer lag is on /metrics, per group/topic/partition, and drains to 0.
    let group = format!("{}.router", sluice.prefix);
    let requests = sluice.topic("requests");
    eventually(30, "router lag on /metrics", || {
        let (url, group, requests) = (
            format!("{}/metrics", sluice.url),
            group.clone(),
            requests.clone(),
        );
        async move {
            let text = http().get(url).send().await.ok()?.text().await.ok()?;
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("sluice_consumer_lag{")
                        && l.contains(&format!("group=\"{group}\""))
                        && l.contains(&format!("topic=\"{requests}\""))
                })
                .collect();
            (!lines.is_empty() && lines.iter().all(|l| l.ends_with(" 0"))).then_some(())
        }
    })
    .await;
}

/// Parses an SSE body into its `data` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streamed_completion_ends_with_a_usage_chunk() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .json(&json!({
            "model": "sim-large", "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 6, "messages": [{"role": "user", "content": "Stream please"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "length", "max_tokens=6 cuts the reply");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    assert_eq!(sluice_schemas::tokens::count(&text), 6);
    assert!(chunks
        .iter()
        .all(|c| c["model"] == "sim-large" && c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let script = r#"
from openai import OpenAI
client = OpenAI()
r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
print(r.choices[0].message.content)
print(r.usage.completion_tokens)
parts = []
usage = None
for chunk in client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.completion_tokens
print("".join(parts))
print(usage)
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
except Exception as e:
    print(type(e).__name__, getattr(e, "status_code", None))
"#;
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("OPENAI_BASE_URL", sluice.v1(""))
        .env("OPENAI_API_KEY", &tenant.key)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(!lines[0].is_empty());
    assert_eq!(lines[1], "5");
    assert!(!lines[2].is_empty());
    assert_eq!(lines[3], "4");
    assert_eq!(lines[4], "NotFoundError 404");
}

/// Runs `script` with the official OpenAI Python SDK pointed at `sluice` as `key`; its output.
fn python_sdk(sluice: &Sluice, key: &str, script: &str) -> String {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("OPENAI_BASE_URL", sluice.v1(""))
        .env("OPENAI_API_KEY", key)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn function_calling_works_through_the_official_python_sdk() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    // An agent's loop: the model calls a tool (whole, then streamed), the caller runs it and
    // sends the result, the model answers in text. Then JSON mode, and what Sluice refuses.
    let script = r##"
import json
from openai import OpenAI, BadRequestError
client = OpenAI()
tools = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
messages = [{"role": "user", "content": "Where is order A-17? Please lookup order."}]
r = client.chat.completions.create(model="sim-small", messages=messages, tools=tools, tool_choice="required")
call = r.choices[0].message.tool_calls[0]
print(r.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments)["order_id"], r.usage.completion_tokens)
calls = {}
finish = None
for chunk in client.chat.completions.create(model="sim-small", messages=messages, tools=tools, stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        for piece in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id: entry["id"] = piece.id
            if piece.function and piece.function.name: entry["name"] = piece.function.name
            if piece.function and piece.function.arguments: entry["arguments"] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
print(finish, calls[0]["id"] == call.id, calls[0]["name"], calls[0]["arguments"] == call.function.arguments)
messages.append(r.choices[0].message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "shipped"})})
r = client.chat.completions.create(model="sim-small", messages=messages, tools=tools)
print(r.choices[0].finish_reason, bool(r.choices[0].message.content), r.choices[0].message.tool_calls)
r = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "json please"}], response_format={"type": "json_object"})
print(sorted(json.loads(r.choices[0].message.content)))
import jsonschema
schema = {"type": "object", "$defs": {"when": {"type": "string", "format": "date"}}, "additionalProperties": False,
    "required": ["day", "code", "qty", "tags", "unit"],
    "properties": {"day": {"$ref": "#/$defs/when"}, "code": {"type": "string", "maxLength": 3},
        "qty": {"type": "integer", "exclusiveMinimum": 4, "maximum": 9}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "unit": {"enum": ["kg", "lb"]}, "note": {"type": ["string", "null"], "minLength": 40}}}
booking = [{"type": "function", "function": {"name": "book", "parameters": schema}}]
r = client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "book it"}], tools=booking)
jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), schema, format_checker=jsonschema.FormatChecker())
print("valid")
for bad in [dict(tools=[{"type": "code_interpreter"}]), dict(logprobs=True), dict(tool_choice="auto")]:
    try:
        client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "x"}], **bad)
        print("accepted")
    except BadRequestError as e:
        print(e.status_code, e.body["param"])
"##;
    let stdout = python_sdk(&sluice, &tenant.key, script);
    let lines: Vec<&str> = stdout.lines().collect();
    let said = "Where is order A-17? Please lookup order.";
    let arguments = serde_json::json!({"order_id": said}).to_string();
    let billed =
        sluice_schemas::tokens::count("lookup_order") + sluice_schemas::tokens::count(&arguments);
    assert_eq!(lines[0], format!("tool_calls lookup_order {said} {billed}"));
    assert_eq!(
        lines[1], "tool_calls True lookup_order True",
        "streamed, the same call"
    );
    assert_eq!(lines[2], "stop True None", "after the tool's result, text");
    assert_eq!(lines[3], "['reply']");
    assert_eq!(
        lines[4], "valid",
        "the arguments validate against the tool's schema"
    );
    assert_eq!(lines[5], "400 tools[0].type");
    assert_eq!(lines[6], "400 logprobs");
    assert_eq!(lines[7], "400 tool_choice");
}

#[tokio::test]
async fn the_openai_provider_streams_from_an_openai_compatible_upstream() {
    // The upstream is a second, independent Sluice: a real OpenAI-compatible server on loopback.
    let upstream = Sluice::start();
    let upstream_tenant = create_tenant(&upstream.prefix);

    let prefix = unique("t");
    let key_var = format!("RELAY_KEY_{}", prefix.to_uppercase());
    let add_model = |upstream_model: &str, key_env: &str| {
        let name = unique("relay-");
        run_cli(
            &prefix,
            &[
                "model",
                "add",
                &name,
                "--provider",
                "openai",
                "--upstream-model",
                upstream_model,
                "--base-url",
                &upstream.v1(""),
                "--api-key-env",
                key_env,
                "--context-window",
                "8192",
                // Priced so that `auto` in other tests never picks it.
                "--input-price-micros",
                "999000000",
                "--output-price-micros",
                "999000000",
            ],
        );
        name
    };
    let model = add_model("sim-small", &key_var);
    // Error paths: the upstream does not know the model; the key's variable is not set here.
    let unknown_upstream = add_model("no-such-model", &key_var);
    let unconfigured = add_model("sim-small", "SLUICE_TEST_UNSET_KEY");
    let sluice = Sluice::start_with(&prefix, vec![(key_var, upstream_tenant.key.clone())]);
    let tenant = create_tenant(&sluice.prefix);
    let request = json!({"model": model, "max_tokens": 7, "messages": [{"role": "user", "content": "relay this"}]});
    let (status, relayed) = chat(&sluice, &tenant.key, request.clone()).await;
    assert_eq!(status, 200, "{relayed}");
    let (_, direct) = chat(&upstream, &upstream_tenant.key, json!({"model": "sim-small", "max_tokens": 7, "messages": [{"role": "user", "content": "relay this"}]})).await;
    assert_eq!(
        relayed["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    assert_eq!(relayed["model"], model.as_str());
    assert_eq!(
        relayed["usage"], direct["usage"],
        "billed by the upstream's own counts"
    );

    // Function calling passes through: the tools, the choice and the conversation go upstream,
    // the calls come back (streamed from the upstream, whole to this caller).
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}]);
    let ask_tools = |model: &str| {
        json!({"model": model, "tools": tools, "parallel_tool_calls": false,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "weather?"}]})
    };
    let (status, relayed) = chat(&sluice, &tenant.key, ask_tools(&model)).await;
    assert_eq!(status, 200, "{relayed}");
    let (_, direct) = chat(&upstream, &upstream_tenant.key, ask_tools("sim-small")).await;
    assert_eq!(relayed["choices"][0]["finish_reason"], "tool_calls");
    let call = &relayed["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], r#"{"unit":"celsius"}"#);
    assert_eq!(
        relayed["choices"][0]["message"], direct["choices"][0]["message"],
        "the upstream's calls, ids and all"
    );
    assert_eq!(relayed["usage"], direct["usage"]);
    // The follow-up with the tool's result reaches the upstream, which answers in text.
    let follow_up = |model: &str| {
        let mut body = ask_tools(model);
        body["tool_choice"] = json!("auto");
        body["messages"] = json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]);
        body
    };
    let (status, relayed) = chat(&sluice, &tenant.key, follow_up(&model)).await;
    assert_eq!(status, 200, "{relayed}");
    let (_, direct) = chat(&upstream, &upstream_tenant.key, follow_up("sim-small")).await;
    assert_eq!(relayed["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        relayed["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );

    let ask = |model: &str| json!({"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]});
    let (status, body) = chat(&sluice, &tenant.key, ask(&unknown_upstream)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("upstream_rejected")),
        "{body}"
    );
    let (status, body) = chat(&sluice, &tenant.key, ask(&unconfigured)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("upstream_not_configured")),
        "{body}"
    );
    for name in [&model, &unknown_upstream, &unconfigured] {
        run_cli(&prefix, &["model", "remove", name]);
    }
}

#[tokio::test]
async fn two_edge_instances_each_get_their_own_replies() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let (_second, second_url) = sluice.spawn_edge(&[]);
    ready_within(&second_url).await;

    let mut calls = Vec::new();
    for i in 0..12 {
        let base = if i % 2 == 0 {
            sluice.url.clone()
        } else {
            second_url.clone()
        };
        let key = tenant.key.clone();
        calls.push(tokio::spawn(async move {
            let response = http()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": format!("edge call {i}")}]}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }));
    }
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4);
    }
    // Each instance read only its own partition: no reply reached an instance that was not
    // waiting for it.
    assert_eq!(
        metric(&sluice.url, "sluice_edge_orphan_replies_total").await,
        0.0
    );
    assert_eq!(
        metric(&second_url, "sluice_edge_orphan_replies_total").await,
        0.0
    );
}

#[tokio::test]
async fn models_lists_auto_and_the_catalogue_to_authenticated_callers() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let (status, body) = get_json(&sluice.v1("/models"), &tenant.key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids[0], "auto");
    assert!(
        ids.contains(&"sim-small") && ids.contains(&"sim-large"),
        "{ids:?}"
    );
    assert!(body["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["object"] == "model"));
    let (status, body) = get_json(&sluice.v1("/models"), "sk-sluice-not-a-key").await;
    assert_eq!(status, 401, "{body}");
}

/// A chat with `X-Sluice-Memory: on` in `session`; the status and body.
async fn remembered_chat(
    sluice: &Sluice,
    key: &str,
    session: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut request = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(key)
        .header("X-Sluice-Memory", "on")
        .json(&body);
    if let Some(session) = session {
        request = request.header("X-Session-Id", session);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json::<Value>().await.unwrap(),
    )
}

/// The text of a whole reply.
fn reply_text(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("a text reply: {body}"))
        .to_owned()
}

/// A short chat body holding `messages`.
fn turn(messages: Value) -> Value {
    json!({"model": "sim-small", "max_tokens": 6, "messages": messages})
}

#[tokio::test]
async fn a_session_with_memory_needs_only_its_new_turn() {
    use sluice_schemas::{tokens::count_prompt, ChatMessage};
    let prefix = unique("t");
    let sluice = Sluice::start_with(
        &prefix,
        vec![("SLUICE_EDGE__MEMORY__MAX_TURNS".into(), "2".into())],
    );
    let alice = create_tenant(&sluice.prefix);
    let bob = create_tenant(&sluice.prefix);
    let session = unique("session-");
    let prompt_of = |messages: &[ChatMessage]| count_prompt(messages, &[]) as i64;

    let first = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."}]);
    let (status, one) = remembered_chat(&sluice, &alice.key, Some(&session), turn(first)).await;
    assert_eq!(status, 200, "{one}");
    let reply_one = reply_text(&one);

    // The second turn sends only itself; the model sees the first (its system message is the
    // first turn's own, not remembered).
    let (status, two) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&session),
        turn(json!([{"role": "user", "content": "What is my name?"}])),
    )
    .await;
    assert_eq!(status, 200, "{two}");
    let seen = [
        ChatMessage::text("user", "My name is Ada."),
        ChatMessage::text("assistant", reply_one.clone()),
        ChatMessage::text("user", "What is my name?"),
    ];
    assert_eq!(two["usage"]["prompt_tokens"], prompt_of(&seen));
    let reply_two = reply_text(&two);

    // Without the header the same session is not remembered; another tenant's same session id
    // finds nothing of Alice's.
    let (_, plain) = chat(&sluice, &alice.key, json!({"model": "sim-small", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(plain["usage"]["prompt_tokens"], 5);
    let (status, other) = remembered_chat(
        &sluice,
        &bob.key,
        Some(&session),
        turn(json!([{"role": "user", "content": "Hi"}])),
    )
    .await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(
        other["usage"]["prompt_tokens"], 5,
        "Bob's session is his own"
    );
    // So is another key's of Alice's tenant.
    let second: Value =
        serde_json::from_str(&run_cli(&prefix, &["tenant", "key", &alice.name, "--json"])).unwrap();
    let second_key = second["api_key"].as_str().unwrap();
    let (status, other) = remembered_chat(
        &sluice,
        second_key,
        Some(&session),
        turn(json!([{"role": "user", "content": "Hi"}])),
    )
    .await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(
        other["usage"]["prompt_tokens"], 5,
        "a session belongs to its key"
    );

    // At most two turns are remembered: the fourth sees the second and the third only.
    let (_, three) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&session),
        turn(json!([{"role": "user", "content": "Thanks."}])),
    )
    .await;
    let reply_three = reply_text(&three);
    let (_, four) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&session),
        turn(json!([{"role": "user", "content": "Bye."}])),
    )
    .await;
    let seen = [
        ChatMessage::text("user", "What is my name?"),
        ChatMessage::text("assistant", reply_two),
        ChatMessage::text("user", "Thanks."),
        ChatMessage::text("assistant", reply_three),
        ChatMessage::text("user", "Bye."),
    ];
    assert_eq!(four["usage"]["prompt_tokens"], prompt_of(&seen));

    // The caller forgets the session: the next turn stands alone. Bob's forgetting his own
    // session of the same id leaves Alice's alone.
    let forget = |key: String| {
        let url = sluice.v1(&format!("/sessions/{session}/memory"));
        async move {
            let response = http().delete(url).bearer_auth(key).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, gone) = forget(bob.key.clone()).await;
    assert_eq!(
        (status, gone["deleted_turns"].as_u64()),
        (200, Some(1)),
        "{gone}"
    );
    let (status, gone) = forget(alice.key.clone()).await;
    assert_eq!(
        (status, gone["deleted_turns"].as_u64()),
        (200, Some(4)),
        "{gone}"
    );
    let (_, alone) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&session),
        turn(json!([{"role": "user", "content": "Hi"}])),
    )
    .await;
    assert_eq!(alone["usage"]["prompt_tokens"], 5);

    // Memory needs a session.
    let (status, body) = remembered_chat(
        &sluice,
        &alice.key,
        None,
        turn(json!([{"role": "user", "content": "x"}])),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A tool's result may answer a call the model made in a remembered turn.
    let tools = json!([{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]);
    let agent = unique("agent-");
    let ask = |messages: Value| json!({"model": "sim-small", "tools": tools, "messages": messages});
    let (status, called) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&agent),
        ask(json!([{"role": "user", "content": "Where is order A-17?"}])),
    )
    .await;
    assert_eq!(status, 200, "{called}");
    let id = called["choices"][0]["message"]["tool_calls"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, answered) = remembered_chat(
        &sluice,
        &alice.key,
        Some(&agent),
        ask(json!([{"role": "tool", "tool_call_id": id, "content": "{\"status\":\"shipped\"}"}])),
    )
    .await;
    assert_eq!(status, 200, "{answered}");
    assert_eq!(
        answered["choices"][0]["finish_reason"], "stop",
        "after the tool's result, text"
    );
}
