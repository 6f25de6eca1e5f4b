//! The billing commands: `sluice price` (the price book) and `sluice invoices` (runs,
//! previews, reading and exporting invoices). Operators' commands: they connect as the owner.

use std::io::Write;

use anyhow::Context;
use sluice_stores::{
    billing::{
        csv, invoices,
        money::{micros_text, parse_micros},
        prices::{self, NewPrice},
        Invoice, Period,
    },
    postgres, ClickHouse,
};

use crate::{admin::tenant_named, config::Config, InvoicesCommand, PriceCommand};

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
        InvoicesCommand::Usage { tenant, from, to } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let day = |text: Option<String>, default: i64| -> anyhow::Result<i64> {
                match text {
                    None => Ok(default),
                    Some(text) => chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
                        .ok()
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                        .map(|t| t.and_utc().timestamp_millis())
                        .with_context(|| format!("{text:?} is not a day (YYYY-MM-DD)")),
                }
            };
            let from_ms = day(from, Period::containing(now_ms).start_ms())?;
            let to_ms = day(to, (now_ms / 86_400_000 + 1) * 86_400_000)?;
            if from_ms >= to_ms {
                anyhow::bail!("--from must be before --to");
            }
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
