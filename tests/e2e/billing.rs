//! Billing is exact through crashes: kill -9 the whole process mid-stream and mid-batch, replay
//! duplicates onto the usage topic, restart, and every request is billed exactly once.

use std::{collections::HashSet, time::Duration};

use rdkafka::{
    consumer::StreamConsumer,
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use serde_json::json;
use sluice_schemas::{ChatRequest, Codec, RegistryClient};

use crate::harness::*;

/// Every record currently in `topic`, read from the beginning until it goes quiet.
async fn drain(consumer: &StreamConsumer, quiet: Duration) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(quiet, consumer.recv()).await {
        out.push((
            m.key().map(<[u8]>::to_vec),
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    out
}

#[tokio::test]
async fn every_request_is_billed_exactly_once_through_kill_9_and_redelivery() {
    let prefix = unique("t");
    // A slow model, so the kill lands while replies are streaming.
    let mut sluice = Sluice::start_with(&prefix, sim_speed(40.0));
    let tenant = create_tenant(&prefix);

    // Some requests finish before the crash...
    for i in 0..5 {
        let (status, body) = chat(&sluice, &tenant.key, json!({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": format!("early {i}")}]})).await;
        assert_eq!(status, 200, "{body}");
    }
    // ...and more are in flight when the process is killed.
    let in_flight: Vec<_> = (0..10)
        .map(|i| {
            spawn_chat(
                &sluice,
                &tenant.key,
                format!("in flight {i}"),
                20,
                Duration::ZERO,
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sluice.kill();
    let killed_at = std::time::Instant::now();
    for task in in_flight {
        let _ = task.await;
    }

    // Every request that reached the broker must be billed once.
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let requests_reader = topic_reader(&sluice.topic("requests"));
    let mut expected = HashSet::new();
    for (_, payload) in drain(&requests_reader, Duration::from_secs(3)).await {
        // The registry is part of the killed process: decode with the schema we know.
        let (_, body) = sluice_schemas::wire::unframe(&payload).unwrap();
        let request: ChatRequest = sluice_schemas::codec::decode_body(
            <ChatRequest as sluice_schemas::Record>::schema().unwrap(),
            body,
        )
        .unwrap();
        expected.insert(request.request_id);
    }
    assert!(
        expected.len() >= 5,
        "at least the finished requests reached the broker"
    );
    drop(codec);

    // Redeliver everything already on the usage topic, as a rebalance or replay would.
    let usage_reader = topic_reader(&sluice.topic("usage"));
    let usage_records = drain(&usage_reader, Duration::from_secs(2)).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let usage_topic = sluice.topic("usage");
    for (key, payload) in &usage_records {
        let mut record = FutureRecord::to(&usage_topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    sluice.restart_after_crash(killed_at).await;

    // Wait until every request is metered.
    let billed = eventually(90, "every request to be metered", || async {
        let rows = billed_per_request(&tenant.id).await?;
        let seen: HashSet<String> = rows.iter().map(|(r, _)| r.clone()).collect();
        expected.is_subset(&seen).then_some(rows)
    })
    .await;
    let billed_ids: HashSet<String> = billed.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(
        billed_ids, expected,
        "billed exactly the requests that were made"
    );
    assert!(
        billed.iter().all(|(_, n)| *n == 1),
        "each request billed once: {billed:?}"
    );

    // The usage API agrees, and stays put (nothing else trickles in).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, usage) = get_json(&sluice.v1("/usage"), &tenant.key).await;
    assert_eq!(
        usage["totals"]["requests"].as_u64(),
        Some(expected.len() as u64),
        "{usage}"
    );
    let raw: u64 = clickhouse()
        .query("SELECT count() FROM usage_events WHERE tenant_id = ?")
        .bind(tenant.id.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert!(raw >= expected.len() as u64);
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_then_exits_cleanly() {
    let prefix = unique("t");
    let mut sluice = Sluice::start_with(&prefix, sim_speed(40.0));
    let tenant = create_tenant(&prefix);
    // About half a second of streaming at 40 tokens/s.
    let request = spawn_chat(&sluice, &tenant.key, "finish me".into(), 20, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let clean = tokio::task::spawn_blocking(move || {
        let clean = sluice.terminate();
        (clean, sluice)
    });
    let (status, body) = request.await.unwrap();
    assert_eq!(
        status, 200,
        "the request in flight is answered during shutdown: {body}"
    );
    assert_eq!(body["usage"]["completion_tokens"], 20);
    let (clean, _sluice) = clean.await.unwrap();
    assert!(clean, "sluice up exits with status 0 after SIGTERM");
}

#[tokio::test]
async fn a_caller_that_goes_away_mid_stream_is_still_billed_for_the_whole_reply() {
    let sluice = Sluice::start_with(&unique("t"), sim_speed(20.0));
    let tenant = create_tenant(&sluice.prefix);
    let ask = |stream: bool| {
        serde_json::json!({"model": "sim-small", "stream": stream, "max_tokens": 40,
            "messages": [{"role": "user", "content": "tell me a long story about billing"}]})
    };
    // The caller reads the first event of a two-second stream, then hangs up.
    let mut response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .json(&ask(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(response);
    // The same conversation again, read to its end: the reply is the same length.
    let (status, whole) = chat(&sluice, &tenant.key, ask(false)).await;
    assert_eq!(status, 200, "{whole}");
    let output = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(output > 5, "{whole}");
    // The model call of the abandoned stream ran to its end and is billed like the other.
    let usage = eventually(30, "both calls billed", || async {
        let (_, usage) = get_json(&sluice.v1("/usage"), &tenant.key).await;
        (usage["totals"]["requests"] == 2).then_some(usage)
    })
    .await;
    assert_eq!(
        usage["totals"]["output_tokens"].as_u64(),
        Some(2 * output),
        "{usage}"
    );
}

#[tokio::test]
async fn a_closed_months_facts_end_up_in_one_merged_part_that_reads_the_same_without_final() {
    let prefix = unique("t");
    let sluice = Sluice::start_with(
        &prefix,
        vec![
            ("SLUICE_STAGES__METERING_COMPACT_AFTER_S".into(), "1".into()),
            ("SLUICE_STAGES__METERING_COMPACT_EVERY_S".into(), "1".into()),
        ],
    );
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    codec
        .register::<sluice_schemas::UsageEvent>()
        .await
        .unwrap();
    let tenant = unique("compact-");
    // A month of the 1970s of this test's own.
    let nth = uuid::Uuid::new_v4().as_u128() % 100;
    let month =
        sluice_stores::billing::Period::parse(&format!("{}-{:02}", 1971 + nth / 12, 1 + nth % 12))
            .unwrap();
    let usage_topic = sluice.topic("usage");
    // Late usage for a month long closed, in two deliveries (two inserts, two parts), the
    // second repeating an event of the first.
    for (written, ids) in [(2u64, ["a", "b"]), (3, ["b", "c"])] {
        let events = ids.map(|id| {
            let event = sluice_schemas::UsageEvent {
                occurred_at_ms: month.start_ms() + 3_600_000,
                ..usage_event(format!("{tenant}-{id}"), &tenant)
            };
            (tenant.clone(), codec.encode(&event).unwrap())
        });
        produce_all(&usage_topic, events.into_iter()).await;
        eventually(30, "the usage facts to be written", || async {
            (facts_of(&tenant).await? == written).then_some(())
        })
        .await;
    }
    // The stage looks every second (ClickHouse's own background merges may get there first):
    // the month ends up in one part of a merge, which reads the same without FINAL.
    let partition = month.yyyymm().to_string();
    eventually(
        60,
        "the closed month to be merged into one part",
        || async {
            let parts: Vec<(String, u32)> = clickhouse()
                .query(
                    "SELECT name, level FROM system.parts \
                  WHERE database = currentDatabase() AND table = 'usage_events' AND active \
                    AND partition = ?",
                )
                .bind(partition.as_str())
                .fetch_all()
                .await
                .ok()?;
            (parts.len() == 1 && parts[0].1 > 0).then_some(())
        },
    )
    .await;
    let plain: u64 = clickhouse()
        .query("SELECT count() FROM usage_events WHERE tenant_id = ?")
        .bind(tenant.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((plain, facts_of(&tenant).await), (3, Some(3)));
}
