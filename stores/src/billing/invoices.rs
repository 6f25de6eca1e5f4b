//! Invoices in the stores: closing a period (`sluice invoices run`), the preview of the period
//! to date, and reading invoices back. The arithmetic is [`super::statement`]'s; this module
//! gathers its inputs — the price book, the usage facts from ClickHouse, what earlier invoices
//! billed — and writes the result, one transaction per invoice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{json, Value};
use sqlx::{types::Uuid, PgConnection, PgPool, Row};

use super::{
    money::{Currency, Exact, Minor},
    period::Period,
    prices::{model_item, plan_item, PriceBook},
    statement::{
        difference, period_lines, slice_start, totals, Line, LineKind, PlanFees, PricedUsage,
        Quantities,
    },
};
use crate::{
    clickhouse::usage::{self, SliceQuery},
    ClickHouse, Error, Result,
};

/// How far back an invoice looks for usage of closed periods that arrived late.
pub const LOOKBACK_MONTHS: u32 = 12;

/// An invoice, final or a preview.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    /// `None` for a preview.
    pub id: Option<Uuid>,
    pub number: Option<String>,
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub period: Period,
    pub currency: Currency,
    pub plan: Option<String>,
    pub lines: Vec<Line>,
    /// Usage facts written up to this moment were read (Unix milliseconds).
    pub usage_read_at_ms: i64,
    /// `None` for a preview.
    pub finalized_at_ms: Option<i64>,
}

impl Invoice {
    /// The total: the sum of the lines' rounded amounts.
    pub fn total(&self) -> Minor {
        totals(&self.lines).total
    }

    /// As the API and `--json` show it: amounts are decimal strings in `currency`.
    pub fn to_json(&self) -> Value {
        let c = self.currency;
        let t = totals(&self.lines);
        let lines: Vec<Value> = self
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                json!({
                    "position": i + 1,
                    "kind": l.kind,
                    "for_period": l.for_period.to_string(),
                    "adjustment": l.adjustment,
                    "description": l.description,
                    "model": l.model(),
                    "item": l.item,
                    "price_version_id": l.price_version_id,
                    "requests": l.quantities.requests,
                    "input_tokens": l.quantities.input_tokens,
                    "output_tokens": l.quantities.output_tokens,
                    "cached_input_tokens": l.quantities.cached_input_tokens,
                    "exact_amount": l.exact.decimal(),
                    "amount": l.amount.decimal(c),
                })
            })
            .collect();
        json!({
            "object": "invoice",
            "id": self.id,
            "number": self.number,
            "status": if self.id.is_some() { "final" } else { "preview" },
            "tenant_id": self.tenant_id,
            "tenant": self.tenant_name,
            "period": self.period.to_string(),
            "currency": c.code(),
            "plan": self.plan,
            "lines": lines,
            "usage": t.usage.decimal(c),
            "included_usage": t.included.decimal(c),
            "overage": t.overage.decimal(c),
            "total": t.total.decimal(c),
            "usage_read_at_ms": self.usage_read_at_ms,
            "finalized_at_ms": self.finalized_at_ms,
        })
    }
}

/// What one tenant's earlier invoices say: per period, the plan billed and every line.
#[derive(Debug, Default)]
struct Billed {
    /// The periods the tenant has an invoice for, and the plan each billed.
    plans: BTreeMap<Period, Option<PlanFees>>,
    lines: Vec<Line>,
}

/// The usage of tenants over whole periods, priced: tenant → period → usage per model and
/// price version.
type PeriodUsage = HashMap<String, BTreeMap<Period, Vec<PricedUsage>>>;

