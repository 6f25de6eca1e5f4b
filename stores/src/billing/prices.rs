//! The price book (`price_versions`): versions of each billable item's price, each in force
//! from its `valid_from` until the next version of the item starts. Versions are only ever
//! added, never from a moment already past, so the price of usage that has happened never
//! changes (the table's trigger refuses anything else).

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::money::{Currency, Exact};
use crate::{
    postgres::followed::{Followed, Snapshot},
    Error, Result,
};

/// The price book's item a usage fact's `model` is priced by: a tool's call (`tool:<name>`)
/// and a workflow's run (`workflow:<name>`) by their own items, a model's tokens by
/// `model:<name>`.
pub fn model_item(model: &str) -> String {
    if model.starts_with("tool:") || model.starts_with("workflow:") {
        model.to_owned()
    } else {
        format!("model:{model}")
    }
}

/// The price book's key for a plan's fees.
pub fn plan_item(plan: &str) -> String {
    format!("plan:{plan}")
}

/// One version of an item's price. Prices are micro-units of the currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceVersion {
    pub id: i64,
    pub item: String,
    /// Per million input tokens (models).
    pub input_per_mtok: i64,
    /// Per million output tokens (models).
    pub output_per_mtok: i64,
    /// Per million input tokens served from the provider's cache (models).
    pub cached_input_per_mtok: i64,
    /// Per call (tools), per run (workflows), per month (a plan's base fee).
    pub per_unit: i64,
    /// Usage included in a plan's base fee each month.
    pub included: i64,
    /// In force from (Unix milliseconds).
    pub valid_from_ms: i64,
    pub created_at_ms: i64,
}

impl PriceVersion {
    /// What `input`, `output` and `cached` tokens cost at this version. Cached input tokens
    /// are a part of the input tokens, priced at the cached rate instead.
    /// What `requests` usage facts with these tokens cost: the tokens at the per-million
    /// prices, plus `per_unit` for each (a tool's call, a workflow's run).
    pub fn usage_cost(&self, requests: u64, input: u64, output: u64, cached: u64) -> Exact {
        let per_call = Exact::micros(self.per_unit).0 * i128::from(requests);
        self.tokens_cost(input, output, cached) + Exact(per_call)
    }

    pub fn tokens_cost(&self, input: u64, output: u64, cached: u64) -> Exact {
        let cached = cached.min(input);
        Exact::tokens(input - cached, self.input_per_mtok)
            + Exact::tokens(cached, self.cached_input_per_mtok)
            + Exact::tokens(output, self.output_per_mtok)
    }
}

/// Every version of every item, and the currency they are in.
#[derive(Debug, Clone)]
pub struct PriceBook {
    pub currency: Currency,
    /// Each item's versions, oldest first.
    by_item: HashMap<String, Vec<PriceVersion>>,
}

impl PriceBook {
    /// A book of `versions` in `currency`.
    pub fn new(currency: Currency, versions: Vec<PriceVersion>) -> Self {
        let mut by_item: HashMap<String, Vec<PriceVersion>> = HashMap::new();
        for version in versions {
            by_item
                .entry(version.item.clone())
                .or_default()
                .push(version);
        }
        for versions in by_item.values_mut() {
            versions.sort_by_key(|v| v.valid_from_ms);
        }
        Self { currency, by_item }
    }

    /// The whole book (either role may read it).
    pub async fn load(conn: &mut PgConnection) -> Result<Self> {
        let currency: String = sqlx::query_scalar("SELECT currency FROM billing_settings")
            .fetch_one(&mut *conn)
            .await?;
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM price_versions"))
            .fetch_all(&mut *conn)
            .await?;
        let versions = rows.iter().map(version).collect::<Result<Vec<_>>>()?;
        Ok(Self::new(Currency::new(&currency)?, versions))
    }

