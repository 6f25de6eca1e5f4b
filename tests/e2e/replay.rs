//! `sluice replay` backfills a time range through a stage: only records in the range, written
//! once however often the backfill runs.

use std::time::Duration;

use rdkafka::{
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use sluice_schemas::{Codec, RegistryClient, UsageEvent};

use crate::harness::*;

#[tokio::test]
async fn replay_backfills_only_the_time_range_and_only_once() {
    let sluice = Sluice::start();
    let archive = sluice.topic("usage-archive");
    run_cli(&sluice.prefix, &["topics"]); // the stage topics exist; the archive is ours:
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .unwrap();
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &archive,
                2,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();

    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    codec.register::<UsageEvent>().await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let tenant = unique("replay-tenant-");
    let base = sluice_pipelines::now_ms() - 3_600_000;
    // Six events a minute apart; the replay takes minutes 1..4 (three events).
    for minute in 0..6i64 {
        let event = UsageEvent {
            input_tokens: 10,
            output_tokens: minute,
            occurred_at_ms: base + minute * 60_000,
            ..usage_event(format!("{tenant}-req-{minute}"), &tenant)
        };
        let bytes = codec.encode(&event).unwrap();
        producer
            .send(
                FutureRecord::to(&archive)
                    .key(&tenant)
                    .payload(&bytes)
                    .timestamp(base + minute * 60_000),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let from = (base + 60_000).to_string();
    let to = (base + 4 * 60_000).to_string();
    let args = [
        "replay",
        "metering",
        "--topic",
        &archive,
        "--from-ms",
        &from,
        "--to-ms",
        &to,
    ];
    let first = sluice.cli(&args);
    assert!(
        first.contains("read 3, processed 3, dead-lettered 0"),
        "{first}"
    );
    let again = sluice.cli(&args);
    assert!(
        again.contains("read 3, processed 0"),
        "a second backfill adds nothing: {again}"
    );

    let rows: Vec<(String, u64)> = clickhouse()
        .query("SELECT request_id, output_tokens FROM usage_events FINAL WHERE tenant_id = ? ORDER BY request_id")
        .bind(tenant.as_str())
        .fetch_all()
        .await
        .unwrap();
    let expected: Vec<(String, u64)> = (1..4)
        .map(|m| (format!("{tenant}-req-{m}"), m as u64))
        .collect();
    assert_eq!(rows, expected);

    // SQL pipelines are not replayed (their windows are rebuilt from the group's position):
    // the command says so and fails rather than writing a partial window.
    let refused = crate::harness::sluice(&sluice.prefix)
        .args(["replay", "sql", "--from-ms", &from, "--to-ms", &to])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("reset the group"), "{stderr}");
}