async fn priced_usage(
    clickhouse: &ClickHouse,
    book: &PriceBook,
    from: Period,
    to: Period,
    tenants: Option<&[String]>,
) -> Result<PeriodUsage> {
    let price_changes = book.changes_between(from.start_ms(), to.end_ms());
    let slices = usage::usage_slices(
        clickhouse,
        &SliceQuery {
            from_ms: from.start_ms(),
            to_ms: to.end_ms(),
            price_changes: &price_changes,
            tenants,
            by_key_and_day: false,
            excluding: &[],
        },
    )
    .await?;
    // (tenant, period, model, price version) → quantities.
    let mut summed: BTreeMap<(String, Period, String, Option<i64>), Quantities> = BTreeMap::new();
    for s in slices {
        let Some((month, start)) = slice_start(&price_changes, from.start_ms(), s.month, s.segment)
        else {
            continue;
        };
        let version = book.in_force(&model_item(&s.model), start).map(|v| v.id);
        let q = summed
            .entry((s.tenant_id, month, s.model, version))
            .or_default();
        q.requests += count(s.requests);
        q.input_tokens += count(s.input_tokens);
        q.output_tokens += count(s.output_tokens);
        q.cached_input_tokens += count(s.cached_input_tokens);
    }
    let mut usage = PeriodUsage::new();
    for ((tenant, period, model, version), quantities) in summed {
        usage
            .entry(tenant)
            .or_default()
            .entry(period)
            .or_default()
            .push(PricedUsage {
                model,
                version,
                quantities,
            });
    }
    Ok(usage)
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The lines of `tenant`'s invoice for `period`: the period itself, and for each earlier
/// closed period (or one this tenant has an invoice for) within the lookback, what its usage
/// says now minus what was billed for it.
fn draft(
    book: &PriceBook,
    period: Period,
    plan_now: Option<&PlanFees>,
    billed: &Billed,
    closed: &BTreeSet<Period>,
    usage: Option<&BTreeMap<Period, Vec<PricedUsage>>>,
) -> Vec<Line> {
    let lookback = lookback_start(period);
    let mut covered: BTreeSet<Period> = closed
        .iter()
        .chain(billed.plans.keys())
        .copied()
        .filter(|q| *q >= lookback && *q < period)
        .collect();
    covered.insert(period);
    let mut lines = Vec::new();
    for q in covered {
        let plan = if q == period {
            plan_now
        } else {
            billed.plans.get(&q).and_then(Option::as_ref)
        };
        let facts = usage
            .and_then(|u| u.get(&q))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let expected = period_lines(book, q, plan, facts);
        lines.extend(difference(expected, &billed.lines, q, period));
    }
    lines
}

fn lookback_start(period: Period) -> Period {
    (0..LOOKBACK_MONTHS).fold(period, |p, _| p.previous())
}

/// The plan's fees in force at the start of `period`.
fn plan_fees(book: &PriceBook, plan: Option<String>, period: Period) -> Option<PlanFees> {
    plan.map(|name| PlanFees {
        version: book.in_force(&plan_item(&name), period.start_ms()).cloned(),
        name,
    })
}

const LINE_COLUMNS: &str = "invoice_id, tenant_id, kind, to_char(for_period, 'YYYY-MM'), \
     adjustment, description, item, price_version_id, requests, input_tokens, output_tokens, \
     cached_input_tokens, exact_amount::text, amount_minor";

fn line(row: &sqlx::postgres::PgRow) -> Result<(Uuid, Uuid, Line)> {
    let kind: String = row.try_get(2)?;
    let for_period: String = row.try_get(3)?;
    let exact: String = row.try_get(12)?;
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        Line {
            kind: LineKind::parse(&kind)
                .ok_or_else(|| Error::Corrupt(format!("invoice line kind {kind:?}")))?,
            for_period: Period::parse(&for_period)?,
            adjustment: row.try_get(4)?,
            description: row.try_get(5)?,
            item: row.try_get(6)?,
            price_version_id: row.try_get(7)?,
            quantities: Quantities {
                requests: row.try_get(8)?,
                input_tokens: row.try_get(9)?,
                output_tokens: row.try_get(10)?,
                cached_input_tokens: row.try_get(11)?,
            },
            exact: Exact::parse(&exact)?,
            amount: Minor(row.try_get(13)?),
        },
    ))
}

