//! Monthly spend budgets (`spend_budgets`): a tenant's own and any of its keys', in micro-units
//! of the billing currency, with the share at which a budget alerts. The edge enforces them
//! (see `sluice_stores::limits`, kind `MonthlySpend`) and seeds each month's counter with
//! [`spent`]: the month's usage so far, priced by the version in force when it happened (as
//! invoices price it) and rounded up once; the edge then counts each request at the price in
//! force when it settles, rounded up per request, so a counter may run a little above the exact
//! spend, never below. A plan's base fee is not spend.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{types::Uuid, PgConnection, Row};

use super::{
    money::{micros_text, Exact},
    prices::{model_item, PriceBook},
    statement::slice_start,
    Period,
};
use crate::{
    clickhouse::usage::{self, SliceQuery},
    ClickHouse, Error, Result,
};

/// A monthly spend budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Budget {
    /// Micro-units of the billing currency a month.
    pub monthly_micros: u64,
    /// The share of the budget (percent) at which it alerts; `None`: never.
    pub alert_percent: Option<u8>,
}

impl Budget {
    /// A budget of `monthly_micros` alerting at `alert_percent`, if both make sense.
    pub fn new(monthly_micros: i64, alert_percent: Option<i64>) -> Result<Self> {
        let monthly_micros = u64::try_from(monthly_micros)
            .ok()
            .filter(|m| *m > 0)
            .ok_or_else(|| Error::Invalid("a budget is more than zero".into()))?;
        let alert_percent = match alert_percent {
            None => None,
            Some(p) => Some(
                u8::try_from(p)
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        Error::Invalid("an alert is a percentage from 1 to 100".into())
                    })?,
            ),
        };
        Ok(Self {
            monthly_micros,
            alert_percent,
        })
    }

    /// Whether `spent_micros` has reached the alert.
    pub fn alerting(&self, spent_micros: u64) -> bool {
        self.alert_percent.is_some_and(|p| {
            u128::from(spent_micros) * 100 >= u128::from(self.monthly_micros) * u128::from(p)
        })
    }

    /// Reads the two columns `monthly_micros, alert_percent` starting at `first`.
    pub fn from_row(row: &sqlx::postgres::PgRow, first: usize) -> Result<Option<Self>> {
        let micros: Option<i64> = row.try_get(first)?;
        let alert: Option<i16> = row.try_get(first + 1)?;
        micros
            .map(|m| Self::new(m, alert.map(i64::from)))
            .transpose()
    }
}

/// One budget as its owners see it: the tenant's (`key_id` empty) or a key's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BudgetRow {
    pub tenant_id: Uuid,
    pub key_id: Option<Uuid>,
    #[serde(flatten)]
    pub budget: Budget,
}

/// Sets the budget of `tenant_id` (or of its key `key_id`), replacing any. `conn` is the owner
/// or a transaction of that tenant; a key of another tenant is refused as unknown.
pub async fn set(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    key_id: Option<Uuid>,
    budget: Budget,
) -> Result<()> {
    if let Some(key) = key_id {
        let known: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM api_keys WHERE id = $1 AND tenant_id = $2")
                .bind(key)
                .bind(tenant_id)
                .fetch_optional(&mut *conn)
                .await?;
        if known.is_none() {
            return Err(Error::NotFound(format!("no key {key}")));
        }
    }
    // One statement: two admins setting the same budget at once both succeed, the last wins.
    sqlx::query(
        "INSERT INTO spend_budgets (tenant_id, key_id, monthly_micros, alert_percent)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'::uuid))
         DO UPDATE SET monthly_micros = EXCLUDED.monthly_micros,
                       alert_percent = EXCLUDED.alert_percent, updated_at = now()",
    )
    .bind(tenant_id)
    .bind(key_id)
    .bind(i64::try_from(budget.monthly_micros).unwrap_or(i64::MAX))
    .bind(budget.alert_percent.map(i16::from))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes the budget of `tenant_id` (or of its key `key_id`); whether there was one.
pub async fn remove(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    key_id: Option<Uuid>,
) -> Result<bool> {
    let removed = sqlx::query(
        "DELETE FROM spend_budgets WHERE tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2",
    )
    .bind(tenant_id)
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    Ok(removed.rows_affected() > 0)
}

/// The budgets of `tenant_id`: its own first, then its keys'.
pub async fn list(conn: &mut PgConnection, tenant_id: Uuid) -> Result<Vec<BudgetRow>> {
    let rows = sqlx::query(
        "SELECT tenant_id, key_id, monthly_micros, alert_percent FROM spend_budgets
          WHERE tenant_id = $1 ORDER BY key_id NULLS FIRST",
    )
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut budgets = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(budget) = Budget::from_row(row, 2)? {
            budgets.push(BudgetRow {
                tenant_id: row.try_get(0)?,
                key_id: row.try_get(1)?,
                budget,
            });
        }
    }
    Ok(budgets)
}

/// A budget and what has been spent against it this month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BudgetStatus {
    /// The key whose budget it is; empty: the tenant's own.
    pub key_id: Option<Uuid>,
    /// The budget a month, a decimal string in `currency`.
    pub monthly: String,
    pub alert_percent: Option<u8>,
    /// Spent this month so far (usage priced as its invoice will price it; a few seconds
    /// behind the requests), a decimal string.
    pub spent: String,
    /// Left this month (never below zero), a decimal string.
    pub remaining: String,
    /// Whether the spend has reached the alert.
    pub alerting: bool,
    /// Whether the budget is spent: requests are refused until the month ends.
    pub exhausted: bool,
}

