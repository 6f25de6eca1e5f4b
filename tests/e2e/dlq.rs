//! Poison records go to the DLQ with their reason and source coordinates, and the stream goes on.

use std::time::Duration;

use rdkafka::{
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use serde_json::json;
use sluice_schemas::{Codec, DeadLetter, RegistryClient};

use crate::harness::*;

#[tokio::test]
async fn poison_requests_land_in_the_dlq_and_the_stream_keeps_going() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let requests = sluice.topic("requests");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let poisons: Vec<(&str, Vec<u8>)> = vec![
        ("not the wire format", b"{\"model\": \"auto\"}".to_vec()),
        (
            "unknown schema id",
            vec![0, 0x7f, 0xff, 0xff, 0xf0, 1, 2, 3],
        ),
        ("truncated avro body", {
            // A real ChatRequest frame with its body cut short.
            let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
            codec
                .register::<sluice_schemas::ChatRequest>()
                .await
                .unwrap();
            let request = sluice_schemas::ChatRequest {
                request_id: "x".into(),
                tenant_id: tenant.id.clone(),
                session_id: "s".into(),
                model: "auto".into(),
                messages: vec![],
                max_tokens: None,
                temperature: None,
                stream: false,
                reply_to: sluice_schemas::ReplyAddress {
                    topic: sluice.topic("replies"),
                    partition: 0,
                },
                received_at_ms: 0,
                allowed_models: None,
                key_id: None,
                user_id: None,
                ..Default::default()
            };
            let bytes = codec.encode(&request).unwrap();
            bytes[..bytes.len() / 2].to_vec()
        }),
    ];
    let mut sent = Vec::new();
    for (what, payload) in &poisons {
        let delivery = producer
            .send(
                FutureRecord::to(&requests).key("poison").payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("{what}: {e}"));
        sent.push((*what, delivery.partition, delivery.offset, payload.clone()));
    }

    // The pipeline still answers.
    let (status, body) = chat(&sluice, &tenant.key, json!({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "after the poison"}]})).await;
    assert_eq!(status, 200, "{body}");

    // Each poison record is in the DLQ with where it came from, why, and its bytes.
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let reader = topic_reader(&sluice.topic("dlq"));
    let mut letters: Vec<DeadLetter> = Vec::new();
    while letters.len() < sent.len() {
        let bytes = find_record(&reader, 30, |m| m.payload().map(<[u8]>::to_vec)).await;
        letters.push(codec.decode(&bytes).await.unwrap());
    }
    for (what, partition, offset, payload) in sent {
        let letter = letters
            .iter()
            .find(|l| l.source_partition == partition && l.source_offset == offset)
            .unwrap_or_else(|| {
                panic!("{what}: no dead letter for {partition}/{offset}: {letters:?}")
            });
        assert_eq!(letter.source_topic, requests, "{what}");
        assert_eq!(letter.stage, "router", "{what}");
        assert!(
            letter.reason.starts_with("undecodable"),
            "{what}: {}",
            letter.reason
        );
        assert_eq!(letter.payload.as_deref(), Some(&payload[..]), "{what}");
        assert_eq!(letter.key.as_deref(), Some(&b"poison"[..]), "{what}");
    }

    // `sluice dlq list` shows them with their source coordinates...
    let listed: Vec<serde_json::Value> = sluice
        .cli(&["dlq", "list", "--json", "--source", &requests])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed
        .iter()
        .all(|l| l["stage"] == "router" && l["source_topic"] == requests.as_str()));
    // ...and `sluice dlq replay` sends one back to its source, where (still poison) it is
    // dead-lettered again: a fourth letter, with the same original bytes.
    let position = listed[0]["position"].as_str().unwrap();
    let out = sluice.cli(&["dlq", "replay", position]);
    assert!(out.contains("replayed 1"), "{out}");
    let bytes = find_record(&reader, 30, |m| m.payload().map(<[u8]>::to_vec)).await;
    let again: DeadLetter = codec.decode(&bytes).await.unwrap();
    let original = letters
        .iter()
        .find(|l| {
            l.source_offset == listed[0]["source_offset"].as_i64().unwrap()
                && l.source_partition == listed[0]["source_partition"].as_i64().unwrap() as i32
        })
        .unwrap();
    assert_eq!(again.payload, original.payload);
    assert_eq!(again.source_topic, requests);

    // The DLQ count is on /metrics.
    assert_eq!(
        metric(&sluice.url, "sluice_dlq_records_total{stage=\"router\"}").await,
        4.0
    );
}

#[tokio::test]
async fn every_stage_dead_letters_a_poison_record_and_goes_on() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    // The same garbage on every stage's input topic, under the key the chat below uses there
    // (requests and routed records are keyed by session, usage by tenant): the chat's records
    // then come after the poison in the same partitions, so getting through shows each stage
    // went on past it.
    let garbage = b"\x00 not a schema-registry frame".to_vec();
    let session = unique("poisoned-session-");
    let mut sent = Vec::new();
    for (name, key) in [
        ("requests", session.as_str()),
        ("routed", session.as_str()),
        ("usage", tenant.id.as_str()),
    ] {
        let topic = sluice.topic(name);
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(key).payload(&garbage),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        sent.push((topic, delivery.partition, delivery.offset));
    }
    let readers_of = |topic: &str| -> Vec<&str> {
        if topic.ends_with(".requests") {
            vec!["router"]
        } else if topic.ends_with(".routed") {
            vec!["orchestrator"]
        } else {
            vec!["metering", "sql.tenant_usage_1m", "sql.model_latency_1m"]
        }
    };

    // Every stage goes on: a chat is answered and billed (router, orchestrator, metering), and
    // the SQL stages read its usage after the poison.
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(&tenant.key)
        .header("x-session-id", &session)
        .json(&json!({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "after the poison"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let billed = eventually(30, "the chat billed", || async {
        billed_per_request(&tenant.id)
            .await
            .filter(|rows| !rows.is_empty())
    })
    .await;
    assert_eq!(billed, vec![(body["id"].as_str().unwrap().to_owned(), 1)]);
    for stage in ["sql.tenant_usage_1m", "sql.model_latency_1m"] {
        let consumed = format!("sluice_records_in_total{{stage=\"{stage}\"}}");
        eventually(30, "the SQL stages to read past the poison", || async {
            (metric(&sluice.url, &consumed).await >= 2.0).then_some(())
        })
        .await;
    }

    // Each stage dead-lettered the record it could not read, with its coordinates and bytes.
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let reader = topic_reader(&sluice.topic("dlq"));
    let expected: usize = sent.iter().map(|(t, _, _)| readers_of(t).len()).sum();
    let mut letters: Vec<DeadLetter> = Vec::new();
    while letters.len() < expected {
        let bytes = find_record(&reader, 30, |m| m.payload().map(<[u8]>::to_vec)).await;
        letters.push(codec.decode(&bytes).await.unwrap());
    }
    for (topic, partition, offset) in &sent {
        for stage in readers_of(topic) {
            let letter = letters
                .iter()
                .find(|l| {
                    l.stage == stage
                        && &l.source_topic == topic
                        && l.source_partition == *partition
                        && l.source_offset == *offset
                })
                .unwrap_or_else(|| panic!("no dead letter from {stage}: {letters:?}"));
            assert!(
                letter.reason.starts_with("undecodable"),
                "{}",
                letter.reason
            );
            assert_eq!(letter.payload.as_deref(), Some(&garbage[..]), "{stage}");
        }
    }
}