/// What earlier invoices billed, per tenant, for periods from `since` (all tenants the
/// connection can see: one under row-level security, every one as the owner).
async fn billed_since(
    conn: &mut PgConnection,
    book: &PriceBook,
    since: Period,
) -> Result<HashMap<Uuid, Billed>> {
    let mut billed: HashMap<Uuid, Billed> = HashMap::new();
    let invoices = sqlx::query(
        "SELECT tenant_id, to_char(period, 'YYYY-MM'), plan_name, plan_version_id \
           FROM invoices WHERE period >= $1::date",
    )
    .bind(since.date_text())
    .fetch_all(&mut *conn)
    .await?;
    for row in invoices {
        let tenant: Uuid = row.try_get(0)?;
        let period = Period::parse(&row.try_get::<String, _>(1)?)?;
        let plan: Option<String> = row.try_get(2)?;
        let version: Option<i64> = row.try_get(3)?;
        let fees = plan.map(|name| PlanFees {
            name,
            version: version.and_then(|id| book.version(id)).cloned(),
        });
        billed.entry(tenant).or_default().plans.insert(period, fees);
    }
    let lines = sqlx::query(&format!(
        "SELECT {LINE_COLUMNS} FROM invoice_lines WHERE for_period >= $1::date"
    ))
    .bind(since.date_text())
    .fetch_all(&mut *conn)
    .await?;
    for row in &lines {
        let (_, tenant, line) = line(row)?;
        billed.entry(tenant).or_default().lines.push(line);
    }
    Ok(billed)
}

/// Periods an invoice run has closed, from `since`.
async fn closed_since(conn: &mut PgConnection, since: Period) -> Result<BTreeSet<Period>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT to_char(period, 'YYYY-MM') FROM invoice_runs \
          WHERE finished_at IS NOT NULL AND period >= $1::date",
    )
    .bind(since.date_text())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|p| Period::parse(p)).collect()
}

/// The invoice `tenant` would get for the period containing `now_ms` if it closed now, with
/// adjustments for closed periods. `conn` sees the tenant's invoices (a tenant transaction,
/// or the owner).
pub async fn preview(
    conn: &mut PgConnection,
    clickhouse: &ClickHouse,
    tenant_id: Uuid,
    now_ms: i64,
) -> Result<Invoice> {
    let period = Period::containing(now_ms);
    let book = PriceBook::load(&mut *conn).await?;
    let (tenant_name, plan) = tenant_and_plan(&mut *conn, tenant_id).await?;
    let since = lookback_start(period);
    let mut billed = billed_since(&mut *conn, &book, since).await?;
    let closed = closed_since(&mut *conn, since).await?;
    let tenants = [tenant_id.to_string()];
    let usage = priced_usage(clickhouse, &book, since, period, Some(&tenants)).await?;
    let plan = plan_fees(&book, plan.clone(), period);
    let lines = draft(
        &book,
        period,
        plan.as_ref(),
        &billed.remove(&tenant_id).unwrap_or_default(),
        &closed,
        usage.get(&tenants[0]),
    );
    Ok(Invoice {
        id: None,
        number: None,
        tenant_id,
        tenant_name,
        period,
        currency: book.currency,
        plan: plan.map(|p| p.name),
        lines,
        usage_read_at_ms: now_ms,
        finalized_at_ms: None,
    })
}

async fn tenant_and_plan(
    conn: &mut PgConnection,
    tenant: Uuid,
) -> Result<(String, Option<String>)> {
    let row = sqlx::query(&format!("{TENANTS_AND_PLANS} WHERE t.id = $1"))
        .bind(tenant)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no tenant {tenant}")))?;
    Ok((row.try_get(1)?, row.try_get(2)?))
}

/// Tenants (id, name), the name of the plan each is subscribed to, and when each was created
/// and deleted (Unix milliseconds).
const TENANTS_AND_PLANS: &str = "SELECT t.id, t.name, p.name, \
     (extract(epoch FROM t.created_at) * 1000)::bigint, \
     (extract(epoch FROM t.deleted_at) * 1000)::bigint FROM tenants t \
     LEFT JOIN subscriptions s ON s.tenant_id = t.id LEFT JOIN plans p ON p.id = s.plan_id";

/// What an invoice run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunReport {
    /// The invoices written now.
    pub written: Vec<Invoice>,
    /// Tenants that already had their invoice for the period.
    pub already_invoiced: usize,
    /// Tenants with nothing to bill.
    pub nothing_to_bill: usize,
    /// Tenant ids in the usage facts that name no tenant of the control plane (their usage
    /// cannot be invoiced).
    pub unknown_tenants: Vec<String>,
    /// Usage lines with no price in force (billed at zero).
    pub unpriced_lines: usize,
}

