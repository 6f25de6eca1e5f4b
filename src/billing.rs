//! The billing commands: `sluice price` (the price book), `sluice budget` (monthly spend
//! budgets) and `sluice invoices` (runs, previews, reading and exporting invoices, reconciling
//! a month's sources). Operators' commands: they connect as the owner.

use std::{
    collections::HashSet,
    io::Write,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use sluice_pipelines::{kafka, trace::TraceContext, Emitter};
use sluice_schemas::{Notification, UsageEvent};
use sluice_stores::{
    billing::{
        budgets, csv, invoices,
        money::{micros_text, parse_micros},
        prices::{self, NewPrice},
        reconcile::{differences, ByModel, Counts, Sources},
        Invoice, Period,
    },
    clickhouse::usage,
    postgres, ClickHouse,
};

use crate::{admin::tenant_named, config::Config, BudgetCommand, InvoicesCommand, PriceCommand};

pub async fn budget(config: Config, command: BudgetCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let mut conn = admin.acquire().await?;
    match command {
        BudgetCommand::Set {
            tenant,
            amount,
            key,
            alert,
        } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let budget = budgets::Budget::new(parse_micros(&amount)?, alert)?;
            budgets::set(&mut conn, tenant.id, key, budget).await?;
            let whose =
                key.map_or_else(|| format!("tenant {}", tenant.name), |k| format!("key {k}"));
            let alert = budget
                .alert_percent
                .map_or_else(String::new, |p| format!(", alerting at {p}%"));
            println!("monthly spend budget of {whose}: {amount}{alert}");
        }
        BudgetCommand::Remove { tenant, key } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            if !budgets::remove(&mut conn, tenant.id, key).await? {
                anyhow::bail!("there is no such budget");
            }
            println!("budget removed");
        }
        BudgetCommand::List { tenant, json } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let clickhouse = ClickHouse::new(&config.clickhouse);
            let report = budgets::report(
                &mut conn,
                &clickhouse,
                tenant.id,
                sluice_pipelines::now_ms(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            }
            println!("{} in {}", report.month, report.currency);
            for b in &report.budgets {
                let whose = b
                    .key_id
                    .map_or_else(|| "tenant".to_owned(), |k| format!("key {k}"));
                let alert = b
                    .alert_percent
                    .map_or_else(|| "-".to_owned(), |p| format!("{p}%"));
                let state = if b.exhausted {
                    "exhausted"
                } else if b.alerting {
                    "alerting"
                } else {
                    "ok"
                };
                println!(
                    "{whose:<42} budget {:>12}  spent {:>12}  left {:>12}  alert {alert:>4}  {state}",
                    b.monthly, b.spent, b.remaining
                );
            }
        }
    }
    Ok(())
}

pub async fn price(config: Config, command: PriceCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        PriceCommand::Set {
            item,
            input,
            output,
            cached_input,
            per_unit,
            base_fee,
            included,
            from,
        } => {
            let valid_from_ms = from
                .map(|text| {
                    chrono::DateTime::parse_from_rfc3339(&text)
                        .map(|t| t.timestamp_millis())
                        .with_context(|| format!("--from {text:?} is not an RFC 3339 time"))
                })
                .transpose()?;
            let per_unit = parse_micros(&per_unit)?;
            let base_fee = parse_micros(&base_fee)?;
            if per_unit > 0 && base_fee > 0 {
                anyhow::bail!("give --per-unit (tools, workflows) or --base-fee (plans), not both");
            }
            let version = prices::add(
                &admin,
                &NewPrice {
                    item,
                    input_per_mtok: parse_micros(&input)?,
                    output_per_mtok: parse_micros(&output)?,
                    cached_input_per_mtok: parse_micros(&cached_input)?,
                    per_unit: per_unit.max(base_fee),
                    included: parse_micros(&included)?,
                    valid_from_ms,
                },
            )
            .await?;
            println!(
                "price version {} of {} in force from {}",
                version.id,
                version.item,
                time_text(version.valid_from_ms)
            );
        }
        PriceCommand::List { item, json } => {
            for v in prices::list(&admin, item.as_deref()).await? {
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    println!(
                        "{:>6}  {:<28} from {}  in {:>8} out {:>8} cached {:>8} per unit {:>8} included {:>8}",
                        v.id,
                        v.item,
                        time_text(v.valid_from_ms),
                        micros_text(v.input_per_mtok),
                        micros_text(v.output_per_mtok),
                        micros_text(v.cached_input_per_mtok),
                        micros_text(v.per_unit),
                        micros_text(v.included),
                    );
                }
            }
        }
        PriceCommand::Currency { code } => match code {
            Some(code) => println!(
                "billing currency: {}",
                prices::set_currency(&admin, &code).await?
            ),
            None => {
                let mut conn = admin.acquire().await?;
                println!(
                    "{}",
                    sluice_stores::billing::PriceBook::load(&mut conn)
                        .await?
                        .currency
                );
            }
        },
    }
    Ok(())
}

