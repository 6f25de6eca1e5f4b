//! Exact billing through chaos: traffic flows — plain and streamed replies, some callers walking
//! out mid-stream — while a separate orchestrator and a separate metering sink are killed with
//! SIGKILL and started again, twenty times; afterwards every request is billed once, for what
//! its caller was told (or, for a caller that walked out, for what the model produced), and the
//! tenant's invoice preview equals that to the token and to the cent.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::{json, Value};

use crate::harness::*;

/// What a caller learnt of one request: its id and the usage it was told (`None`: it walked
/// out before the end).
type Told = Arc<Mutex<Vec<(String, Option<(i64, i64)>)>>>;

/// The `data:` payloads of a server-sent-event body.
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// One caller's loop until `stop`: `mode` 0 asks for whole replies, 1 streams them to the end,
/// 2 reads a stream's first event and hangs up.
async fn caller(sluice_url: String, key: String, mode: u8, stop: Arc<AtomicBool>, told: Told) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = json!({
            "model": "sim-small", "max_tokens": 12, "stream": mode > 0,
            "stream_options": { "include_usage": true },
            "messages": [{"role": "user", "content": format!("chaos {mode} {n}")}],
        });
        let mut response = http()
            .post(format!("{sluice_url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .expect("the edge is never killed");
        assert_eq!(response.status().as_u16(), 200, "mode {mode}");
        let entry = match mode {
            0 => {
                let reply: Value = response.json().await.unwrap();
                let usage = &reply["usage"];
                (
                    reply["id"].as_str().unwrap().to_owned(),
                    Some((
                        usage["prompt_tokens"].as_i64().unwrap(),
                        usage["completion_tokens"].as_i64().unwrap(),
                    )),
                )
            }
            1 => {
                let events = sse_events(&response.text().await.unwrap());
                let usage = &events.last().expect("a usage event")["usage"];
                (
                    events[0]["id"].as_str().unwrap().to_owned(),
                    Some((
                        usage["prompt_tokens"].as_i64().unwrap(),
                        usage["completion_tokens"].as_i64().unwrap(),
                    )),
                )
            }
            _ => {
                // Read until the first whole event, then hang up.
                let mut read = Vec::new();
                let first = loop {
                    let chunk = response.chunk().await.unwrap().expect("a first event");
                    read.extend_from_slice(&chunk);
                    let text = String::from_utf8_lossy(&read).into_owned();
                    if text.contains("\n\n") {
                        break sse_events(&text);
                    }
                };
                drop(response);
                (first[0]["id"].as_str().unwrap().to_owned(), None)
            }
        };
        told.lock().unwrap().push(entry);
    }
}

#[tokio::test]
async fn every_request_is_billed_once_and_the_preview_is_exact_through_twenty_kill_9s() {
    let prefix = unique("t");
    let mut env = sim_speed(300.0);
    env.push(("SLUICE_KAFKA__SESSION_TIMEOUT_MS".into(), "6000".into()));
    let sluice = Sluice::start_with(&prefix, env.clone());
    let part_env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let mut orchestrator = sluice.spawn_part(&["run", "orchestrator"], &part_env);
    let mut metering = sluice.spawn_part(&["run", "metering"], &part_env);

    // A tenant's admin, and a key of the tenant for the callers.
    let (_, session) = register_tenant_admin(&sluice).await;
    let (tenant_id, admin) = (
        session["tenant_id"].as_str().unwrap().to_owned(),
        session["access_token"].as_str().unwrap().to_owned(),
    );
    let (_, key) = create_key(&sluice, &admin, "chaos").await;

    let stop = Arc::new(AtomicBool::new(false));
    let told: Told = Arc::default();
    let callers: Vec<_> = [0u8, 0, 0, 1, 1, 2]
        .into_iter()
        .map(|mode| {
            tokio::spawn(caller(
                sluice.url.clone(),
                key.clone(),
                mode,
                stop.clone(),
                told.clone(),
            ))
        })
        .collect();
    // Twenty kills, the orchestrator and the metering sink in turn, each started again at once.
    for kill in 0..20 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let stage = if kill % 2 == 0 {
            "orchestrator"
        } else {
            "metering"
        };
        let part = if kill % 2 == 0 {
            &mut orchestrator
        } else {
            &mut metering
        };
        // An orchestrator is killed while it holds partitions and does their work (the
        // metering part holds the tenant's one usage partition only some of the time).
        if stage == "orchestrator" {
            let processed = "sluice_records_in_total{stage=\"orchestrator\"}";
            eventually(20, "the orchestrator part to process records", || async {
                (metric(&part.ops_url, processed).await > 0.0).then_some(())
            })
            .await;
        }
        part.kill();
        *part = sluice.spawn_part(&["run", stage], &part_env);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let told = told.lock().unwrap().clone();
    let walked_out = told.iter().filter(|(_, usage)| usage.is_none()).count();
    assert!(
        told.len() - walked_out >= 15 && walked_out >= 3,
        "{} requests, {walked_out} walked out",
        told.len()
    );

    // Every request billed once: what its caller was told, or (walked out) what was produced.
    let billed = eventually(60, "every request billed", || async {
        let rows: Vec<(String, u64, u64, u64)> = clickhouse()
            .query(
                "SELECT request_id, count(), sum(input_tokens), sum(output_tokens) \
                   FROM usage_events FINAL WHERE tenant_id = ? GROUP BY request_id",
            )
            .bind(&tenant_id)
            .fetch_all()
            .await
            .ok()?;
        (rows.len() >= told.len()).then_some(rows)
    })
    .await;
    let billed: HashMap<String, (u64, u64, u64)> = billed
        .into_iter()
        .map(|(id, rows, input, output)| (id, (rows, input, output)))
        .collect();
    assert_eq!(
        billed.len(),
        told.len(),
        "a request billed that nobody sent"
    );
    let (mut input, mut output) = (0u64, 0u64);
    for (id, usage) in &told {
        let (rows, billed_in, billed_out) = billed[id];
        assert_eq!(rows, 1, "{id} billed {rows} times");
        if let Some((told_in, told_out)) = usage {
            assert_eq!(
                (billed_in as i64, billed_out as i64),
                (*told_in, *told_out),
                "{id}"
            );
        } else {
            assert!(
                billed_out > 0,
                "{id}: a walked-out stream is billed what was produced"
            );
        }
        input += billed_in;
        output += billed_out;
    }

    // So do the hourly and daily rollups.
    assert_rollups_equal_facts(&tenant_id).await;

    // The preview says the same, to the token and to the cent.
    let (status, preview) = get_json(&sluice.v1("/invoices/preview"), &admin).await;
    assert_eq!(status, 200, "{preview}");
    let line = preview["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["model"] == "sim-small")
        .unwrap_or_else(|| panic!("{preview}"))
        .clone();
    assert_eq!(
        (
            line["input_tokens"].as_u64(),
            line["output_tokens"].as_u64()
        ),
        (Some(input), Some(output)),
        "{preview}"
    );
    let (exact, rounded) = sim_small_amounts(input, output).await;
    assert_eq!(
        (&line["exact_amount"], &line["amount"]),
        (&json!(exact), &json!(rounded)),
        "{preview}"
    );
    assert_eq!(preview["total"], line["amount"], "{preview}");
}