    /// The version of `item` in force at `at_ms`.
    /// A tool or workflow without versions of its own is priced by `tool:*` / `workflow:*`.
    pub fn in_force(&self, item: &str, at_ms: i64) -> Option<&PriceVersion> {
        let versions = self.by_item.get(item).or_else(|| {
            let kind = ["tool:", "workflow:"]
                .into_iter()
                .find(|kind| item.starts_with(kind))?;
            self.by_item.get(&format!("{kind}*"))
        })?;
        let after = versions.partition_point(|v| v.valid_from_ms <= at_ms);
        after.checked_sub(1).map(|i| &versions[i])
    }

    /// A version by its id.
    pub fn version(&self, id: i64) -> Option<&PriceVersion> {
        self.by_item.values().flatten().find(|v| v.id == id)
    }

    /// Every moment in `(from_ms, to_ms)` at which some version starts: between two of them
    /// (and the ends), every item has one price.
    pub fn changes_between(&self, from_ms: i64, to_ms: i64) -> Vec<i64> {
        let mut moments: Vec<i64> = self
            .by_item
            .values()
            .flatten()
            .map(|v| v.valid_from_ms)
            .filter(|&at| at > from_ms && at < to_ms)
            .collect();
        moments.sort_unstable();
        moments.dedup();
        moments
    }
}

impl Default for PriceBook {
    fn default() -> Self {
        Self::new(Currency::default(), Vec::new())
    }
}

impl Snapshot for PriceBook {
    const CHANNEL: &'static str = "sluice_prices";
    const WHAT: &'static str = "the price book";

    async fn load(app: &PgPool) -> Result<Self> {
        let mut conn = app.acquire().await?;
        PriceBook::load(&mut conn).await
    }
}

/// The price book as this process knows it, reloaded whenever a price or the currency changes.
pub type Prices = Followed<PriceBook>;

/// A new version of an item's price.
#[derive(Debug, Clone, Default)]
pub struct NewPrice {
    pub item: String,
    pub input_per_mtok: i64,
    pub output_per_mtok: i64,
    pub cached_input_per_mtok: i64,
    pub per_unit: i64,
    pub included: i64,
    /// In force from (Unix milliseconds); `None`: now. Never before now.
    pub valid_from_ms: Option<i64>,
}

const COLUMNS: &str =
    "id, item, input_per_mtok, output_per_mtok, cached_input_per_mtok, per_unit, \
     included, (extract(epoch FROM valid_from) * 1000)::bigint, \
     (extract(epoch FROM created_at) * 1000)::bigint";

fn version(row: &sqlx::postgres::PgRow) -> Result<PriceVersion> {
    Ok(PriceVersion {
        id: row.try_get(0)?,
        item: row.try_get(1)?,
        input_per_mtok: row.try_get(2)?,
        output_per_mtok: row.try_get(3)?,
        cached_input_per_mtok: row.try_get(4)?,
        per_unit: row.try_get(5)?,
        included: row.try_get(6)?,
        valid_from_ms: row.try_get(7)?,
        created_at_ms: row.try_get(8)?,
    })
}

/// Adds a version (owner role). Refused if it would start before now, or if the item is not a
/// `model:`, `tool:`, `workflow:` or `plan:` name.
pub async fn add(admin: &PgPool, price: &NewPrice) -> Result<PriceVersion> {
    let item_ok = ["model:", "tool:", "workflow:", "plan:"]
        .iter()
        .any(|kind| price.item.len() > kind.len() && price.item.starts_with(kind));
    if !item_ok {
        return Err(Error::Invalid(format!(
            "{:?} is not a priced item: name it model:<name>, tool:<name>, workflow:<name> or plan:<name>",
            price.item
        )));
    }
    let row = sqlx::query(&format!(
        "INSERT INTO price_versions (item, input_per_mtok, output_per_mtok, cached_input_per_mtok, \
                per_unit, included, valid_from) \
         VALUES ($1, $2, $3, $4, $5, $6, coalesce(to_timestamp($7::bigint / 1000.0), now())) \
         RETURNING {COLUMNS}"
    ))
    .bind(&price.item)
    .bind(price.input_per_mtok)
    .bind(price.output_per_mtok)
    .bind(price.cached_input_per_mtok)
    .bind(price.per_unit)
    .bind(price.included)
    .bind(price.valid_from_ms)
    .fetch_one(admin)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("P0001") => {
            Error::Invalid(db.message().to_owned())
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => Error::Invalid(
            format!("{} already has a version starting then", price.item),
        ),
        other => Error::Postgres(other),
    })?;
    version(&row)
}