/// Puts `invoice.finalized` on the notifications topic for each of `finalized`, with the
/// invoice as its data; the event id is the invoice's, so one told of twice is delivered once.
async fn notify_finalized(config: &Config, finalized: &[Invoice]) -> anyhow::Result<usize> {
    if finalized.is_empty() {
        return Ok(0);
    }
    let topic = config.kafka.topics().notifications;
    kafka::ensure_topics(&config.kafka, &[&topic]).await?;
    let codec = crate::process::codec(config)?;
    codec.register::<Notification>().await?;
    let producers = kafka::Producers::new(&config.kafka)?;
    let mut out = Emitter::new(
        producers.get(kafka::ProducerProfile::Throughput).clone(),
        codec,
        TraceContext::new_root(),
    );
    let now_ms = sluice_pipelines::now_ms();
    for invoice in finalized {
        let Some(id) = invoice.id else { continue };
        let record = Notification {
            event_id: format!("invoice.finalized:{id}"),
            tenant_id: invoice.tenant_id.to_string(),
            kind: "invoice.finalized".into(),
            occurred_at_ms: invoice.finalized_at_ms.unwrap_or(now_ms),
            data_json: invoice.to_json().to_string(),
        };
        out.emit(&topic, None, record.tenant_id.as_bytes(), &record)
            .await?;
    }
    out.flush().await?;
    Ok(finalized.len())
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

pub async fn invoices(config: Config, command: InvoicesCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let clickhouse = ClickHouse::new(&config.clickhouse);
    let now_ms = sluice_pipelines::now_ms();
    match command {
        InvoicesCommand::Run {
            period,
            issuer,
            tenant,
        } => {
            let period = Period::parse(&period)?;
            let only = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?.id),
                None => None,
            };
            let mut last_shown = std::time::Instant::now();
            let report = invoices::run(
                &admin,
                &clickhouse,
                period,
                &issuer,
                only,
                now_ms,
                |done, all| {
                    if done == all || last_shown.elapsed().as_secs() >= 1 {
                        eprintln!("invoicing {period}: {done}/{all} tenants");
                        last_shown = std::time::Instant::now();
                    }
                },
            )
            .await?;
            for invoice in &report.written {
                println!(
                    "{}  {:<30} {:>14} {}",
                    invoice.number.as_deref().unwrap_or("-"),
                    invoice.tenant_name,
                    invoice.total().decimal(invoice.currency),
                    invoice.currency
                );
            }
            println!(
                "{period}: {} invoices written, {} tenants already invoiced, {} with nothing to bill",
                report.written.len(),
                report.already_invoiced,
                report.nothing_to_bill
            );
            if report.unpriced_lines > 0 {
                eprintln!(
                    "warning: {} usage lines had no price in force and were billed at zero (see `sluice price list`)",
                    report.unpriced_lines
                );
            }
            if !report.unknown_tenants.is_empty() {
                eprintln!(
                    "warning: usage of {} tenant ids that are not tenants here was not invoiced (e.g. {})",
                    report.unknown_tenants.len(),
                    report.unknown_tenants[0]
                );
            }
            // Every final invoice of the month, not only today's: a run that stopped between
            // writing invoices and telling of them tells of them now (each once per endpoint).
            let mut conn = admin.acquire().await?;
            let finalized: Vec<Invoice> = invoices::all_of_period(&mut conn, period)
                .await?
                .into_iter()
                .filter(|i| only.is_none_or(|t| i.tenant_id == t))
                .collect();
            let told = notify_finalized(&config, &finalized).await.context(
                "the invoices are written, but telling webhooks of them failed; run again to retry",
            )?;
            println!("{period}: {told} invoice.finalized notifications sent");
        }
        InvoicesCommand::Preview { tenant, json } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let mut conn = admin.acquire().await?;
            let invoice = invoices::preview(&mut conn, &clickhouse, tenant.id, now_ms).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&invoice.to_json())?);
            } else {
                print_invoice(&invoice);
            }
        }
        InvoicesCommand::List { period, tenant } => {
            let period = period.as_deref().map(Period::parse).transpose()?;
            let tenant = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?.id),
                None => None,
            };
            let mut conn = admin.acquire().await?;
            for invoice in invoices::list(&mut conn, period).await? {
                if tenant.is_some_and(|t| t != invoice.tenant_id) {
                    continue;
                }
                println!(
                    "{}  {}  {:<30} {:>14} {}",
                    invoice.number.as_deref().unwrap_or("-"),
                    invoice.period,
                    invoice.tenant_name,
                    invoice.total().decimal(invoice.currency),
                    invoice.currency
                );
            }
        }
        InvoicesCommand::Show { invoice, json, csv } => {
            let mut conn = admin.acquire().await?;
            let found = invoices::get(&mut conn, &invoice)
                .await?
                .with_context(|| format!("no invoice {invoice:?}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found.to_json())?);
            } else if csv {
                write_out(&csv::invoice_lines(std::slice::from_ref(&found)))?;
            } else {
                print_invoice(&found);
            }
        }
        InvoicesCommand::Export { period, tenant } => {
            let period = Period::parse(&period)?;
            let tenant = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?.id),
                None => None,
            };
            let mut conn = admin.acquire().await?;
            let mut all = invoices::list(&mut conn, Some(period)).await?;
            all.retain(|i| tenant.is_none_or(|t| t == i.tenant_id));
            write_out(&csv::invoice_lines(&all))?;
        }
        InvoicesCommand::Reconcile {
            period,
            tenant,
            no_rollup,
        } => {
            let period = Period::parse(&period)?;
            let tenant = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?.id),
                None => None,
            };
            let found = reconcile(&config, &admin, &clickhouse, period, tenant, !no_rollup).await?;
            for difference in &found {
                println!("{difference}");
            }
            println!("differences={}", found.len());
            if !found.is_empty() {
                std::process::exit(1);
            }
        }
        InvoicesCommand::Usage { tenant, from, to } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let (from_ms, to_ms) =
                sluice_stores::billing::period::day_range(from.as_deref(), to.as_deref(), now_ms)?;
            let mut conn = admin.acquire().await?;
            let (currency, days) =
                invoices::usage_by_key_model_day(&mut conn, &clickhouse, tenant.id, from_ms, to_ms)
                    .await?;
            write_out(&csv::usage_days(currency, &days))?;
        }
    }
    Ok(())
}

