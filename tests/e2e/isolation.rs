//! Tenants are walled off: every read path, called with another tenant's key, shows nothing of
//! the first tenant; row-level security holds even for a query with no tenant filter.

use serde_json::json;
use sqlx::Row;

use crate::harness::*;

#[tokio::test]
async fn another_tenant_sees_none_of_the_first_tenants_data() {
    let sluice = Sluice::start();
    let alice = create_tenant(&sluice.prefix);
    let bob = create_tenant(&sluice.prefix);
    let (status, body) = chat(&sluice, &alice.key, json!({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "mine"}]})).await;
    assert_eq!(status, 200, "{body}");

    // Alice's usage arrives...
    eventually(30, "alice's usage", || async {
        let (_, usage) = get_json(&sluice.v1("/usage"), &alice.key).await;
        (usage["totals"]["requests"] == 1).then_some(())
    })
    .await;
    // ...and Bob sees none of it.
    let (status, usage) = get_json(&sluice.v1("/usage"), &bob.key).await;
    assert_eq!(status, 200);
    assert_eq!(usage["totals"]["requests"], 0, "{usage}");
    assert_eq!(usage["data"], json!([]));
    assert_eq!(usage["tenant_id"], bob.id.as_str());

    // /v1/me answers with the caller's own tenant only.
    let (_, me) = get_json(&sluice.v1("/me"), &bob.key).await;
    assert_eq!(me["id"], bob.id.as_str());
    assert_eq!(me["name"], bob.name.as_str());
}

#[tokio::test]
async fn row_level_security_filters_queries_that_forget_the_tenant() {
    let prefix = unique("t");
    let alice = create_tenant(&prefix);
    let bob = create_tenant(&prefix);
    let pool = sqlx::PgPool::connect(&app_database_url()).await.unwrap();

    // With no tenant named, the runtime role sees no tenant-owned rows at all.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    for (me, other) in [(&alice, &bob), (&bob, &alice)] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('sluice.tenant_id', $1, true)")
            .bind(&me.id)
            .execute(&mut *tx)
            .await
            .unwrap();
        let tenants: Vec<String> = sqlx::query("SELECT id::text FROM tenants")
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        assert_eq!(tenants, vec![me.id.clone()]);
        let key_owners: Vec<String> = sqlx::query("SELECT tenant_id::text FROM api_keys")
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        assert_eq!(key_owners, vec![me.id.clone()]);
        let theirs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE tenant_id::text = $1")
                .bind(&other.id)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(
            theirs, 0,
            "an explicit filter for another tenant finds nothing"
        );
        tx.rollback().await.unwrap();
    }

    // Keys are stored hashed: the plaintext appears nowhere.
    let admin = sqlx::PgPool::connect(&admin_database_url()).await.unwrap();
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE tenant_id::text = $1")
            .bind(&alice.id)
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], alice.key);
    assert_eq!(
        stored[0],
        sluice_stores::postgres::tenants::hash_api_key(&alice.key)
    );
}

#[tokio::test]
async fn analysts_read_clickhouse_but_cannot_change_it() {
    let analyst = clickhouse().with_user("analyst");
    analyst
        .query("SELECT count() FROM usage_events FINAL")
        .fetch_one::<u64>()
        .await
        .expect("the analyst user reads the facts");
    for rollup in [
        "usage_hourly",
        "usage_daily",
        "tenant_usage_1m",
        "model_latency_1m",
    ] {
        analyst
            .query(&format!("SELECT count() FROM {rollup}"))
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|e| panic!("the analyst user reads {rollup}: {e}"));
        let refused = analyst
            .query(&format!("INSERT INTO {rollup} (tenant_id) VALUES ('x')"))
            .execute()
            .await;
        assert!(refused.is_err(), "the analyst user cannot write {rollup}");
    }
    let refused = analyst.query("DROP TABLE usage_events").execute().await;
    assert!(refused.is_err(), "the analyst user is read-only");
    let refused = analyst
        .query("INSERT INTO usage_events (event_id) VALUES ('x')")
        .execute()
        .await;
    assert!(refused.is_err(), "the analyst user cannot write");
}