/// Closes `period`: one final invoice per tenant with something to bill (all tenants, or only
/// `only`), numbered by `issuer`. Idempotent: a tenant already invoiced for the period is left
/// alone. `progress` hears (tenants done, tenants in all).
pub async fn run(
    admin: &PgPool,
    clickhouse: &ClickHouse,
    period: Period,
    issuer: &str,
    only: Option<Uuid>,
    now_ms: i64,
    mut progress: impl FnMut(usize, usize),
) -> Result<RunReport> {
    if period.end_ms() > now_ms {
        return Err(Error::Invalid(format!(
            "{period} has not ended yet: preview it instead (`sluice invoices preview`)"
        )));
    }
    let mut lock = admin.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice-invoice-run'))")
        .execute(&mut *lock)
        .await?;
    let result = run_locked(
        admin,
        clickhouse,
        period,
        issuer,
        only,
        now_ms,
        &mut progress,
    )
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext('sluice-invoice-run'))")
        .execute(&mut *lock)
        .await?;
    result
}

async fn run_locked(
    admin: &PgPool,
    clickhouse: &ClickHouse,
    period: Period,
    issuer: &str,
    only: Option<Uuid>,
    now_ms: i64,
    progress: &mut impl FnMut(usize, usize),
) -> Result<RunReport> {
    let mut conn = admin.acquire().await?;
    let known_issuer: Option<String> =
        sqlx::query_scalar("SELECT id FROM invoice_issuers WHERE id = $1")
            .bind(issuer)
            .fetch_optional(&mut *conn)
            .await?;
    if known_issuer.is_none() {
        return Err(Error::Invalid(format!("no invoice issuer {issuer:?}")));
    }
    if only.is_none() {
        sqlx::query(
            "INSERT INTO invoice_runs (period, issuer_id) VALUES ($1::date, $2) \
             ON CONFLICT (period) DO NOTHING",
        )
        .bind(period.date_text())
        .bind(issuer)
        .execute(&mut *conn)
        .await?;
    }
    let started = std::time::Instant::now();
    let book = PriceBook::load(&mut conn).await?;
    let since = lookback_start(period);
    // What the control plane says and what the facts say are read at once.
    let control_plane = async {
        let billed = billed_since(&mut conn, &book, since).await?;
        let closed = closed_since(&mut conn, since).await?;
        let invoiced: HashSet<Uuid> =
            sqlx::query_scalar("SELECT tenant_id FROM invoices WHERE period = $1::date")
                .bind(period.date_text())
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
        let tenants = sqlx::query(&format!(
            "{TENANTS_AND_PLANS} WHERE $1::uuid IS NULL OR t.id = $1 ORDER BY t.created_at, t.id"
        ))
        .bind(only)
        .fetch_all(&mut *conn)
        .await?;
        Ok::<_, Error>((billed, closed, invoiced, tenants))
    };
    let filter: Option<Vec<String>> = only.map(|t| vec![t.to_string()]);
    let ((mut billed, closed, invoiced, tenants), usage) = tokio::try_join!(
        control_plane,
        priced_usage(clickhouse, &book, since, period, filter.as_deref())
    )?;
    drop(conn);
    let read = started.elapsed();

    let mut report = RunReport::default();
    let known: HashSet<String> = tenants
        .iter()
        .filter_map(|r| r.try_get::<Uuid, _>(0).ok())
        .map(|t| t.to_string())
        .collect();
    report.unknown_tenants = usage
        .keys()
        .filter(|t| !known.contains(*t))
        .cloned()
        .collect();
    report.unknown_tenants.sort();
    let all = tenants.len();
    let mut pending = Vec::new();
    for (done, row) in tenants.iter().enumerate() {
        progress(done, all);
        let tenant_id: Uuid = row.try_get(0)?;
        let tenant_name: String = row.try_get(1)?;
        let plan: Option<String> = row.try_get(2)?;
        let created_ms: i64 = row.try_get(3)?;
        let deleted_ms: Option<i64> = row.try_get(4)?;
        if invoiced.contains(&tenant_id) {
            report.already_invoiced += 1;
            continue;
        }
        // A plan's fees are owed for a month the tenant existed in (its usage always is).
        let existed =
            created_ms < period.end_ms() && deleted_ms.is_none_or(|d| d >= period.start_ms());
        let plan = plan_fees(&book, plan.filter(|_| existed), period);
        let lines = draft(
            &book,
            period,
            plan.as_ref(),
            &billed.remove(&tenant_id).unwrap_or_default(),
            &closed,
            usage.get(&tenant_id.to_string()),
        );
        if lines.is_empty() {
            report.nothing_to_bill += 1;
            continue;
        }
        report.unpriced_lines += lines
            .iter()
            .filter(|l| l.kind == LineKind::Usage && l.price_version_id.is_none())
            .count();
        let invoice = Invoice {
            id: None,
            number: None,
            tenant_id,
            tenant_name,
            period,
            currency: book.currency,
            plan: plan.as_ref().map(|p| p.name.clone()),
            lines,
            usage_read_at_ms: now_ms,
            finalized_at_ms: None,
        };
        let plan_version = plan.and_then(|p| p.version).map(|v| v.id);
        pending.push((invoice, plan_version));
        if pending.len() == WRITE_BATCH {
            report
                .written
                .extend(finalize(admin, issuer, std::mem::take(&mut pending)).await?);
        }
    }
    report
        .written
        .extend(finalize(admin, issuer, pending).await?);
    progress(all, all);
    tracing::info!(
        %period,
        invoices = report.written.len(),
        read_ms = read.as_millis() as u64,
        drafted_and_written_ms = (started.elapsed() - read).as_millis() as u64,
        "invoice run done"
    );
    if only.is_none() {
        sqlx::query("UPDATE invoice_runs SET finished_at = now() WHERE period = $1::date")
            .bind(period.date_text())
            .execute(admin)
            .await?;
    }
    Ok(report)
}

