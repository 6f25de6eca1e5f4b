//! `sluice bench invoices`: an invoice run over many usage events of many tenants, against one
//! plain ClickHouse `GROUP BY` over the same rows.
//!
//! It makes its own tenants and fills one month of the distant past with their usage facts
//! (inside ClickHouse, `INSERT … SELECT … FROM numbers(n)`), merges the closed month into one
//! part as the metering stage does (not timed; printed), then times the limit — `SELECT
//! tenant_id, model, count(), sum(…) … GROUP BY tenant_id, model` over that month as a user
//! would write it by hand (median of three, after one untimed warm-up; the same with `FINAL`,
//! which exact billing reads through, is printed beside it) — and
//! `sluice invoices run` for that month: reading the price book, what earlier invoices billed,
//! the facts sliced at price changes, and writing every final invoice with its lines. It checks
//! that the invoices add up to the usage priced independently, removes its facts and tenants
//! (the invoices stay: they are final), and prints `ratio=<run time ÷ GROUP BY time>` last.

use std::time::{Duration, Instant};

use anyhow::Context;
use sluice_stores::{
    billing::{invoices, money::Exact, Period, PriceBook},
    clickhouse::usage::{self, Rows},
    postgres, ClickHouse,
};
use sqlx::types::Uuid;

use crate::config::Config;

/// What to run.
pub struct InvoiceBenchOptions {
    pub events: u64,
    pub tenants: u64,
}

/// The models the facts use: four fifths of the events on the first.
const MODELS: [&str; 2] = ["sim-small", "sim-large"];

pub async fn run(config: &Config, options: &InvoiceBenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        options.tenants > 0 && options.events > 0,
        "--tenants and --events must be positive"
    );
    let admin = postgres::connect(&config.postgres.admin_url, 4).await?;
    let clickhouse = ClickHouse::new(&config.clickhouse);
    let id = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..10]);
    // A month of the distant past that nothing else bills: its facts are this run's alone
    // and are dropped with their partition at the end.
    let seed = u32::from_str_radix(&id[6..10], 16).unwrap_or(0);
    let period = Period::parse(&format!("{}-{:02}", 1980 + seed % 20, 1 + (seed / 20) % 12))?;
    println!(
        "invoices: {} usage events of {} tenants in {period} (tenants {id}-*)",
        options.events, options.tenants
    );
    let tenants: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tenants (name) SELECT $1 || '-' || g FROM generate_series(1, $2::bigint) g RETURNING id",
    )
    .bind(&id)
    .bind(i64::try_from(options.tenants)?)
    .fetch_all(&admin)
    .await?;
    let outcome = measure(&admin, &clickhouse, &id, period, &tenants, options).await;
    // Leave nothing but the invoices (final by design) behind.
    let partition = period.yyyymm();
    if let Err(e) = usage::drop_month(&clickhouse, partition).await {
        eprintln!("warning: could not drop the benchmark's facts (partition {partition}): {e}");
    }
    sqlx::query("DELETE FROM tenants WHERE name LIKE $1 || '-%'")
        .bind(&id)
        .execute(&admin)
        .await?;
    outcome
}