/// The versions of `item` (or of every item), oldest first.
pub async fn list(pool: &PgPool, item: Option<&str>) -> Result<Vec<PriceVersion>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM price_versions WHERE $1::text IS NULL OR item = $1 \
          ORDER BY item, valid_from"
    ))
    .bind(item)
    .fetch_all(pool)
    .await?;
    rows.iter().map(version).collect()
}

/// Sets the billing currency (owner role); refused once any invoice exists.
pub async fn set_currency(admin: &PgPool, code: &str) -> Result<Currency> {
    let currency = Currency::new(code)?;
    sqlx::query("UPDATE billing_settings SET currency = $1")
        .bind(currency.code())
        .execute(admin)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("P0001") => {
                Error::Invalid(db.message().to_owned())
            }
            other => Error::Postgres(other),
        })?;
    Ok(currency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: i64, item: &str, input: i64, from: i64) -> PriceVersion {
        PriceVersion {
            id,
            item: item.into(),
            input_per_mtok: input,
            output_per_mtok: 0,
            cached_input_per_mtok: 0,
            per_unit: 0,
            included: 0,
            valid_from_ms: from,
            created_at_ms: 0,
        }
    }

    #[test]
    fn tools_and_workflows_without_a_price_of_their_own_take_the_catch_all() {
        let book = PriceBook::new(
            Currency::new("USD").unwrap(),
            vec![
                version(1, "tool:*", 0, 0),
                version(2, "tool:lookup_order", 0, 0),
                version(3, "workflow:*", 0, 0),
            ],
        );
        assert_eq!(book.in_force("tool:lookup_order", 5).map(|v| v.id), Some(2));
        assert_eq!(
            book.in_force("tool:create_ticket", 5).map(|v| v.id),
            Some(1)
        );
        assert_eq!(book.in_force("workflow:faq", 5).map(|v| v.id), Some(3));
        assert_eq!(book.in_force("model:sim-small", 5), None);
    }

    #[test]
    fn the_version_in_force_is_the_latest_started() {
        let book = PriceBook::new(
            Currency::new("USD").unwrap(),
            vec![
                version(2, "model:a", 20, 1_000),
                version(1, "model:a", 10, 0),
                version(3, "model:b", 5, 500),
            ],
        );
        assert_eq!(book.in_force("model:a", 999).map(|v| v.id), Some(1));
        assert_eq!(book.in_force("model:a", 1_000).map(|v| v.id), Some(2));
        assert_eq!(book.in_force("model:b", 499), None);
        assert_eq!(book.in_force("model:c", 10_000), None);
        assert_eq!(book.changes_between(0, 1_000), vec![500]);
        assert_eq!(book.changes_between(-1, 2_000), vec![0, 500, 1_000]);
        assert_eq!(book.version(3).map(|v| v.input_per_mtok), Some(5));
    }

    #[test]
    fn cached_tokens_are_part_of_the_input_at_their_own_rate() {
        let mut v = version(1, "model:a", 1_000_000, 0);
        v.cached_input_per_mtok = 100_000;
        v.output_per_mtok = 4_000_000;
        // 1M input of which 400k cached, 500k output: 0.6 + 0.04 + 2.0.
        assert_eq!(
            v.tokens_cost(1_000_000, 500_000, 400_000).decimal(),
            "2.640000000000"
        );
    }
}