/// Invoices written in one transaction.
const WRITE_BATCH: usize = 1000;

/// Writes `invoices` as final, numbered by `issuer` in order, in one transaction: a failure
/// writes none of them and takes no number.
async fn finalize(
    admin: &PgPool,
    issuer: &str,
    invoices: Vec<(Invoice, Option<i64>)>,
) -> Result<Vec<Invoice>> {
    if invoices.is_empty() {
        return Ok(Vec::new());
    }
    let count = i64::try_from(invoices.len()).unwrap_or(i64::MAX);
    let mut tx = admin.begin().await?;
    let (first, prefix): (i64, String) = sqlx::query_as(
        "UPDATE invoice_issuers SET next_number = next_number + $2 WHERE id = $1 \
         RETURNING next_number - $2, prefix",
    )
    .bind(issuer)
    .bind(count)
    .fetch_one(&mut *tx)
    .await?;
    let mut numbered: Vec<Invoice> = Vec::with_capacity(invoices.len());
    let (mut tenant_ids, mut names, mut sequences, mut numbers) = (vec![], vec![], vec![], vec![]);
    let (mut plans, mut plan_versions, mut totals_minor, mut read_at) =
        (vec![], vec![], vec![], vec![]);
    let (mut periods, mut currencies) = (vec![], vec![]);
    for (i, (mut invoice, plan_version)) in invoices.into_iter().enumerate() {
        let sequence = first + i64::try_from(i).unwrap_or(i64::MAX);
        invoice.number = Some(format!("{prefix}{sequence:06}"));
        tenant_ids.push(invoice.tenant_id);
        names.push(invoice.tenant_name.clone());
        sequences.push(sequence);
        numbers.push(invoice.number.clone().unwrap_or_default());
        periods.push(invoice.period.date_text());
        currencies.push(invoice.currency.code().to_owned());
        plans.push(invoice.plan.clone());
        plan_versions.push(plan_version);
        totals_minor.push(invoice.total().0);
        read_at.push(invoice.usage_read_at_ms);
        numbered.push(invoice);
    }
    let written = sqlx::query(
        "INSERT INTO invoices (tenant_id, tenant_name, issuer_id, sequence, number, period, \
                currency, plan_name, plan_version_id, total_minor, usage_read_at) \
         SELECT t, n, $5, s, num, p::date, c, pl, pv, tot, to_timestamp(r / 1000.0) \
           FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $6::text[], $7::text[], \
                       $8::text[], $9::bigint[], $10::bigint[], $11::bigint[]) \
                AS x(t, n, s, num, p, c, pl, pv, tot, r) \
         RETURNING number, id, (extract(epoch FROM finalized_at) * 1000)::bigint",
    )
    .bind(&tenant_ids)
    .bind(&names)
    .bind(&sequences)
    .bind(&numbers)
    .bind(issuer)
    .bind(&periods)
    .bind(&currencies)
    .bind(&plans)
    .bind(&plan_versions)
    .bind(&totals_minor)
    .bind(&read_at)
    .fetch_all(&mut *tx)
    .await?;
    let mut ids: HashMap<String, (Uuid, i64)> = HashMap::with_capacity(written.len());
    for row in &written {
        ids.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    let mut lines = LineColumns::default();
    for invoice in &mut numbered {
        let (id, finalized_at) = ids
            .get(invoice.number.as_deref().unwrap_or_default())
            .copied()
            .ok_or_else(|| Error::Corrupt("an invoice written returned no id".into()))?;
        invoice.id = Some(id);
        invoice.finalized_at_ms = Some(finalized_at);
        for (position, line) in invoice.lines.iter().enumerate() {
            lines.push(id, position, invoice.tenant_id, line);
        }
    }
    lines.insert(&mut tx).await?;
    tx.commit().await?;
    Ok(numbered)
}

/// Invoice lines as columns, for one `INSERT … SELECT FROM UNNEST`.
#[derive(Default)]
struct LineColumns {
    invoice_id: Vec<Uuid>,
    position: Vec<i32>,
    tenant_id: Vec<Uuid>,
    kind: Vec<&'static str>,
    for_period: Vec<String>,
    adjustment: Vec<bool>,
    description: Vec<String>,
    item: Vec<Option<String>>,
    price_version_id: Vec<Option<i64>>,
    requests: Vec<i64>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    exact_amount: Vec<String>,
    amount_minor: Vec<i64>,
}

impl LineColumns {
    fn push(&mut self, invoice: Uuid, position: usize, tenant: Uuid, l: &Line) {
        self.invoice_id.push(invoice);
        self.position
            .push(i32::try_from(position + 1).unwrap_or(i32::MAX));
        self.tenant_id.push(tenant);
        self.kind.push(l.kind.as_str());
        self.for_period.push(l.for_period.date_text());
        self.adjustment.push(l.adjustment);
        self.description.push(l.description.clone());
        self.item.push(l.item.clone());
        self.price_version_id.push(l.price_version_id);
        self.requests.push(l.quantities.requests);
        self.input_tokens.push(l.quantities.input_tokens);
        self.output_tokens.push(l.quantities.output_tokens);
        self.cached_input_tokens
            .push(l.quantities.cached_input_tokens);
        self.exact_amount.push(l.exact.decimal());
        self.amount_minor.push(l.amount.0);
    }

    async fn insert(&self, tx: &mut PgConnection) -> Result<()> {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, position, tenant_id, kind, for_period, \
                    adjustment, description, item, price_version_id, requests, input_tokens, \
                    output_tokens, cached_input_tokens, exact_amount, amount_minor) \
             SELECT i, pos, t, k, fp::date, adj, d, it, pv, rq, inp, outp, ca, ex::numeric, am \
               FROM UNNEST($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::text[], $6::bool[], \
                           $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], \
                           $12::bigint[], $13::bigint[], $14::text[], $15::bigint[]) \
                    AS x(i, pos, t, k, fp, adj, d, it, pv, rq, inp, outp, ca, ex, am)",
        )
        .bind(&self.invoice_id)
        .bind(&self.position)
        .bind(&self.tenant_id)
        .bind(&self.kind)
        .bind(&self.for_period)
        .bind(&self.adjustment)
        .bind(&self.description)
        .bind(&self.item)
        .bind(&self.price_version_id)
        .bind(&self.requests)
        .bind(&self.input_tokens)
        .bind(&self.output_tokens)
        .bind(&self.cached_input_tokens)
        .bind(&self.exact_amount)
        .bind(&self.amount_minor)
        .execute(tx)
        .await?;
        Ok(())
    }
}