async fn measure(
    admin: &sqlx::PgPool,
    clickhouse: &ClickHouse,
    id: &str,
    period: Period,
    tenants: &[Uuid],
    options: &InvoiceBenchOptions,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let names: Vec<String> = tenants.iter().map(Uuid::to_string).collect();
    let month_ms = period.end_ms() - period.start_ms();
    usage::fill_synthetic(
        clickhouse,
        &usage::SyntheticUsage {
            id_prefix: id,
            tenants: &names,
            models: MODELS,
            events: options.events,
            from_ms: period.start_ms(),
            span_ms: month_ms,
        },
    )
    .await
    .context("filling the month with usage facts")?;
    println!(
        "filled in {:.1} s (not timed)",
        started.elapsed().as_secs_f64()
    );
    // A closed month is merged into one part by the metering stage an hour after it ends
    // (`stages.metering_compact_after_s`), long before anyone invoices it: do the same here,
    // and say what it cost, once per month.
    let started = Instant::now();
    usage::compact_month(clickhouse, period.yyyymm())
        .await
        .context("merging the month's facts")?;
    let window = (period.yyyymm(), period.yyyymm());
    let merged = usage::partitions(clickhouse, window)
        .await?
        .get(&period.yyyymm())
        .is_some_and(|p| p.merged);
    println!(
        "merged the closed month into one part in {:.1} s (once per month, by the metering stage; not timed){}",
        started.elapsed().as_secs_f64(),
        if merged { "" } else { " — still more than one part: the run reads it through FINAL" }
    );

    // The limit: one GROUP BY over the month as a user would write it by hand (the rows hold
    // no event twice, so it is exact here), warmed once, median of three. The same with
    // `FINAL`, which billing reads a month through until it is merged, is printed beside it.
    let group_by = |rows: Rows| async move {
        let mut times = Vec::new();
        let mut totals = Vec::new();
        for round in 0..4 {
            let started = Instant::now();
            totals = usage::totals_by_tenant_and_model(
                clickhouse,
                period.start_ms(),
                period.end_ms(),
                None,
                rows,
            )
            .await?;
            if round > 0 {
                times.push(started.elapsed());
            }
        }
        times.sort();
        anyhow::Ok((times[1], totals))
    };
    let (limit, totals) = group_by(Rows::AsStored).await?;
    let (deduplicated, _) = group_by(Rows::Deduplicated).await?;
    println!(
        "ClickHouse GROUP BY tenant, model (requests, input, output and cached tokens) over the month: {:.3} s (median of 3; {} groups); with FINAL: {:.3} s",
        limit.as_secs_f64(),
        totals.len(),
        deduplicated.as_secs_f64()
    );

    // Its own issuer, so the benchmark's invoices take none of the real numbers.
    sqlx::query(
        "INSERT INTO invoice_issuers (id, prefix) VALUES ('bench', 'BENCH-') ON CONFLICT DO NOTHING",
    )
    .execute(admin)
    .await?;
    let now_ms = sluice_pipelines::now_ms();
    let started = Instant::now();
    let mut last_shown = Instant::now();
    let report = invoices::run(
        admin,
        clickhouse,
        period,
        "bench",
        None,
        now_ms,
        |done, all| {
            if last_shown.elapsed() >= Duration::from_secs(1) {
                eprintln!("invoicing {period}: {done}/{all} tenants");
                last_shown = Instant::now();
            }
        },
    )
    .await?;
    let run = started.elapsed();
    println!(
        "sluice invoices run --period {period}: {:.3} s ({} invoices written, {:.0} events/s)",
        run.as_secs_f64(),
        report.written.len(),
        options.events as f64 / run.as_secs_f64()
    );

    // The invoices must say what the usage says, priced independently.
    let mut conn = admin.acquire().await?;
    let book = PriceBook::load(&mut conn).await?;
    let mut expected = Exact(0);
    for row in &totals {
        let version = book
            .in_force(&format!("model:{}", row.model), period.start_ms())
            .with_context(|| format!("{} has no price in force", row.model))?;
        expected = expected
            + version.usage_cost(
                row.requests,
                row.input_tokens,
                row.output_tokens,
                row.cached_input_tokens,
            );
    }
    let invoiced: Exact = report
        .written
        .iter()
        .flat_map(|i| &i.lines)
        .map(|l| l.exact)
        .sum();
    anyhow::ensure!(
        report.written.len() == tenants.len() && invoiced == expected,
        "the invoices ({} of {}, {}) do not add up to the usage ({})",
        report.written.len(),
        tenants.len(),
        invoiced.decimal(),
        expected.decimal()
    );
    println!(
        "checked: {} invoices, exact total {} {} equals the usage priced independently",
        report.written.len(),
        invoiced.decimal(),
        book.currency
    );
    println!("ratio={:.2}", run.as_secs_f64() / limit.as_secs_f64());
    Ok(())
}
