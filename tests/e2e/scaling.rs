//! Stages scale by consumer group: a second orchestrator process joins the group and shares
//! the partitions; when it goes, the first takes its partitions back, and every request is
//! still answered and billed exactly once.
//!
//! A member that stops with SIGTERM leaves the group at once; one killed with SIGKILL is evicted
//! when its session times out (10 s), and the survivor takes its partitions and redoes what it
//! had not committed.

use std::{collections::HashSet, time::Duration};

use crate::harness::*;

/// How the second instance goes.
enum Departure {
    /// SIGTERM: it finishes what it holds, commits and leaves the group.
    Leaves,
    /// SIGKILL mid-stream: no leave, no final commit.
    IsKilled,
}

/// Two orchestrators share the group while requests flow; then the second goes.
async fn second_orchestrator_joins_then(departure: Departure) {
    let prefix = unique("t");
    let sluice = Sluice::start_with(&prefix, sim_speed(200.0));
    let tenant = create_tenant(&prefix);
    let speed = sim_speed(200.0).remove(0);
    let mut second = sluice.spawn_part(&["run", "orchestrator"], &[(&speed.0, speed.1.clone())]);

    // Requests flow while the group rebalances to two members, and while one of them goes.
    let calls: Vec<_> = (0..24u64)
        .map(|i| {
            spawn_chat(
                &sluice,
                &tenant.key,
                format!("scale {i}"),
                10,
                Duration::from_millis(250 * i),
            )
        })
        .collect();
    // The second instance takes a share of the partitions and processes records...
    let processed = "sluice_records_in_total{stage=\"orchestrator\"}";
    eventually(20, "the second orchestrator to process records", || async {
        (metric(&second.ops_url, processed).await > 0.0).then_some(())
    })
    .await;
    // The first instance saw the group rebalance: its first assignment, then the join.
    let rebalances = format!("sluice_rebalances_total{{group=\"{prefix}.orchestrator\"}}");
    let before = metric(&sluice.url, &rebalances).await;
    assert!(before >= 2.0);
    // ...then goes while requests are in flight, and the first instance takes all the
    // partitions again: at once if it left, once its session expired if it was killed.
    match departure {
        Departure::Leaves => {
            let stopped = tokio::task::spawn_blocking(move || second.terminate());
            assert!(
                stopped.await.unwrap(),
                "the second orchestrator exits cleanly"
            );
        }
        Departure::IsKilled => second.kill(),
    }

    let mut ids = HashSet::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 10);
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 24);
    // The requests may all be answered before the group settles (when the second went after
    // the last was sent): the first instance's rebalance is awaited, not assumed.
    eventually(
        30,
        "the first instance to rebalance when the second went",
        || async { (metric(&sluice.url, &rebalances).await > before).then_some(()) },
    )
    .await;

    let billed = eventually(60, "all 24 requests metered", || async {
        billed_per_request(&tenant.id)
            .await
            .filter(|rows| rows.len() >= 24)
    })
    .await;
    let billed_ids: HashSet<String> = billed.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(billed_ids, ids);
    assert!(billed.iter().all(|(_, n)| *n == 1), "{billed:?}");
}

#[tokio::test]
async fn a_second_orchestrator_joins_then_leaves_and_nothing_is_lost_or_billed_twice() {
    second_orchestrator_joins_then(Departure::Leaves).await;
}

#[tokio::test]
async fn a_second_orchestrator_is_killed_and_the_first_takes_over_losing_and_doubling_nothing() {
    second_orchestrator_joins_then(Departure::IsKilled).await;
}