const INVOICE_COLUMNS: &str = "id, number, tenant_id, tenant_name, to_char(period, 'YYYY-MM'), \
     currency, plan_name, (extract(epoch FROM usage_read_at) * 1000)::bigint, \
     (extract(epoch FROM finalized_at) * 1000)::bigint";

fn invoice(row: &sqlx::postgres::PgRow) -> Result<Invoice> {
    let currency: String = row.try_get(5)?;
    let period: String = row.try_get(4)?;
    Ok(Invoice {
        id: Some(row.try_get(0)?),
        number: Some(row.try_get(1)?),
        tenant_id: row.try_get(2)?,
        tenant_name: row.try_get(3)?,
        period: Period::parse(&period)?,
        currency: Currency::new(&currency)?,
        plan: row.try_get(6)?,
        lines: Vec::new(),
        usage_read_at_ms: row.try_get(7)?,
        finalized_at_ms: Some(row.try_get(8)?),
    })
}

/// Attaches each invoice's lines, in order.
async fn with_lines(
    conn: &mut PgConnection,
    mut invoices: Vec<Invoice>,
    all_tenants: bool,
) -> Result<Vec<Invoice>> {
    let ids: Vec<Uuid> = invoices.iter().filter_map(|i| i.id).collect();
    if ids.is_empty() {
        return Ok(invoices);
    }
    let periods: Vec<String> = invoices.iter().map(|i| i.period.date_text()).collect();
    let rows = if all_tenants {
        sqlx::query(&format!(
            "SELECT {LINE_COLUMNS} FROM sluice_period_invoice_lines($1::date) \
              WHERE invoice_id = ANY($2) ORDER BY invoice_id, position"
        ))
        .bind(&periods[0])
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
    } else {
        sqlx::query(&format!(
            "SELECT {LINE_COLUMNS} FROM invoice_lines WHERE invoice_id = ANY($1) \
              ORDER BY invoice_id, position"
        ))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
    };
    let mut by_invoice: HashMap<Uuid, Vec<Line>> = HashMap::new();
    for row in &rows {
        let (invoice_id, _, l) = line(row)?;
        by_invoice.entry(invoice_id).or_default().push(l);
    }
    for invoice in &mut invoices {
        if let Some(id) = invoice.id {
            invoice.lines = by_invoice.remove(&id).unwrap_or_default();
        }
    }
    Ok(invoices)
}