fn write_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_invoice(invoice: &Invoice) {
    let c = invoice.currency;
    let value = invoice.to_json();
    println!(
        "{} {} for {} ({}), plan {}",
        if invoice.id.is_some() {
            "Invoice"
        } else {
            "Preview"
        },
        invoice.number.as_deref().unwrap_or("(not final)"),
        invoice.tenant_name,
        invoice.period,
        invoice.plan.as_deref().unwrap_or("none")
    );
    for line in &invoice.lines {
        println!(
            "  {:<16} {:>14} {c}  {}",
            line.kind.as_str(),
            line.amount.decimal(c),
            line.description
        );
    }
    println!(
        "  {:<16} {:>14} {c}  (usage {}, included {}, overage {})",
        "total",
        value["total"].as_str().unwrap_or(""),
        value["usage"].as_str().unwrap_or(""),
        value["included_usage"].as_str().unwrap_or(""),
        value["overage"].as_str().unwrap_or("")
    );
}

/// Reads the four sources of `period`'s usage (each event id once from the topic) and returns
/// their differences.
async fn reconcile(
    config: &Config,
    admin: &sqlx::PgPool,
    clickhouse: &ClickHouse,
    period: Period,
    tenant: Option<sqlx::types::Uuid>,
    with_rollup: bool,
) -> anyhow::Result<Vec<String>> {
    let (from_ms, to_ms) = (period.start_ms(), period.end_ms());
    let only = tenant.map(|t| t.to_string());
    let mut sources = Sources::default();

    // The topic: every record it still holds (from its start: brokers' timestamp lookups are
    // not all to be trusted), each event id once, those of the month counted.
    let codec = crate::process::codec(config)?;
    let topic = config.kafka.topics().usage.clone();
    // (event ids seen, counts per tenant and model, records that did not decode)
    type Scanned = (HashSet<(String, String)>, ByModel, u64);
    let scanned: Arc<Mutex<Scanned>> = Arc::default();
    sluice_pipelines::replay::scan(&config.kafka, &topic, 0, i64::MAX, |payload| {
        let (codec, scanned, only) = (codec.clone(), scanned.clone(), only.clone());
        async move {
            let decoded = codec.decode::<UsageEvent>(&payload).await;
            let Ok(mut state) = scanned.lock() else {
                return;
            };
            let (seen, topic, undecodable) = &mut *state;
            let Ok(event) = decoded else {
                *undecodable += 1;
                return;
            };
            let in_month = event.occurred_at_ms >= from_ms && event.occurred_at_ms < to_ms;
            // Calls that failed before producing anything are not usage.
            let wanted = event.billable && only.as_deref().is_none_or(|t| t == event.tenant_id);
            if in_month && wanted && seen.insert((event.tenant_id.clone(), event.event_id.clone()))
            {
                topic
                    .entry((event.tenant_id, event.model))
                    .or_default()
                    .add(1, event.input_tokens, event.output_tokens);
            }
        }
    })
    .await?;
    let (_, topic_counts, undecodable) = std::mem::take(
        &mut *scanned
            .lock()
            .map_err(|_| anyhow::anyhow!("the topic scan failed"))?,
    );
    sources.topic = topic_counts;
    if undecodable > 0 {
        eprintln!("warning: {undecodable} records of {topic} did not decode (see the DLQ)");
    }

    for row in usage::totals_by_tenant_and_model(
        clickhouse,
        from_ms,
        to_ms,
        only.as_deref(),
        usage::Rows::Deduplicated,
    )
    .await?
    {
        sources
            .facts
            .entry((row.tenant_id, row.model))
            .or_default()
            .add(
                count(row.requests),
                count(row.input_tokens),
                count(row.output_tokens),
            );
    }
    if with_rollup {
        let mut rollup = std::collections::BTreeMap::new();
        for row in usage::rollup_by_tenant(clickhouse, from_ms, to_ms, only.as_deref()).await? {
            let counts: &mut Counts = rollup.entry(row.tenant_id).or_default();
            counts.add(count(row.requests), row.input_tokens, row.output_tokens);
        }
        sources.rollup = Some(rollup);
    }
    let mut conn = admin.acquire().await?;
    let billed = invoices::billed_for_period(&mut conn, period, tenant).await?;
    for (tenant, model, q) in billed.usage {
        sources
            .invoiced
            .entry((tenant.to_string(), model))
            .or_default()
            .add(q.requests, q.input_tokens, q.output_tokens);
    }
    sources.invoiced_tenants = billed.tenants.iter().map(ToString::to_string).collect();
    sources.closed = billed.closed;
    Ok(differences(&sources))
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
