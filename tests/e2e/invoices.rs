//! Invoices: usage priced by the version in force when it happened, a month closed into final
//! invoices numbered without gaps, late usage as the next invoice's adjustment, the preview
//! equal to what callers were told, and finance's exports — each read path also tried with
//! another tenant's credentials.

use serde_json::{json, Value};
use sluice_stores::{
    billing::{invoices, Period},
    clickhouse::usage::UsageRow,
    postgres, ClickHouse, ClickHouseConfig,
};
use sqlx::types::Uuid;

use crate::harness::*;

fn stores_clickhouse() -> ClickHouse {
    ClickHouse::new(&ClickHouseConfig {
        url: clickhouse_url(),
        ..Default::default()
    })
}

/// A usage fact of `tenant` for `model` at `at` (RFC 3339).
fn fact(tenant: &str, model: &str, at: &str, input: u64, output: u64, key: &str) -> UsageRow {
    let ms = chrono::DateTime::parse_from_rfc3339(at)
        .unwrap()
        .timestamp_millis();
    UsageRow {
        event_id: Uuid::new_v4().to_string(),
        request_id: Uuid::new_v4().to_string(),
        tenant_id: tenant.into(),
        model: model.into(),
        provider: "sim".into(),
        input_tokens: input,
        output_tokens: output,
        occurred_at: u32::try_from(ms / 1000).unwrap(),
        occurred_at_ms: ms,
        key_id: key.into(),
        user_id: String::new(),
        cached_input_tokens: 0,
        trace_id: String::new(),
        latency_ms: -1,
        outcome: String::new(),
    }
}

fn ms(at: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(at)
        .unwrap()
        .timestamp_millis()
}