/// The invoices `conn` may see (a tenant's, in its transaction), newest period first, with
/// their lines; only `period`'s if given.
pub async fn list(conn: &mut PgConnection, period: Option<Period>) -> Result<Vec<Invoice>> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices \
          WHERE $1::date IS NULL OR period = $1::date ORDER BY period DESC, number"
    ))
    .bind(period.map(Period::date_text))
    .fetch_all(&mut *conn)
    .await?;
    let invoices = rows.iter().map(invoice).collect::<Result<Vec<_>>>()?;
    with_lines(conn, invoices, false).await
}

/// Every tenant's invoices of `period`, with their lines (for a platform admin: the runtime
/// role reads them through a security-definer function).
pub async fn all_of_period(conn: &mut PgConnection, period: Period) -> Result<Vec<Invoice>> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM sluice_period_invoices($1::date) ORDER BY number"
    ))
    .bind(period.date_text())
    .fetch_all(&mut *conn)
    .await?;
    let invoices = rows.iter().map(invoice).collect::<Result<Vec<_>>>()?;
    with_lines(conn, invoices, true).await
}

/// One invoice by id or number, if `conn` may see it.
pub async fn get(conn: &mut PgConnection, id_or_number: &str) -> Result<Option<Invoice>> {
    let id = Uuid::parse_str(id_or_number).ok();
    let row = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE id = $1 OR number = $2"
    ))
    .bind(id)
    .bind(id_or_number)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let found = with_lines(conn, vec![invoice(&row)?], false).await?;
    Ok(found.into_iter().next())
}

/// One day's usage of one key (or user) and model, priced.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDay {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub key_id: String,
    pub model: String,
    pub quantities: Quantities,
    /// At the prices in force when it happened, rounded once per row.
    pub amount: Minor,
}

