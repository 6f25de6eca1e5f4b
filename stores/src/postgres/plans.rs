//! Plans and subscriptions: what a tenant may use. A plan names requests and tokens per minute,
//! a monthly token budget, concurrent requests and the models allowed; a tenant is subscribed
//! to one plan, or to none (no limits). Periods are calendar months (UTC).

use serde::Serialize;
use sqlx::{types::Uuid, Connection, PgConnection, PgPool, Row};

use crate::{billing::budgets::Budget, Error, Result};

/// Limits of one kind of holder (a plan, or a key's own); `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub monthly_tokens: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Models that may be called by name; `None` is every enabled model.
    pub allowed_models: Option<Vec<String>>,
}

impl Limits {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }

    /// Every problem with the limits (zero is not a limit: leave it out instead).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let zero = |name: &str, value: Option<u64>| {
            (value == Some(0))
                .then(|| format!("{name} must be at least 1 (leave it out for no limit)"))
        };
        problems.extend(zero(
            "requests per minute",
            self.requests_per_minute.map(u64::from),
        ));
        problems.extend(zero(
            "tokens per minute",
            self.tokens_per_minute.map(u64::from),
        ));
        problems.extend(zero("monthly tokens", self.monthly_tokens));
        problems.extend(zero("max concurrent", self.max_concurrent.map(u64::from)));
        if let Some(models) = &self.allowed_models {
            if models.iter().any(|m| m.trim().is_empty()) {
                problems.push("allowed models must not be empty names".to_owned());
            }
        }
        problems
    }

    /// Whether `model` may be called by name.
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Plan {
    pub name: String,
    #[serde(flatten)]
    pub limits: Limits,
    /// Tenants subscribed to it.
    pub tenants: i64,
}

/// A change to some of a plan's limits: `Some(None)` removes a limit.
#[derive(Debug, Clone, Default)]
pub struct LimitsChange {
    pub requests_per_minute: Option<Option<u32>>,
    pub tokens_per_minute: Option<Option<u32>>,
    pub monthly_tokens: Option<Option<u64>>,
    pub max_concurrent: Option<Option<u32>>,
    pub allowed_models: Option<Option<Vec<String>>>,
}

impl LimitsChange {
    /// `limits` with the change applied.
    pub fn apply(&self, limits: &Limits) -> Limits {
        Limits {
            requests_per_minute: self
                .requests_per_minute
                .unwrap_or(limits.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.unwrap_or(limits.tokens_per_minute),
            monthly_tokens: self.monthly_tokens.unwrap_or(limits.monthly_tokens),
            max_concurrent: self.max_concurrent.unwrap_or(limits.max_concurrent),
            allowed_models: self
                .allowed_models
                .clone()
                .unwrap_or_else(|| limits.allowed_models.clone()),
        }
    }
}

/// Reads the limits from columns `first..first + 5` of `row`, in the order of [`Limits`].
pub(crate) fn limits_from_row(row: &sqlx::postgres::PgRow, first: usize) -> Result<Limits> {
    let positive = |value: Option<i64>| value.and_then(|v| u64::try_from(v).ok());
    let rpm: Option<i32> = row.try_get(first)?;
    let tpm: Option<i32> = row.try_get(first + 1)?;
    let monthly: Option<i64> = row.try_get(first + 2)?;
    let concurrent: Option<i32> = row.try_get(first + 3)?;
    let models: Option<Vec<String>> = row.try_get(first + 4)?;
    let small = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
    Ok(Limits {
        requests_per_minute: small(rpm),
        tokens_per_minute: small(tpm),
        monthly_tokens: positive(monthly),
        max_concurrent: small(concurrent),
        allowed_models: models,
    })
}

fn column(value: Option<u32>) -> Option<i32> {
    value.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
}

fn validated(name: &str, limits: &Limits) -> Result<()> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(Error::Invalid(
            "plan name must be 1 to 100 characters".into(),
        ));
    }
    let problems = limits.validate();
    if !problems.is_empty() {
        return Err(Error::Invalid(format!(
            "plan {name}: {}",
            problems.join("; ")
        )));
    }
    Ok(())
}

/// Creates a plan (the owner role, or the runtime role for a platform admin).
pub async fn create_plan(conn: &mut PgConnection, name: &str, limits: &Limits) -> Result<()> {
    validated(name, limits)?;
    let inserted = sqlx::query(
        "INSERT INTO plans (name, requests_per_minute, tokens_per_minute, monthly_tokens, max_concurrent, allowed_models)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name.trim())
    .bind(column(limits.requests_per_minute))
    .bind(column(limits.tokens_per_minute))
    .bind(limits.monthly_tokens.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
    .bind(column(limits.max_concurrent))
    .bind(&limits.allowed_models)
    .execute(conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Invalid(format!(
            "a plan named {name:?} already exists"
        )));
    }
    Ok(())
}

/// Changes some of a plan's limits (the owner role, or the runtime role for a platform admin); they apply to every subscribed tenant at once
/// (edges are told through `sluice_auth`). Returns the plan as it now is.
pub async fn update_plan(
    conn: &mut PgConnection,
    name: &str,
    change: &LimitsChange,
) -> Result<Plan> {
    let mut tx = conn.begin().await?;
    let row = sqlx::query(
        "SELECT requests_per_minute, tokens_per_minute, monthly_tokens, max_concurrent, allowed_models
           FROM plans WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::NotFound(format!("no plan named {name:?}")))?;
    let limits = change.apply(&limits_from_row(&row, 0)?);
    validated(name, &limits)?;
    sqlx::query(
        "UPDATE plans SET requests_per_minute = $2, tokens_per_minute = $3, monthly_tokens = $4,
                max_concurrent = $5, allowed_models = $6, updated_at = now()
          WHERE name = $1",
    )
    .bind(name)
    .bind(column(limits.requests_per_minute))
    .bind(column(limits.tokens_per_minute))
    .bind(
        limits
            .monthly_tokens
            .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
    )
    .bind(column(limits.max_concurrent))
    .bind(&limits.allowed_models)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let plans = list_plans(conn).await?;
    plans
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::NotFound(format!("no plan named {name:?}")))
}