/// A tenant's budgets and their standing this month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BudgetReport {
    pub currency: String,
    /// `YYYY-MM`.
    pub month: String,
    pub budgets: Vec<BudgetStatus>,
}

/// `tenant_id`'s budgets and what was spent against each in the month of `now_ms`. `conn`
/// sees the tenant's budgets (a tenant transaction, or the owner).
pub async fn report(
    conn: &mut PgConnection,
    clickhouse: &ClickHouse,
    tenant_id: Uuid,
    now_ms: i64,
) -> Result<BudgetReport> {
    let book = PriceBook::load(&mut *conn).await?;
    let rows = list(&mut *conn, tenant_id).await?;
    let period = Period::containing(now_ms);
    let range = (period.start_ms(), period.end_ms());
    let micros = |m: u64| micros_text(i64::try_from(m).unwrap_or(i64::MAX));
    // One read of the month for every budget of the tenant.
    let spending = spending(clickhouse, &book, tenant_id, range, (true, &[])).await?;
    let mut budgets = Vec::with_capacity(rows.len());
    for row in rows {
        let spent = spending.of(row.key_id).micros_up();
        let limit = row.budget.monthly_micros;
        budgets.push(BudgetStatus {
            key_id: row.key_id,
            monthly: micros(limit),
            alert_percent: row.budget.alert_percent,
            spent: micros(spent),
            remaining: micros(limit.saturating_sub(spent)),
            alerting: row.budget.alerting(spent),
            exhausted: spent >= limit,
        });
    }
    Ok(BudgetReport {
        currency: book.currency.code().to_owned(),
        month: period.to_string(),
        budgets,
    })
}

/// What `tenant` (or its key `key`) has spent in `[from_ms, to_ms)`, in micro-units rounded up,
/// leaving out the requests in `excluding`: usage priced at the version in force when it
/// happened, as its invoice will price it.
pub async fn spent(
    clickhouse: &ClickHouse,
    book: &PriceBook,
    tenant: Uuid,
    key: Option<Uuid>,
    range: (i64, i64),
    excluding: &[String],
) -> Result<u64> {
    let spending = spending(clickhouse, book, tenant, range, (key.is_some(), excluding)).await?;
    Ok(spending.of(key).micros_up())
}

/// A tenant's spend over a range: in all, and (when asked for) per caller.
struct Spending {
    all: Exact,
    /// Per key (or, for a session, user) id.
    callers: HashMap<String, Exact>,
}

impl Spending {
    /// The tenant's spend (`None`), or one key's.
    fn of(&self, key: Option<Uuid>) -> Exact {
        match key {
            None => self.all,
            Some(id) => self
                .callers
                .get(&id.to_string())
                .copied()
                .unwrap_or_default(),
        }
    }
}

/// What `tenant` spent in `[from_ms, to_ms)` (one query), split per caller if `by_caller`,
/// leaving out the requests in `excluding`.
async fn spending(
    clickhouse: &ClickHouse,
    book: &PriceBook,
    tenant: Uuid,
    (from_ms, to_ms): (i64, i64),
    (by_caller, excluding): (bool, &[String]),
) -> Result<Spending> {
    let price_changes = book.changes_between(from_ms, to_ms);
    let tenants = [tenant.to_string()];
    let slices = usage::usage_slices(
        clickhouse,
        &SliceQuery {
            from_ms,
            to_ms,
            price_changes: &price_changes,
            tenants: Some(&tenants),
            by_key_and_day: by_caller,
            excluding,
        },
    )
    .await?;
    let mut spending = Spending {
        all: Exact(0),
        callers: HashMap::new(),
    };
    for slice in slices {
        let Some((_, start)) = slice_start(&price_changes, from_ms, slice.month, slice.segment)
        else {
            continue;
        };
        let Some(price) = book.in_force(&model_item(&slice.model), start) else {
            continue;
        };
        let cost = price.usage_cost(
            slice.requests,
            slice.input_tokens,
            slice.output_tokens,
            slice.cached_input_tokens,
        );
        spending.all = spending.all + cost;
        let caller = spending.callers.entry(slice.caller).or_default();
        *caller = *caller + cost;
    }
    Ok(spending)
}

/// What a request of `input` and `output` tokens on `model` costs at the prices in force at
/// `at_ms`, in micro-units rounded up (`None`: the model has no price).
pub fn request_cost(
    book: &PriceBook,
    model: &str,
    at_ms: i64,
    input: u64,
    output: u64,
    cached: u64,
) -> Option<u64> {
    let price = book.in_force(&model_item(model), at_ms)?;
    Some(price.usage_cost(1, input, output, cached).micros_up())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_positive_and_alerts_at_its_share() {
        assert!(Budget::new(0, None).is_err());
        assert!(Budget::new(10, Some(0)).is_err());
        assert!(Budget::new(10, Some(101)).is_err());
        let budget = Budget::new(10_000_000, Some(80)).unwrap();
        assert!(!budget.alerting(7_999_999));
        assert!(budget.alerting(8_000_000));
        assert!(!Budget::new(10, None).unwrap().alerting(u64::MAX));
    }
}