async fn get_text(url: &str, token: &str) -> (u16, String) {
    let response = http().get(url).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A self-registered tenant admin: (tenant id, tenant name, access token).
async fn tenant_admin(sluice: &Sluice) -> (String, String, String) {
    let (_, session) = register_tenant_admin(sluice).await;
    let tenant_id = session["tenant_id"].as_str().unwrap().to_owned();
    let admin = sluice_stores::postgres::connect(&admin_database_url(), 1)
        .await
        .unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1::uuid")
        .bind(&tenant_id)
        .fetch_one(&admin)
        .await
        .unwrap();
    (
        tenant_id,
        name,
        session["access_token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_month_closes_at_the_prices_in_force_and_late_usage_is_adjusted_on_the_next_invoice() {
    let prefix = unique("t");
    let admin = postgres::connect(&admin_database_url(), 2).await.unwrap();
    let clickhouse = stores_clickhouse();
    let tenant = create_tenant(&prefix);
    let tenant_id = Uuid::parse_str(&tenant.id).unwrap();
    // A model and a plan of this test's own, priced in a month to come: $1/$2 per million
    // tokens, then $3/$6 from the 16th; the plan $20 a month with $5 of usage included.
    let model = unique("priced-");
    let plan = unique("plan-");
    let item = format!("model:{model}");
    let price_set = |item: &str, prices: &[&str], from: &str| {
        let mut args = vec!["price", "set", item];
        args.extend_from_slice(prices);
        args.extend_from_slice(&["--from", from]);
        run_cli(&prefix, &args);
    };
    price_set(
        &item,
        &["--input", "1", "--output", "2"],
        "2031-03-01T00:00:00Z",
    );
    price_set(
        &item,
        &["--input", "3", "--output", "6"],
        "2031-03-16T00:00:00Z",
    );
    run_cli(&prefix, &["plan", "create", &plan]);
    price_set(
        &format!("plan:{plan}"),
        &["--base-fee", "20", "--included", "5"],
        "2031-03-01T00:00:00Z",
    );
    run_cli(&prefix, &["tenant", "plan", &tenant.name, &plan]);
    // A tenant on the same plan, deleted before the month: it owes no fee for it.
    let gone = create_tenant(&prefix);
    run_cli(&prefix, &["tenant", "plan", &gone.name, &plan]);
    run_cli(&prefix, &["tenant", "delete", &gone.name]);
    // Adding the model to the catalogue, or saving it again, leaves the price book's versions
    // alone; a change of its catalogue price becomes a version from now (before the month's).
    let versions = || async {
        let admin = postgres::connect(&admin_database_url(), 1).await.unwrap();
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM price_versions WHERE item = $1")
            .bind(&item)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    // Priced far above the others, so that `auto` never picks it for anyone.
    let add_model = |price: &str| {
        run_cli(
            &prefix,
            &[
                "model",
                "add",
                &model,
                "--provider",
                "sim",
                "--input-price-micros",
                price,
                "--output-price-micros",
                price,
            ],
        );
    };
    add_model("900000000");
    add_model("900000000");
    assert_eq!(versions().await, 2);
    add_model("900000001");
    assert_eq!(versions().await, 3);
    run_cli(&prefix, &["model", "remove", &model]);
    // A price may not start in the past: that would re-price usage already billed.
    let refused = sluice(&prefix)
        .args([
            "price",
            "set",
            &item,
            "--input",
            "9",
            "--from",
            "2020-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot start before now"));

    let march = [
        fact(
            &tenant.id,
            &model,
            "2031-03-10T12:00:00Z",
            1_000_000,
            500_000,
            "k1",
        ),
        fact(
            &tenant.id,
            &model,
            "2031-03-15T23:59:59.999Z",
            1_000_000,
            0,
            "k1",
        ),
        fact(
            &tenant.id,
            &model,
            "2031-03-16T00:00:00Z",
            500_000,
            500_000,
            "k2",
        ),
        // April's: not March's invoice.
        fact(&tenant.id, &model, "2031-04-01T00:00:00Z", 7, 7, "k1"),
    ];
    clickhouse
        .insert_rows("usage_events", &march)
        .await
        .unwrap();

    let period = Period::parse("2031-03").unwrap();
    // Closes `month` for this tenant as if it were `now`.
    let close = |month: Period, now: &'static str| {
        let (admin, clickhouse) = (admin.clone(), clickhouse.clone());
        async move {
            invoices::run(
                &admin,
                &clickhouse,
                month,
                "default",
                Some(tenant_id),
                ms(now),
                |_, _| {},
            )
            .await
        }
    };
    // A month that has not ended cannot close.
    let early = close(period, "2031-03-31T00:00:00Z").await;
    assert!(early.is_err());
    let report = close(period, "2031-04-02T00:00:00Z").await.unwrap();
    assert_eq!(report.written.len(), 1, "{report:?}");
    let invoice = &report.written[0];
    let json = invoice.to_json();
    // 2M input + 0.5M output at $1/$2 = $3.00; 0.5M + 0.5M at $3/$6 = $4.50; $7.50 of usage,
    // $5 included; $20 base fee: $22.50.
    let amounts: Vec<(String, String)> = json["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().to_owned(),
                l["amount"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        amounts,
        [
            ("base_fee".into(), "20.00".into()),
            ("usage".into(), "3.00".into()),
            ("usage".into(), "4.50".into()),
            ("included_usage".into(), "-5.00".into()),
        ],
        "{json:#}"
    );
    assert_eq!(json["total"], "22.50");
    assert_eq!(json["overage"], "2.50");
    assert_eq!(json["lines"][1]["model"], model.as_str());
    assert_eq!(json["lines"][1]["input_tokens"], 2_000_000);
    assert_ne!(
        json["lines"][1]["price_version_id"],
        json["lines"][2]["price_version_id"]
    );

    let gone_id = Uuid::parse_str(&gone.id).unwrap();
    let gone_report = invoices::run(
        &admin,
        &clickhouse,
        period,
        "default",
        Some(gone_id),
        ms("2031-04-02T00:00:00Z"),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (gone_report.written.len(), gone_report.nothing_to_bill),
        (0, 1)
    );

    // Idempotent: running the month again writes nothing.
    let again = close(period, "2031-04-02T00:00:00Z").await.unwrap();
    assert!(again.written.is_empty());
    assert_eq!(again.already_invoiced, 1);

    // Final: neither the invoice nor its lines can change.
    let id = invoice.id.unwrap();
    let changed = sqlx::query("UPDATE invoices SET total_minor = 0 WHERE id = $1")
        .bind(id)
        .execute(&admin)
        .await;
    assert!(changed
        .unwrap_err()
        .to_string()
        .contains("invoices are final"));
    let removed = sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
        .bind(id)
        .execute(&admin)
        .await;
    assert!(removed.is_err());

    // Usage of March that arrives after its invoice goes on April's, as an adjustment, at
    // March's price; the invoice for March stays as it was.
    clickhouse
        .insert_rows(
            "usage_events",
            &[fact(
                &tenant.id,
                &model,
                "2031-03-20T00:00:00Z",
                1_000_000,
                0,
                "k2",
            )],
        )
        .await
        .unwrap();
    let april = close(period.next(), "2031-05-02T00:00:00Z").await.unwrap();
    let april = april.written[0].to_json();
    let adjustments: Vec<&Value> = april["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["adjustment"] == true)
        .collect();
    assert_eq!(adjustments.len(), 1, "{april:#}");
    assert_eq!(adjustments[0]["for_period"], "2031-03");
    assert_eq!(adjustments[0]["amount"], "3.00");
    assert_eq!(adjustments[0]["input_tokens"], 1_000_000);
    let mut conn = admin.acquire().await.unwrap();
    let march_again = invoices::get(&mut conn, invoice.number.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(march_again.to_json()["total"], "22.50");
    assert_eq!(march_again.lines, invoice.lines);
    // The hourly and daily rollups hold what the facts hold.
    assert_rollups_equal_facts(&tenant.id).await;
    // Numbers follow each other without a gap.
    let seq = |n: &str| n.trim_start_matches("INV-").parse::<i64>().unwrap();
    assert!(seq(april["number"].as_str().unwrap()) > seq(invoice.number.as_deref().unwrap()));
    let numbers: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM invoices WHERE issuer_id = 'default' ORDER BY sequence",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in {numbers:?}"
    );
    assert_eq!(numbers.first(), Some(&1));
}

#[tokio::test]
async fn the_preview_equals_what_callers_were_told_and_exports_are_walled_off() {
    let prefix = unique("t");
    let sluice = Sluice::start();
    let (tenant_id, tenant_name, admin_token) = tenant_admin(&sluice).await;
    let (_, _, other_token) = tenant_admin(&sluice).await;
    // A key of the tenant, made by its admin, calls the model.
    let (key_id, key) = create_key(&sluice, &admin_token, "finance-test").await;

    let (mut told_in, mut told_out) = (0i64, 0i64);
    for i in 0..3 {
        let (status, body) = chat(&sluice, &key, json!({"model": "sim-small", "max_tokens": 5, "messages": [{"role": "user", "content": format!("bill me {i}")}]})).await;
        assert_eq!(status, 200, "{body}");
        told_in += body["usage"]["prompt_tokens"].as_i64().unwrap();
        told_out += body["usage"]["completion_tokens"].as_i64().unwrap();
    }
    // The preview (API) reaches what callers were told, to the token, and prices it at the
    // version in force.
    let preview = eventually(30, "the preview to count every request", || async {
        let (status, preview) = get_json(&sluice.v1("/invoices/preview"), &admin_token).await;
        assert_eq!(status, 200, "{preview}");
        let line = preview["lines"]
            .as_array()?
            .iter()
            .find(|l| l["model"] == "sim-small")?
            .clone();
        (line["input_tokens"] == told_in && line["output_tokens"] == told_out).then_some(preview)
    })
    .await;
    assert_eq!(preview["status"], "preview");
    assert_eq!(preview["currency"], "USD");
    let (exact, rounded) = sim_small_amounts(told_in as u64, told_out as u64).await;
    let line = preview["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["model"] == "sim-small")
        .unwrap();
    assert_eq!(
        (&line["exact_amount"], &line["amount"]),
        (&json!(exact), &json!(rounded))
    );
    // The CLI's preview says the same.
    let cli: Value = serde_json::from_str(&run_cli(
        &prefix,
        &["invoices", "preview", &tenant_name, "--json"],
    ))
    .unwrap();
    assert_eq!(cli["total"], preview["total"]);
    assert_eq!(cli["lines"], preview["lines"]);

    // Usage per key, model and day, as CSV: this key's three requests.
    let (status, csv) = get_text(&sluice.v1("/invoices/usage"), &admin_token).await;
    assert_eq!(status, 200, "{csv}");
    assert!(
        csv.starts_with("\u{feff}day,key_id,model,requests"),
        "{csv}"
    );
    let row = csv
        .lines()
        .find(|l| l.contains(&key_id))
        .unwrap_or_else(|| panic!("{csv}"));
    assert!(row.contains(",sim-small,3,"), "{row}");

    // Another tenant's admin sees none of it, and an API key cannot read invoices at all.
    let (status, other) = get_json(&sluice.v1("/invoices/preview"), &other_token).await;
    assert_eq!(status, 200);
    assert_eq!(other["lines"], json!([]), "{other}");
    assert_eq!(other["total"], "0.00");
    let (_, other_csv) = get_text(&sluice.v1("/invoices/usage"), &other_token).await;
    assert!(!other_csv.contains(&key_id));
    let (status, refused) = get_json(&sluice.v1("/invoices"), &key).await;
    assert_eq!(status, 403, "{refused}");
    assert!(refused["error"]["message"].is_string());

    // A closed month through the CLI: last month's usage of this tenant, written late into
    // the facts, invoiced; the tenant's admin reads it as JSON and CSV, the other tenant
    // cannot, and a platform admin's export of the month lists it.
    let last_month = Period::containing(sluice_pipelines::now_ms()).previous();
    let at = chrono::DateTime::from_timestamp_millis(last_month.start_ms() + 3_600_000)
        .unwrap()
        .to_rfc3339();
    stores_clickhouse()
        .insert_rows(
            "usage_events",
            &[fact(
                &tenant_id,
                "sim-small",
                &at,
                2_000_000,
                1_000_000,
                &key_id,
            )],
        )
        .await
        .unwrap();
    let out = run_cli(
        &prefix,
        &[
            "invoices",
            "run",
            "--period",
            &last_month.to_string(),
            "--tenant",
            &tenant_name,
        ],
    );
    assert!(out.contains("1 invoices written"), "{out}");
    let (status, list) = get_json(&sluice.v1("/invoices"), &admin_token).await;
    assert_eq!(status, 200, "{list}");
    let number = list["data"][0]["number"].as_str().unwrap().to_owned();
    assert_eq!(list["data"][0]["period"], last_month.to_string());
    assert_eq!(list["data"][0]["lines"][0]["input_tokens"], 2_000_000);
    let (status, one) = get_json(&sluice.v1(&format!("/invoices/{number}")), &admin_token).await;
    assert_eq!((status, &one["total"]), (200, &list["data"][0]["total"]));
    let (status, csv) = get_text(
        &sluice.v1(&format!("/invoices/{number}?format=csv")),
        &admin_token,
    )
    .await;
    assert_eq!(status, 200);
    assert!(csv.contains(&number) && csv.contains("\r\n"), "{csv}");
    let (status, _) = get_json(&sluice.v1(&format!("/invoices/{number}")), &other_token).await;
    assert_eq!(status, 404);
    let (status, other_list) = get_json(&sluice.v1("/invoices"), &other_token).await;
    assert_eq!(
        (status, other_list["data"].as_array().unwrap().len()),
        (200, 0)
    );
    let (status, bad) = get_json(&sluice.v1("/invoices/export?period=2026-13"), &admin_token).await;
    assert_eq!(status, 400, "{bad}");
    let (status, bad) = get_json(&sluice.v1("/invoices/preview?format=xml"), &admin_token).await;
    assert_eq!(
        (status, &bad["error"]["param"]),
        (400, &json!("format")),
        "{bad}"
    );
    let (status, bad) = get_json(
        &sluice.v1("/invoices/usage?start=2026-12-05&end=2026-12-01"),
        &admin_token,
    )
    .await;
    assert_eq!(status, 400, "{bad}");

    // The same invoice through the CLI: shown as JSON and CSV, in the month's export, and the
    // usage export with this key's row.
    let shown: Value =
        serde_json::from_str(&run_cli(&prefix, &["invoices", "show", &number, "--json"])).unwrap();
    assert_eq!(shown["total"], one["total"]);
    let shown_csv = run_cli(&prefix, &["invoices", "show", &number, "--csv"]);
    assert!(
        shown_csv.starts_with("\u{feff}invoice_number,"),
        "{shown_csv}"
    );
    assert!(shown_csv.contains(&number));
    let period = last_month.to_string();
    let exported = run_cli(
        &prefix,
        &[
            "invoices",
            "export",
            "--period",
            &period,
            "--tenant",
            &tenant_name,
        ],
    );
    assert!(exported.contains(&number), "{exported}");
    let usage_csv = run_cli(&prefix, &["invoices", "usage", &tenant_name]);
    assert!(usage_csv.contains(&key_id), "{usage_csv}");
    // Refusals: a currency change once invoices exist, an issuer nobody set up.
    let refused = |args: &[&str], says: &str| {
        let out = crate::harness::sluice(&prefix).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    };
    refused(
        &["price", "currency", "EUR"],
        "cannot change once invoices exist",
    );
    refused(
        &[
            "invoices",
            "run",
            "--period",
            &period,
            "--issuer",
            "nobody",
            "--tenant",
            &tenant_name,
        ],
        "no invoice issuer",
    );
    let platform = platform_admin_session(&sluice).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, all) = get_text(
        &sluice.v1(&format!("/invoices/export?period={last_month}")),
        &platform,
    )
    .await;
    assert_eq!(status, 200, "{all}");
    assert!(all.contains(&number), "{all}");
    let (_, own) = get_text(
        &sluice.v1(&format!("/invoices/export?period={last_month}")),
        &other_token,
    )
    .await;
    assert!(!own.contains(&number));
}

#[tokio::test]
async fn reconcile_finds_the_sources_agreeing_then_a_planted_fact_everywhere_it_shows() {
    let sluice = Sluice::start();
    let tenant = create_tenant(&sluice.prefix);
    let codec = sluice_schemas::Codec::new(
        sluice_schemas::RegistryClient::new(&sluice.registry_url).unwrap(),
    );
    codec
        .register::<sluice_schemas::UsageEvent>()
        .await
        .unwrap();
    // Last month's usage, on this instance's usage topic as orchestrators write it.
    let month = Period::containing(sluice_pipelines::now_ms()).previous();
    let at = month.start_ms() + 3 * 3_600_000;
    let events: Vec<sluice_schemas::UsageEvent> = (0..4)
        .map(|i| sluice_schemas::UsageEvent {
            occurred_at_ms: at + i * 1_000,
            input_tokens: 100 + i,
            output_tokens: 10,
            ..usage_event(format!("{}-{i}", sluice.prefix), &tenant.id)
        })
        .collect();
    let records = events
        .iter()
        .map(|e| (tenant.id.clone(), codec.encode(e).unwrap()));
    produce_all(&sluice.topic("usage"), records).await;
    // The facts and the per-minute rollup (its window closes once the partition is quiet).
    eventually(60, "the facts and the rollup", || async {
        let (facts, rolled): (u64, u64) = clickhouse()
            .query(
                "SELECT (SELECT count() FROM usage_events FINAL WHERE tenant_id = ?), \
                        (SELECT sum(requests) FROM tenant_usage_1m FINAL WHERE tenant_id = ?)",
            )
            .bind(&tenant.id)
            .bind(&tenant.id)
            .fetch_one()
            .await
            .ok()?;
        (facts == 4 && rolled == 4).then_some(())
    })
    .await;
    let period = month.to_string();
    // The tenant listens for finalized invoices (an endpoint made as the owner: this tenant
    // has no admin user).
    let receiver = WebhookReceiver::start().await;
    let secret = "whsec_invoice-test-secret";
    let admin = postgres::connect(&admin_database_url(), 1).await.unwrap();
    sqlx::query(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, events) \
         VALUES ($1, $2::uuid, $3, $4, ARRAY['invoice.finalized'])",
    )
    .bind(Uuid::new_v4())
    .bind(&tenant.id)
    .bind(&receiver.url)
    .bind(secret)
    .execute(&admin)
    .await
    .unwrap();
    let run_invoices = || {
        sluice.cli(&[
            "invoices",
            "run",
            "--period",
            &period,
            "--tenant",
            &tenant.name,
        ])
    };
    let out = run_invoices();
    assert!(
        out.contains("1 invoice.finalized notifications sent"),
        "{out}"
    );
    let told = eventually(30, "invoice.finalized", || async {
        let got = receiver.of_type("invoice.finalized");
        (!got.is_empty()).then_some(got)
    })
    .await;
    verify_signature(&told[0], secret);
    let event = told[0].json();
    assert_eq!(event["data"]["period"], period.as_str(), "{event}");
    assert_eq!(event["data"]["status"], "final");
    assert_eq!(event["data"]["tenant_id"], tenant.id.as_str());
    assert_eq!(
        event["id"],
        format!(
            "invoice.finalized:{}",
            event["data"]["id"].as_str().unwrap()
        )
    );
    // Run again (nothing new to write): it tells of the invoice again, and the endpoint still
    // gets it once.
    let out = run_invoices();
    assert!(
        out.contains("1 invoice.finalized notifications sent"),
        "{out}"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(receiver.of_type("invoice.finalized").len(), 1);
    let reconcile = [
        "invoices",
        "reconcile",
        "--period",
        &period,
        "--tenant",
        &tenant.name,
    ];
    let run = |args: &[&str]| {
        let output = crate::harness::sluice(&sluice.prefix)
            .env("SLUICE_REGISTRY__URL", &sluice.registry_url)
            .args(args)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success(), out)
    };
    let (agreed, out) = run(&reconcile);
    assert!(agreed && out.trim() == "differences=0", "{out}");

    // A fact that never was on the topic: the facts disagree with the topic, the rollup and
    // the invoice (which the next invoice adjusts), and the command fails.
    stores_clickhouse()
        .insert_rows(
            "usage_events",
            &[fact(
                &tenant.id,
                "sim-small",
                &chrono::DateTime::from_timestamp_millis(at)
                    .unwrap()
                    .to_rfc3339(),
                7,
                7,
                "",
            )],
        )
        .await
        .unwrap();
    let (agreed, out) = run(&reconcile);
    assert!(!agreed, "{out}");
    assert_eq!(out.lines().last(), Some("differences=3"), "{out}");
    for source in ["topic/facts", "facts/rollup", "facts/invoices"] {
        assert!(out.contains(source), "{source}: {out}");
    }
}