/// Every plan, by name, with how many tenants are subscribed.
pub async fn list_plans<'e>(conn: impl sqlx::PgExecutor<'e>) -> Result<Vec<Plan>> {
    let rows = sqlx::query(
        "SELECT p.requests_per_minute, p.tokens_per_minute, p.monthly_tokens, p.max_concurrent,
                p.allowed_models, p.name, coalesce(c.tenants, 0)
           FROM plans p LEFT JOIN sluice_plan_subscribers() c ON c.plan_id = p.id
          ORDER BY p.name",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Plan {
                limits: limits_from_row(row, 0)?,
                name: row.try_get(5)?,
                tenants: row.try_get(6)?,
            })
        })
        .collect()
}

/// Subscribes a tenant to a plan, replacing its current one (owner role, or the runtime role in
/// the tenant's transaction). The new limits apply at once; tokens already used this month
/// still count against the new budget.
pub async fn subscribe<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    tenant_id: Uuid,
    plan: &str,
) -> Result<()> {
    let updated = sqlx::query(
        "INSERT INTO subscriptions (tenant_id, plan_id)
         SELECT $1, id FROM plans WHERE name = $2
         ON CONFLICT (tenant_id) DO UPDATE SET plan_id = excluded.plan_id, updated_at = now()",
    )
    .bind(tenant_id)
    .bind(plan)
    .execute(conn)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::NotFound(format!("no plan named {plan:?}")));
    }
    Ok(())
}

/// Ends a tenant's subscription (owner role): it has no limits from then on.
pub async fn unsubscribe(admin: &PgPool, tenant_id: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM subscriptions WHERE tenant_id = $1")
        .bind(tenant_id)
        .execute(admin)
        .await?;
    Ok(())
}

/// Deletes a plan no tenant is subscribed to (the owner role, or the runtime role for a
/// platform admin).
pub async fn delete_plan(conn: &mut PgConnection, name: &str) -> Result<()> {
    let subscribed: Option<i64> = sqlx::query_scalar(
        "SELECT coalesce(c.tenants, 0) FROM plans p LEFT JOIN sluice_plan_subscribers() c ON c.plan_id = p.id
          WHERE p.name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    match subscribed {
        None => Err(Error::NotFound(format!("no plan named {name:?}"))),
        Some(n) if n > 0 => Err(Error::Invalid(format!(
            "{n} tenant(s) are on plan {name:?}; move them to another plan first"
        ))),
        Some(_) => {
            // A subscription made meanwhile fails the delete on its foreign key.
            sqlx::query("DELETE FROM plans WHERE name = $1")
                .bind(name)
                .execute(conn)
                .await?;
            Ok(())
        }
    }
}

/// What an active tenant's callers may do: its plan and its own spend budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantTerms {
    pub plan: Option<(String, Limits)>,
    pub spend: Option<Budget>,
}

/// Whether the tenant is active, and its plan and spend budget, read through row-level
/// security (for callers known by a user's session rather than a key). `None`: no such active
/// tenant.
pub async fn tenant_plan(app: &PgPool, tenant_id: Uuid) -> Result<Option<TenantTerms>> {
    let mut tx = super::tenant_transaction(app, tenant_id).await?;
    let active: Option<bool> = sqlx::query_scalar("SELECT status = 'active' FROM tenants")
        .fetch_optional(&mut *tx)
        .await?;
    if active != Some(true) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT p.requests_per_minute, p.tokens_per_minute, p.monthly_tokens, p.max_concurrent,
                p.allowed_models, p.name
           FROM subscriptions s JOIN plans p ON p.id = s.plan_id",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let budget = sqlx::query(
        "SELECT monthly_micros, alert_percent FROM spend_budgets
          WHERE tenant_id = $1 AND key_id IS NULL",
    )
    .bind(tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let plan = match row {
        Some(row) => Some((row.try_get(5)?, limits_from_row(&row, 0)?)),
        None => None,
    };
    let spend = match budget {
        Some(row) => Budget::from_row(&row, 0)?,
        None => None,
    };
    Ok(Some(TenantTerms { plan, spend }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_touches_only_what_it_names() {
        let limits = Limits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(1000),
            ..Limits::default()
        };
        let change = LimitsChange {
            tokens_per_minute: Some(None),
            monthly_tokens: Some(Some(5)),
            ..LimitsChange::default()
        };
        let changed = change.apply(&limits);
        assert_eq!(changed.requests_per_minute, Some(60));
        assert_eq!(changed.tokens_per_minute, None);
        assert_eq!(changed.monthly_tokens, Some(5));
        assert!(Limits::default().is_unlimited());
        assert!(!changed.is_unlimited());
    }

    #[test]
    fn zero_is_refused_and_models_are_checked_by_name() {
        let limits = Limits {
            requests_per_minute: Some(0),
            allowed_models: Some(vec!["sim-small".into()]),
            ..Limits::default()
        };
        assert_eq!(limits.validate().len(), 1);
        assert!(limits.allows("sim-small"));
        assert!(!limits.allows("sim-large"));
        assert!(Limits::default().allows("anything"));
    }
}
