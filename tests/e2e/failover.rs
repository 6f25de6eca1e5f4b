//! Edge instances fail over: a killed instance's replies partition is taken by the next one,
//! and an instance whose PostgreSQL connection (and with it the partition's claim) drops stops
//! serving instead of reading a partition another instance may now own.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

/// Waits (at most `seconds`) for `part` to exit; false if it is still running.
async fn exits_within(part: &mut Part, seconds: u64) -> bool {
    for _ in 0..seconds * 10 {
        if part.exited() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_killed_edges_replies_partition_is_taken_by_the_next_one() {
    // Three replies partitions: `sluice up` and two more edges hold them all.
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let (mut second, second_url) = sluice.spawn_edge(&[]);
    ready_within(&second_url).await;
    let (_third, third_url) = sluice.spawn_edge(&[]);
    ready_within(&third_url).await;
    let (mut fourth, _) = sluice.spawn_edge(&[]);
    assert!(
        exits_within(&mut fourth, 30).await,
        "a fourth edge gives up: no partition is free"
    );

    second.kill();
    let (_fifth, fifth_url) = sluice.spawn_edge(&[]);
    ready_within(&fifth_url).await;
    let response = http()
        .post(format!("{fifth_url}/v1/chat/completions"))
        .bearer_auth(&tenant.key)
        .json(&json!({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "takeover"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "replies reach the partition it took over"
    );
}

#[tokio::test]
async fn an_edge_that_loses_its_claim_stops_serving() {
    let sluice = Sluice::start();
    let (mut edge, url) = sluice.spawn_edge(&[]);
    ready_within(&url).await;
    // `sluice up` claimed partition 0 first; this edge holds partition 1. Its claim's connection
    // is cut, as a PostgreSQL restart or a network cut would.
    let lock = format!("sluice-replies:{}:1", sluice.topic("replies"));
    let pool = sqlx::PgPool::connect(&app_database_url()).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND objsubid = 1
            AND objid = (hashtext($1)::bigint & 4294967295)::oid",
    )
    .bind(&lock)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut, vec![true], "the claim's connection was found and cut");
    assert!(exits_within(&mut edge, 10).await, "the edge stops");
    assert!(!ready(&url));
    // `sluice up`'s own edge is untouched.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ready(&sluice.url));
}
