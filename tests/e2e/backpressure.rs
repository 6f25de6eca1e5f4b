//! When a sink's store is down, the sink stops taking records instead of buffering them:
//! memory stays bounded while lag grows, and once the store is back every record is written
//! exactly once.

use std::time::Duration;

use rdkafka::{
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use sluice_schemas::{Codec, RegistryClient, UsageEvent};

use crate::harness::*;

#[tokio::test]
async fn a_stalled_sink_bounds_memory_and_loses_nothing() {
    let prefix = unique("t");
    // ClickHouse "down": nothing listens there.
    let dead_clickhouse = format!("http://127.0.0.1:{}", free_port());
    // The SQL pipelines read the same topic and hold open windows' rows in memory by design;
    // this test is about the sink, so they do not run here.
    let mut sluice = Sluice::start_with(
        &prefix,
        vec![
            ("SLUICE_CLICKHOUSE__URL".to_owned(), dead_clickhouse),
            ("SLUICE_SQL__ENABLED".to_owned(), "false".to_owned()),
        ],
    );
    let baseline_kib = sluice.rss_kib();

    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    codec.register::<UsageEvent>().await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let tenant = unique("stall-");
    let usage_topic = sluice.topic("usage");
    let total = 80_000u64;
    let padding = "x".repeat(700); // ~800-byte records: about 64 MB in all
    let mut deliveries = Vec::with_capacity(total as usize);
    for i in 0..total {
        let event = UsageEvent {
            event_id: format!("{tenant}-{i}:0"),
            request_id: format!("{tenant}-{i}"),
            tenant_id: tenant.clone(),
            model: format!("sim-small{padding}"),
            provider: "sim".into(),
            input_tokens: 1,
            output_tokens: 1,
            occurred_at_ms: sluice_pipelines::now_ms(),
            latency_ms: None,
        };
        let bytes = codec.encode(&event).unwrap();
        loop {
            match producer.send_result(FutureRecord::to(&usage_topic).key(&tenant).payload(&bytes))
            {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    // The sink cannot write, so the lag shows (almost) everything...
    let group = format!("{prefix}.metering");
    let lag_series = |p: i32| {
        format!(
            "sluice_consumer_lag{{group=\"{group}\",partition=\"{p}\",topic=\"{usage_topic}\"}}"
        )
    };
    let lag = eventually(30, "the metering lag to show the backlog", || async {
        let mut lag = 0.0;
        for p in 0..3 {
            lag += metric(&sluice.url, &lag_series(p)).await;
        }
        (lag >= (total - 2_000) as f64).then_some(lag)
    })
    .await;
    assert!(lag <= total as f64);
    // ...while memory stays bounded: well under the 60 MB waiting on the topic (prefetch is
    // for sinks capped at 16 MiB; with librdkafka's default of 64 MiB it grew by about 90 MB).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_kib = sluice.rss_kib().saturating_sub(baseline_kib);
    eprintln!("memory grew by {grown_kib} KiB with {lag} records waiting");
    assert!(
        grown_kib < 48 * 1024,
        "memory grew by {grown_kib} KiB while the sink was stalled"
    );
    assert!(metric(&sluice.url, "sluice_retries_total{stage=\"metering\"}").await >= 1.0);
    // The usage API says ClickHouse is unavailable, in OpenAI's error shape.
    let key = create_tenant(&prefix).key;
    let (status, body) = get_json(&sluice.v1("/usage"), &key).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("service_unavailable")),
        "{body}"
    );

    // ClickHouse is back (the process restarts with the right address): every event is written once.
    sluice.extra_env.clear();
    sluice.restart();
    let rows: u64 = eventually(240, "the backlog to drain into ClickHouse", || async {
        let n: u64 = clickhouse()
            .query("SELECT count() FROM usage_events FINAL WHERE tenant_id = ?")
            .bind(tenant.as_str())
            .fetch_one()
            .await
            .ok()?;
        (n >= total).then_some(n)
    })
    .await;
    assert_eq!(rows, total);
}