/// A tenant's usage per key, model and UTC day in `[from_ms, to_ms)`, priced.
pub async fn usage_by_key_model_day(
    conn: &mut PgConnection,
    clickhouse: &ClickHouse,
    tenant_id: Uuid,
    from_ms: i64,
    to_ms: i64,
) -> Result<(Currency, Vec<UsageDay>)> {
    let book = PriceBook::load(conn).await?;
    let price_changes = book.changes_between(from_ms, to_ms);
    let tenants = [tenant_id.to_string()];
    let slices = usage::usage_slices(
        clickhouse,
        &SliceQuery {
            from_ms,
            to_ms,
            price_changes: &price_changes,
            tenants: Some(&tenants),
            by_key_and_day: true,
            excluding: &[],
        },
    )
    .await?;
    let mut rows: BTreeMap<(u32, String, String), (Quantities, Exact)> = BTreeMap::new();
    for s in slices {
        let Some((_, start)) = slice_start(&price_changes, from_ms, s.month, s.segment) else {
            continue;
        };
        let exact = book
            .in_force(&model_item(&s.model), start)
            .map(|v| {
                v.usage_cost(
                    s.requests,
                    s.input_tokens,
                    s.output_tokens,
                    s.cached_input_tokens,
                )
            })
            .unwrap_or_default();
        let entry = rows.entry((s.day, s.caller, s.model)).or_default();
        entry.0.requests += count(s.requests);
        entry.0.input_tokens += count(s.input_tokens);
        entry.0.output_tokens += count(s.output_tokens);
        entry.0.cached_input_tokens += count(s.cached_input_tokens);
        entry.1 = entry.1 + exact;
    }
    let days = rows
        .into_iter()
        .map(|((day, key_id, model), (quantities, exact))| UsageDay {
            day: chrono::DateTime::from_timestamp(i64::from(day) * 86_400, 0)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default(),
            key_id,
            model,
            quantities,
            amount: exact.round(book.currency),
        })
        .collect();
    Ok((book.currency, days))
}

/// The usage lines billed for `period` (on its invoices and as adjustments on later ones), per
/// tenant and model, with the tenants that have an invoice for it and whether a run closed it.
pub async fn billed_for_period(
    conn: &mut PgConnection,
    period: Period,
    tenant: Option<Uuid>,
) -> Result<BilledPeriod> {
    let rows = sqlx::query(
        "SELECT tenant_id, item, sum(requests)::bigint, sum(input_tokens)::bigint, \
                sum(output_tokens)::bigint \
           FROM invoice_lines \
          WHERE for_period = $1::date AND kind = 'usage' AND ($2::uuid IS NULL OR tenant_id = $2) \
          GROUP BY tenant_id, item",
    )
    .bind(period.date_text())
    .bind(tenant)
    .fetch_all(&mut *conn)
    .await?;
    let mut usage = Vec::with_capacity(rows.len());
    for row in &rows {
        let item: Option<String> = row.try_get(1)?;
        usage.push((
            row.try_get::<Uuid, _>(0)?,
            item.as_deref()
                .and_then(|i| i.strip_prefix("model:"))
                .unwrap_or_default()
                .to_owned(),
            Quantities {
                requests: row.try_get(2)?,
                input_tokens: row.try_get(3)?,
                output_tokens: row.try_get(4)?,
                cached_input_tokens: 0,
            },
        ));
    }
    let tenants: Vec<Uuid> = sqlx::query_scalar(
        "SELECT tenant_id FROM invoices WHERE period = $1::date AND ($2::uuid IS NULL OR tenant_id = $2)",
    )
    .bind(period.date_text())
    .bind(tenant)
    .fetch_all(&mut *conn)
    .await?;
    let closed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM invoice_runs WHERE period = $1::date AND finished_at IS NOT NULL)",
    )
    .bind(period.date_text())
    .fetch_one(&mut *conn)
    .await?;
    Ok(BilledPeriod {
        usage,
        tenants,
        closed,
    })
}

/// What [`billed_for_period`] found.
#[derive(Debug, Default)]
pub struct BilledPeriod {
    /// (tenant, model, quantities billed).
    pub usage: Vec<(Uuid, String, Quantities)>,
    /// Tenants with an invoice for the period.
    pub tenants: Vec<Uuid>,
    /// Whether a full invoice run closed the period.
    pub closed: bool,
}
