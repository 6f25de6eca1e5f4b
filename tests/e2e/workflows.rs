//! `sluice workflow check`: the shipped definitions pass; a wrong one is refused with its file,
//! line and field, and the command fails.

use crate::harness::{
    admin_database_url, app_database_url, create_tenant, run_cli, sluice, unique,
};

#[test]
fn workflow_check_passes_the_shipped_definitions_and_names_each_mistake() {
    let prefix = unique("t");
    let shipped = sluice(&prefix)
        .args(["workflow", "check"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&shipped.stdout);
    assert!(shipped.status.success(), "{out}");
    for name in [
        "complaint_handling",
        "create_order",
        "customer_support",
        "faq",
        "lead_capture",
        "order_management",
        "technical_support",
        "track_order",
    ] {
        assert!(out.contains(&format!("ok workflows/{name}.yaml")), "{out}");
    }

    let folder = std::env::temp_dir().join(unique("workflows-"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("refund.yaml"),
        "name: refund\nversion: 1\ndescription: d\nsteps:\n  - id: a\n    tool: refund\n",
    )
    .unwrap();
    let checked = sluice(&prefix)
        .args(["workflow", "check"])
        .arg(&folder)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success());
    let expected = format!(
        "{}:6:11: steps[0].tool: no tool named \"refund\"",
        folder.join("refund.yaml").display()
    );
    assert!(out.contains(&expected), "{out}");
    let _ = std::fs::remove_dir_all(folder);
}

#[tokio::test]
async fn the_registry_keeps_versions_per_tenant_and_turns_workflows_off_per_tenant() {
    use sluice_stores::postgres::{tenant_transaction, workflows};
    let prefix = unique("t");
    let alice = create_tenant(&prefix);
    let bob = create_tenant(&prefix);
    let (alice_id, bob_id) = (alice.uuid(), bob.uuid());
    let listed = |tenant: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(&run_cli(
            &prefix,
            &["workflow", "list", "--tenant", tenant, "--json"],
        ))
        .unwrap()
    };
    // `sluice setup` published the shipped workflows as built-in ones.
    let built_in = listed(&bob.name);
    let track = built_in
        .iter()
        .find(|e| e["name"] == "track_order")
        .unwrap();
    assert_eq!(track["own"], false);
    assert!(track["intents"]
        .as_array()
        .unwrap()
        .contains(&"track_order".into()));

    // Alice publishes her own track_order; it shadows the built-in one for her only.
    let folder = std::env::temp_dir().join(unique("registry-"));
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("track_order.yaml");
    let definition = |version: u32, reply: &str| {
        format!(
            "name: track_order\nversion: {version}\ndescription: Ours.\nintents: [track_order, parcel]\n\
             steps:\n  - id: done\n    end:\n      reply: {reply}\n"
        )
    };
    std::fs::write(&file, definition(1, "Ask us by phone.")).unwrap();
    let path = file.to_str().unwrap();
    let out = run_cli(
        &prefix,
        &["workflow", "publish", path, "--tenant", &alice.name],
    );
    assert!(out.contains("published track_order v1"), "{out}");
    let out = run_cli(
        &prefix,
        &["workflow", "publish", path, "--tenant", &alice.name],
    );
    assert!(out.contains("already published"), "{out}");
    // Other text under a published version is refused: versions never change.
    std::fs::write(&file, definition(1, "Changed.")).unwrap();
    let refused = sluice(&prefix)
        .args(["workflow", "publish", path, "--tenant", &alice.name])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("raise `version`"));
    std::fs::write(&file, definition(2, "Changed.")).unwrap();
    let out = run_cli(
        &prefix,
        &["workflow", "publish", path, "--tenant", &alice.name],
    );
    assert!(out.contains("published track_order v2"), "{out}");

    let mine = listed(&alice.name);
    let track = mine.iter().find(|e| e["name"] == "track_order").unwrap();
    assert_eq!(
        (track["own"].as_bool(), track["version"].as_i64()),
        (Some(true), Some(2))
    );
    let theirs = listed(&bob.name);
    let track = theirs.iter().find(|e| e["name"] == "track_order").unwrap();
    assert_eq!(track["own"], false, "Bob still has the built-in one");

    // Through the runtime role: Bob's transaction sees none of Alice's definitions.
    let app = sqlx::PgPool::connect(&app_database_url()).await.unwrap();
    let mut tx = tenant_transaction(&app, bob_id).await.unwrap();
    let hers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workflows WHERE tenant_id IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(hers, 0);
    let entry = workflows::for_intent(&mut tx, bob_id, "parcel")
        .await
        .unwrap();
    assert!(entry.is_none(), "only Alice's answers `parcel`");
    tx.rollback().await.unwrap();

    let mut tx = tenant_transaction(&app, alice_id).await.unwrap();
    let entry = workflows::for_intent(&mut tx, alice_id, "parcel")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (entry.name.as_str(), entry.version, entry.own),
        ("track_order", 2, true)
    );
    let (version, text) = workflows::definition(&mut tx, alice_id, "track_order", Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(version, 1);
    assert!(text.contains("Ask us by phone."));
    tx.rollback().await.unwrap();

    // Turned off for Alice, nothing answers her intent; Bob's built-in one is untouched.
    run_cli(
        &prefix,
        &[
            "workflow",
            "disable",
            "track_order",
            "--tenant",
            &alice.name,
        ],
    );
    let mut tx = tenant_transaction(&app, alice_id).await.unwrap();
    assert!(workflows::for_intent(&mut tx, alice_id, "track_order")
        .await
        .unwrap()
        .is_none());
    tx.rollback().await.unwrap();
    let mut tx = tenant_transaction(&app, bob_id).await.unwrap();
    assert!(workflows::for_intent(&mut tx, bob_id, "track_order")
        .await
        .unwrap()
        .is_some());
    tx.rollback().await.unwrap();
    // A workflow that calls the tenant's own tools is picked only once the tenant has them.
    let mut tx = tenant_transaction(&app, alice_id).await.unwrap();
    assert!(workflows::for_intent(&mut tx, alice_id, "create_order")
        .await
        .unwrap()
        .is_none());
    tx.rollback().await.unwrap();
    let admin = sqlx::PgPool::connect(&admin_database_url()).await.unwrap();
    for tool in [
        "reserve_stock",
        "release_stock",
        "charge_payment",
        "refund_payment",
    ] {
        sqlx::query(
            "INSERT INTO tools (tenant_id, name, kind, config) VALUES ($1, $2, 'http', '{}')",
        )
        .bind(alice_id)
        .bind(tool)
        .execute(&admin)
        .await
        .unwrap();
    }
    let mut tx = tenant_transaction(&app, alice_id).await.unwrap();
    let entry = workflows::for_intent(&mut tx, alice_id, "create_order")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.name, "create_order");
    tx.rollback().await.unwrap();
    let mut tx = tenant_transaction(&app, bob_id).await.unwrap();
    assert!(workflows::for_intent(&mut tx, bob_id, "create_order")
        .await
        .unwrap()
        .is_none());
    tx.rollback().await.unwrap();

    run_cli(
        &prefix,
        &["workflow", "enable", "track_order", "--tenant", &alice.name],
    );
    let mut tx = tenant_transaction(&app, alice_id).await.unwrap();
    assert!(workflows::for_intent(&mut tx, alice_id, "track_order")
        .await
        .unwrap()
        .is_some());
    tx.rollback().await.unwrap();
    let _ = std::fs::remove_dir_all(folder);
}
