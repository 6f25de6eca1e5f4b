//! Rate limits and quotas at the edge: a chat request is admitted against its key's and its
//! tenant's counters ([`sluice_stores::limits`], shared by every edge replica) before it goes
//! on the broker, and settled when its reply is done.
//!
//! - Admission reserves the request's tokens as an estimate: the prompt as Sluice counts it,
//!   plus `max_tokens` (or [`LimitsConfig::assumed_output_tokens`] when the request sets none);
//!   and for a spend budget, what those tokens would cost on the model asked for (for `auto`,
//!   the dearest model the caller may use) at today's prices.
//! - The reply's real usage settles the reservation: unused tokens go back, tokens beyond the
//!   estimate are taken; its spend is what the model that answered costs for them. A failed model call gives its reservation back. A caller that goes
//!   away mid-stream changes nothing: the edge reads the reply to its end for it (the model
//!   call goes on) and settles then, holding the concurrency place until then
//!   ([`Subscription`](crate::replies::Subscription) does this).
//! - Over a limit: 429 in OpenAI's shape, with `Retry-After` (when the counter will have room
//!   for this request, if nothing else takes it) and the `x-ratelimit-*` headers, which every
//!   admitted response carries too.
//! - A key whose plan and own settings limit nothing never touches the counters.
//! - A counter whose limit is large next to one request is drawn on through this edge's share
//!   of it ([`shares`]): most requests are then admitted and settled in memory, and Redis
//!   sees a call now and then per tenant rather than one per request.

mod shares;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sluice_stores::{
    billing::{budgets, money::micros_text, prices::Prices, PriceBook},
    clickhouse::usage,
    limits::{
        Amounts, Ask, Counter, Demand, Holder, Kind, Limiter, Month, Settle, Standing, Verdict,
    },
    postgres::{keys::KeyGrant, models::ModelCatalog},
    ClickHouse, AUTO_MODEL,
};
use sqlx::types::Uuid;

use crate::{error::ApiError, notify::Notifier};
use shares::{Return, Route, Shares};

/// What the edge does about limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub assumed_output_tokens: u32,
    /// When Redis cannot be reached: `refuse` limited keys' requests with 503 (a limit that
    /// cannot be checked is not honoured by admitting), or `admit` them unchecked.
    pub when_store_down: WhenStoreDown,
    /// Logins and registrations one network address may attempt a minute (0: no limit).
    /// Behind a proxy every caller shares its address: raise it there, or limit at the proxy.
    pub login_attempts_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            assumed_output_tokens: 512,
            when_store_down: WhenStoreDown::Refuse,
            login_attempts_per_minute: 20,
        }
    }
}

/// See [`LimitsConfig::when_store_down`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenStoreDown {
    Refuse,
    Admit,
}

/// The edge's side of the limits.
pub struct EdgeLimits {
    store: Arc<Store>,
    config: LimitsConfig,
    refusals: prometheus::IntCounterVec,
    /// Tells tenants of budgets alerting and exceeded.
    notifier: Arc<Notifier>,
}

/// The counters as this edge uses them: Redis, this edge's shares of it, the settlements
/// waiting to be sent, and ClickHouse and the price book to seed a month's budget from.
struct Store {
    limiter: Limiter,
    clickhouse: ClickHouse,
    prices: Arc<Prices>,
    /// How long a concurrency place is held if its request is never settled (its edge died).
    lease: Duration,
    store_errors: prometheus::IntCounter,
    /// Calls to Redis, by purpose.
    calls: prometheus::IntCounterVec,
    /// Settlements waiting to be sent, by tenant.
    pending: PendingSettles,
    shares: Shares,
    /// When a failed sync was last logged.
    last_sync_warning: Mutex<Option<std::time::Instant>>,
}

/// How often failed share syncs are logged at most.
const SYNC_WARNING_EVERY: Duration = Duration::from_secs(10);

/// A request's settlement, waiting for [`Store::keep`].
struct PendingSettle {
    request_id: String,
    counters: Vec<Counter>,
    month: Month,
    reserved: Amounts,
    used: Amounts,
}

/// Settlements waiting to be sent, for counters counted alone. Replies end independently, so
/// settling each on its own would cost a Redis call (and a task) per request; instead one task
/// sends what has gathered, each tenant's in one call, as soon as it is free: no wait when
/// traffic is light, batches when it is heavy. Bounded by the requests in flight (each settles
/// once).
#[derive(Default)]
struct PendingSettles {
    by_tenant: Mutex<HashMap<Uuid, Vec<PendingSettle>>>,
    wake: tokio::sync::Notify,
    /// Held while a batch is being sent, so a final flush waits for one already taken.
    sending: tokio::sync::Mutex<()>,
}

/// The retry the counters' script gives a budget whose room is held in other edges' shares
/// (it comes back within moments), as against one refused for the month.
const SHARE_RETRY_MS: u64 = 1000;

/// What a spend budget is telling of.
#[derive(Debug, Clone, Copy)]
enum Budgeted {
    /// The month's spend, with reservations in flight, reached the alert.
    Alerting { spent_micros: u64 },
    /// A request was refused for the rest of the month; `spent`: the budget is used up to its
    /// limit (otherwise what is left cannot cover the request).
    Refused { spent: bool },
}

/// Settlements sent in one call at most: the script holds Redis while it runs.
const SETTLE_BATCH: usize = 64;

impl PendingSettles {
    fn push(&self, tenant: Uuid, settle: PendingSettle) {
        if let Ok(mut by_tenant) = self.by_tenant.lock() {
            by_tenant.entry(tenant).or_default().push(settle);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<Uuid, Vec<PendingSettle>> {
        self.by_tenant
            .lock()
            .map(|mut by_tenant| std::mem::take(&mut *by_tenant))
            .unwrap_or_default()
    }

    /// Sends everything waiting: each tenant's in calls of [`SETTLE_BATCH`], tenants at once.
    async fn send(&self, store: &Store) {
        let _sending = self.sending.lock().await;
        let waiting = self.take();
        let calls = waiting.iter().flat_map(|(tenant, settles)| {
            settles
                .chunks(SETTLE_BATCH)
                .map(move |batch| Self::send_batch(store, *tenant, batch))
        });
        futures::future::join_all(calls).await;
    }

    async fn send_batch(store: &Store, tenant: Uuid, batch: &[PendingSettle]) {
        let settles: Vec<Settle<'_>> = batch
            .iter()
            .map(|p| Settle {
                request_id: &p.request_id,
                counters: &p.counters,
                month: &p.month,
                reserved: p.reserved,
                used: p.used,
            })
            .collect();
        store.calls.with_label_values(&["settle"]).inc();
        if let Err(error) = store.limiter.settle_many(tenant, &settles).await {
            store.store_errors.inc();
            tracing::warn!(%error, %tenant, requests = settles.len(), "settling requests' limits failed; their reservations stay spent and their concurrency places free when their leases end");
        }
    }
}

impl Store {
    /// Sends settlements as they gather and looks after this edge's shares, for as long as
    /// the process runs.
    async fn keep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(shares::SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.pending.wake.notified() => {}
                () = self.shares.wake.notified() => {}
                _ = tick.tick() => {}
            }
            tokio::join!(self.pending.send(&self), self.sync_shares(false));
        }
    }

    /// Tops up, hands back and renews the shares that need it (`closing`: hands everything
    /// back).
    async fn sync_shares(&self, closing: bool) {
        for tenant in self.shares.due(closing) {
            let _stripe = self.shares.stripe(tenant).lock().await;
            for sync in self.shares.sync(tenant, closing) {
                let demand = Demand {
                    tenant,
                    request_id: "",
                    counters: &sync.counters,
                    asks: &sync.asks,
                    shares_only: true,
                    amounts: Amounts::default(),
                    lease: self.lease,
                    month: &sync.month,
                };
                match self.admit(&demand, "sync").await {
                    Ok(Verdict::Admitted(standings)) => self.shares.synced(&sync, &standings),
                    Ok(verdict) => self.sync_failed(tenant, &format!("{verdict:?}")),
                    Err(error) => self.sync_failed(tenant, &error.to_string()),
                }
            }
        }
    }

    /// Counts a failed sync; says so in the log once per [`SYNC_WARNING_EVERY`] at most, as
    /// syncs are retried every few hundred milliseconds while Redis stays away.
    fn sync_failed(&self, tenant: Uuid, why: &str) {
        self.store_errors.inc();
        let now = std::time::Instant::now();
        let mut last = self
            .last_sync_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < SYNC_WARNING_EVERY) {
            return;
        }
        *last = Some(now);
        tracing::warn!(%tenant, why, "syncing this edge's shares of the limits failed; they are tried again shortly (further failures in the next 10 s are only counted)");
    }

    /// Asks Redis for `demand` (counted under `purpose`), first seeding each month's budget
    /// counter Redis lacks.
    async fn admit(&self, demand: &Demand<'_>, purpose: &str) -> sluice_stores::Result<Verdict> {
        self.calls.with_label_values(&[purpose]).inc();
        let mut verdict = self.limiter.admit(demand).await?;
        // Each budget counter is seeded once at most.
        for _ in demand.counters.iter().filter(|c| c.kind.is_budget()) {
            let Verdict::Unseeded(counter) = verdict else {
                break;
            };
            self.seed_month(demand.tenant, &counter, demand.month)
                .await?;
            verdict = self.limiter.admit(demand).await?;
        }
        Ok(verdict)
    }

    /// Seeds `tenant`'s budget `counter` for `month` with what its usage facts hold — tokens,
    /// or spend priced by the price book — leaving out the requests whose use this edge still
    /// holds to hand over itself.
    async fn seed_month(
        &self,
        tenant: Uuid,
        counter: &Counter,
        month: &Month,
    ) -> sluice_stores::Result<()> {
        let excluding = self.shares.unhanded_requests(tenant, counter, month);
        let used = match (counter.kind, counter.holder) {
            (Kind::MonthlySpend, holder) => {
                let key = match holder {
                    Holder::Key(key) => Some(key),
                    Holder::Tenant | Holder::Address => None,
                };
                let book = self.prices.get();
                let range = (month.start_ms, month.end_ms);
                budgets::spent(&self.clickhouse, &book, tenant, key, range, &excluding).await?
            }
            _ => {
                let seconds = |ms: i64| u32::try_from(ms.div_euclid(1000)).unwrap_or(u32::MAX);
                usage::tokens_used(
                    &self.clickhouse,
                    &tenant.to_string(),
                    seconds(month.start_ms),
                    seconds(month.end_ms),
                    &excluding,
                )
                .await?
            }
        };
        tracing::info!(%tenant, month = %month.label, budget = kind_label(counter.kind), used, excluded = excluding.len(), "monthly budget counter seeded from usage");
        self.limiter.seed_month(tenant, counter, month, used).await
    }
}

/// The counters a key's grant puts on a request: the key's own limits and spend budget, and
/// its plan's limits and its tenant's spend budget.
pub fn counters(grant: &KeyGrant) -> Vec<Counter> {
    let mut counters = Vec::new();
    let mut add = |holder, limits: &sluice_stores::postgres::plans::Limits| {
        let kinds = [
            (
                Kind::RequestsPerMinute,
                limits.requests_per_minute.map(u64::from),
            ),
            (
                Kind::TokensPerMinute,
                limits.tokens_per_minute.map(u64::from),
            ),
            (Kind::Concurrent, limits.max_concurrent.map(u64::from)),
            (Kind::MonthlyTokens, limits.monthly_tokens),
        ];
        for (kind, limit) in kinds {
            if let Some(limit) = limit {
                counters.push(Counter {
                    holder,
                    kind,
                    limit,
                });
            }
        }
    };
    add(Holder::Key(grant.key_id), &grant.key);
    if let Some((_, plan)) = &grant.plan {
        add(Holder::Tenant, plan);
    }
    let budgets = [
        (Holder::Key(grant.key_id), grant.key_spend),
        (Holder::Tenant, grant.tenant_spend),
    ];
    for (holder, budget) in budgets {
        if let Some(budget) = budget {
            counters.push(Counter {
                holder,
                kind: Kind::MonthlySpend,
                limit: budget.monthly_micros,
            });
        }
    }
    counters
}

/// The spend budget behind `counter` of `grant`.
fn budget_of(
    grant: &KeyGrant,
    counter: Counter,
) -> Option<sluice_stores::billing::budgets::Budget> {
    match counter.holder {
        Holder::Tenant => grant.tenant_spend,
        Holder::Key(_) => grant.key_spend,
        Holder::Address => None,
    }
}

/// What `input` and `output` tokens cost on `model` at `at_ms`, in micro-units rounded up;
/// for `auto`, on the dearest model of the catalogue that `grant` may use (the router may
/// choose any of them).
fn estimated_spend(
    book: &PriceBook,
    catalog: &ModelCatalog,
    grant: &KeyGrant,
    model: &str,
    at_ms: i64,
    (input, output): (u64, u64),
) -> u64 {
    let cost = |name: &str| budgets::request_cost(book, name, at_ms, input, output, 0);
    if model != AUTO_MODEL {
        return cost(model).unwrap_or(0);
    }
    catalog
        .snapshot()
        .iter()
        .filter(|m| grant.allows(&m.name))
        .filter_map(|m| cost(&m.name))
        .max()
        .unwrap_or(0)
}

impl EdgeLimits {
    /// Limits counted in `limiter`, a month's budget seeded from `clickhouse`'s usage facts
    /// (spend priced by `prices`); concurrency places are held at most `lease` by a request
    /// nobody settles.
    pub fn new(
        limiter: Limiter,
        clickhouse: ClickHouse,
        prices: Arc<Prices>,
        config: LimitsConfig,
        lease: Duration,
        (metrics, notifier): (&sluice_pipelines::metrics::Metrics, Arc<Notifier>),
    ) -> Self {
        let store = Arc::new(Store {
            shares: Shares::new(limiter.share_lapse()),
            limiter,
            clickhouse,
            prices,
            lease,
            store_errors: metrics.limit_store_errors.clone(),
            calls: metrics.limit_store_calls.clone(),
            pending: PendingSettles::default(),
            last_sync_warning: Mutex::new(None),
        });
        tokio::spawn(store.clone().keep());
        Self {
            store,
            config,
            refusals: metrics.limit_refusals.clone(),
            notifier,
        }
    }

    /// The price book as this edge follows it.
    pub fn prices(&self) -> Arc<PriceBook> {
        self.store.prices.get()
    }

    /// Sends the settlements still waiting and hands this edge's shares back (when the edge
    /// stops).
    pub async fn flush(&self) {
        let store = &self.store;
        store.pending.send(store).await;
        store.sync_shares(true).await;
    }

    /// Admits a request for `model` (of `catalog`) of `prompt_tokens` asking for at most
    /// `max_tokens`, or refuses it.
    pub async fn admit(
        self: &Arc<Self>,
        grant: &KeyGrant,
        request_id: &str,
        (model, catalog): (&str, &ModelCatalog),
        prompt_tokens: i64,
        max_tokens: Option<i32>,
    ) -> Result<Option<Admission>, ApiError> {
        let counters = counters(grant);
        if counters.is_empty() {
            return Ok(None);
        }
        let output = max_tokens
            .and_then(|m| u64::try_from(m).ok())
            .unwrap_or(u64::from(self.config.assumed_output_tokens));
        let input = u64::try_from(prompt_tokens).unwrap_or(0);
        let now = sluice_pipelines::now_ms();
        let spend_micros = if counters.iter().any(|c| c.kind == Kind::MonthlySpend) {
            let book = self.store.prices.get();
            estimated_spend(&book, catalog, grant, model, now, (input, output))
        } else {
            0
        };
        let amounts = Amounts {
            tokens: input.saturating_add(output),
            spend_micros,
        };
        let month = Month::of(now);
        let tenant = grant.tenant_id;
        let shares = &self.store.shares;
        let mut routes = Vec::new();
        shares.take(tenant, &counters, amounts, &month, &mut routes, false);
        let admission = |routes: Vec<Route>, standings: Vec<Standing>| Admission {
            limits: self.clone(),
            tenant,
            request_id: request_id.to_owned(),
            standings: shares.standings(tenant, &counters, &routes, &month, &standings),
            counters: counters.clone(),
            routes,
            reserved: amounts,
            month: month.clone(),
            settled: false,
            leased_at: std::time::Instant::now(),
        };
        if routes.iter().all(|r| *r == Route::Taken) {
            return Ok(Some(self.watched(grant, admission(routes, Vec::new()))));
        }
        // Calls about a tenant's shares go to Redis one at a time. A share that was answered
        // while this request waited may have room now; one this request would leave low is
        // topped up in the same call rather than in one of its own.
        let _stripe = if routes.iter().any(|r| *r != Route::Alone) {
            let stripe = shares.stripe(tenant).lock().await;
            shares.untake(tenant, &counters, &routes, amounts, &month);
            routes.clear();
            shares.take(tenant, &counters, amounts, &month, &mut routes, true);
            if routes.iter().all(|r| *r == Route::Taken) {
                return Ok(Some(self.watched(grant, admission(routes, Vec::new()))));
            }
            Some(stripe)
        } else {
            None
        };
        let asks = shares.asks(tenant, &counters, &routes, &month);
        let (asked, asks): (Vec<Counter>, Vec<Ask>) = counters
            .iter()
            .zip(&routes)
            .zip(asks)
            .filter(|((_, route), _)| **route != Route::Taken)
            .map(|((counter, _), ask)| (*counter, ask))
            .unzip();
        let demand = Demand {
            tenant,
            request_id,
            counters: &asked,
            asks: &asks,
            shares_only: false,
            amounts,
            lease: self.store.lease,
            month: &month,
        };
        let verdict = self.store.admit(&demand, "admit").await;
        if !matches!(verdict, Ok(Verdict::Admitted(_))) {
            shares.untake(tenant, &counters, &routes, amounts, &month);
        }
        match verdict {
            Ok(Verdict::Admitted(standings)) => {
                shares.admitted(tenant, &asked, &asks, &standings, Some(amounts), &month);
                Ok(Some(self.watched(grant, admission(routes, standings))))
            }
            Ok(Verdict::Refused {
                counter,
                retry_after_ms,
                spent,
            }) => {
                self.refusals
                    .with_label_values(&[kind_label(counter.kind)])
                    .inc();
                let currency = self.store.prices.get().currency;
                // Refused for the rest of the month, not for a moment while other edges hold
                // room in their shares (those refusals say to retry in a second).
                let for_the_month = retry_after_ms.is_some_and(|ms| ms > SHARE_RETRY_MS);
                if counter.kind == Kind::MonthlySpend && for_the_month {
                    self.tell_of_budget(grant, counter, &month, Budgeted::Refused { spent });
                }
                Err(refusal(
                    counter,
                    (retry_after_ms, spent),
                    amounts,
                    currency.code(),
                ))
            }
            Ok(Verdict::Unseeded(_)) => self.store_down(sluice_stores::Error::Corrupt(
                "the month's budget counter is missing right after it was seeded".into(),
            )),
            Err(e) => self.store_down(e),
        }
    }

    /// `admission`, after telling its tenant of each spend budget it brings to its alert.
    fn watched(&self, grant: &KeyGrant, admission: Admission) -> Admission {
        for standing in &admission.standings {
            let counter = standing.counter;
            if counter.kind != Kind::MonthlySpend {
                continue;
            }
            let spent = counter.limit.saturating_sub(standing.remaining);
            if budget_of(grant, counter).is_some_and(|b| b.alerting(spent)) {
                let alerting = Budgeted::Alerting {
                    spent_micros: spent,
                };
                self.tell_of_budget(grant, counter, &admission.month, alerting);
            }
        }
        admission
    }

    /// Tells the tenant what its spend budget `counter` came to.
    fn tell_of_budget(&self, grant: &KeyGrant, counter: Counter, month: &Month, what: Budgeted) {
        let Some(budget) = budget_of(grant, counter) else {
            return;
        };
        let key_id = match counter.holder {
            Holder::Key(key) => Some(key),
            Holder::Tenant | Holder::Address => None,
        };
        let holder = key_id.map_or_else(|| "tenant".to_owned(), |k| format!("key:{k}"));
        let currency = self.store.prices.get().currency;
        let money = |micros: u64| micros_text(i64::try_from(micros).unwrap_or(i64::MAX));
        let mut data = serde_json::json!({
            "key_id": key_id,
            "month": month.label,
            "currency": currency.code(),
            "monthly": money(budget.monthly_micros),
            "alert_percent": budget.alert_percent,
        });
        let tenant = grant.tenant_id;
        let (kind, event_id) = match what {
            Budgeted::Alerting { spent_micros } => {
                data["spent"] = money(spent_micros).into();
                let percent = budget.alert_percent.unwrap_or(100);
                (
                    "usage.threshold_reached",
                    format!(
                        "usage.threshold_reached:{tenant}:{holder}:{}:{}:{percent}",
                        month.label, budget.monthly_micros
                    ),
                )
            }
            Budgeted::Refused { spent } => {
                data["exhausted"] = spent.into();
                (
                    "budget.exceeded",
                    format!(
                        "budget.exceeded:{tenant}:{holder}:{}:{}",
                        month.label, budget.monthly_micros
                    ),
                )
            }
        };
        self.notifier.notify(tenant, event_id, kind, &data);
    }

    /// Counts a login or registration attempt from `address`: 429 once it has made
    /// `login_attempts_per_minute` in the last minute. If Redis cannot be reached the attempt
    /// goes on (password hashing stays bounded by the edge's places for it).
    pub async fn throttle_login(&self, address: Option<&str>) -> Result<(), ApiError> {
        let (Some(address), limit) = (address, self.config.login_attempts_per_minute) else {
            return Ok(());
        };
        if limit == 0 {
            return Ok(());
        }
        let address = attempt_source(address);
        let counters = [Counter {
            holder: Holder::Address,
            kind: Kind::RequestsPerMinute,
            limit: u64::from(limit),
        }];
        let month = Month::of(sluice_pipelines::now_ms());
        let demand = Demand {
            tenant: sluice_stores::limits::address_scope(&address),
            request_id: "login",
            counters: &counters,
            asks: &[],
            shares_only: false,
            amounts: Amounts::default(),
            lease: self.store.lease,
            month: &month,
        };
        self.store.calls.with_label_values(&["login"]).inc();
        match self.store.limiter.admit(&demand).await {
            Ok(Verdict::Refused {
                counter,
                retry_after_ms,
                ..
            }) => {
                self.refusals.with_label_values(&["login_attempts"]).inc();
                Err(refusal(
                    counter,
                    (retry_after_ms, false),
                    Amounts::default(),
                    "",
                ))
            }
            Ok(_) => Ok(()),
            Err(error) => {
                self.store.store_errors.inc();
                tracing::warn!(%error, "login attempts cannot be counted; letting this one through");
                Ok(())
            }
        }
    }

    fn store_down(&self, error: sluice_stores::Error) -> Result<Option<Admission>, ApiError> {
        self.store.store_errors.inc();
        tracing::warn!(%error, "the limits' counters cannot be reached");
        match self.config.when_store_down {
            WhenStoreDown::Admit => Ok(None),
            WhenStoreDown::Refuse => Err(ApiError::unavailable(
                "Sluice cannot check this key's limits right now; retry shortly.",
            )
            .retry_after(1)),
        }
    }
}

/// Whose attempts count together: an IPv4 address, or an IPv6 address's /64 (one host holds a
/// whole /64 and could otherwise try from each of its addresses).
fn attempt_source(address: &str) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or_else(String::new, |v4| v4.to_string()),
        _ => address.to_owned(),
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::RequestsPerMinute => "requests_per_minute",
        Kind::TokensPerMinute => "tokens_per_minute",
        Kind::Concurrent => "concurrent",
        Kind::MonthlyTokens => "monthly_tokens",
        Kind::MonthlySpend => "monthly_spend",
    }
}

/// The 429 for a demand of `amounts` that `counter` has no room for (money in `currency`):
/// when it will have room (`None`: never), and whether it is a budget spent to its limit.
fn refusal(
    counter: Counter,
    (retry_after_ms, spent): (Option<u64>, bool),
    amounts: Amounts,
    currency: &str,
) -> ApiError {
    let tokens = amounts.tokens;
    let money = |micros: u64| {
        format!(
            "{} {currency}",
            micros_text(i64::try_from(micros).unwrap_or(i64::MAX))
        )
    };
    let whose = match counter.holder {
        Holder::Tenant if counter.kind == Kind::MonthlySpend => "your organization",
        Holder::Tenant => "your organization's plan",
        Holder::Key(_) => "this API key",
        Holder::Address => "your network address",
    };
    let message = match (counter.kind, retry_after_ms) {
        (Kind::TokensPerMinute | Kind::MonthlyTokens, None) => format!(
            "Request too large: it may use {tokens} tokens and {whose} allows {} {}. Lower max_tokens or the prompt.",
            counter.limit,
            if counter.kind == Kind::MonthlyTokens { "a month" } else { "a minute" }
        ),
        (Kind::RequestsPerMinute, _) if counter.holder == Holder::Address => format!(
            "Too many attempts: {whose} may try {} times a minute.",
            counter.limit
        ),
        (Kind::RequestsPerMinute, _) => format!(
            "Rate limit reached for requests: {whose} allows {} requests per minute.",
            counter.limit
        ),
        (Kind::TokensPerMinute, _) => format!(
            "Rate limit reached for tokens: {whose} allows {} tokens per minute, and this request may use {tokens}.",
            counter.limit
        ),
        (Kind::Concurrent, _) => format!(
            "Too many concurrent requests: {whose} allows {} at once.",
            counter.limit
        ),
        (Kind::MonthlyTokens | Kind::MonthlySpend, Some(_)) if !spent => {
            let what = if counter.kind == Kind::MonthlyTokens {
                format!("token budget of {}", counter.limit)
            } else {
                format!("spend budget of {}", money(counter.limit))
            };
            format!(
                "This request may use more than is left of the monthly {what} set for {whose} (some of it held by requests in flight): retry shortly, or lower max_tokens or the prompt."
            )
        }
        (Kind::MonthlyTokens, _) => format!(
            "You exceeded your monthly token budget of {}: it renews at the start of next month (UTC).",
            counter.limit
        ),
        (Kind::MonthlySpend, None) => format!(
            "Request too costly: it may cost {} and {whose} has a monthly spend budget of {}. Lower max_tokens or the prompt.",
            money(amounts.spend_micros),
            money(counter.limit)
        ),
        (Kind::MonthlySpend, _) => format!(
            "You exceeded the monthly spend budget of {} set for {whose}: it renews at the start of next month (UTC), or an admin can raise it.",
            money(counter.limit)
        ),
    };
    let code = match counter.kind {
        Kind::MonthlyTokens | Kind::MonthlySpend => "insufficient_quota",
        _ => "rate_limit_exceeded",
    };
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
    if let Some(ms) = retry_after_ms {
        error = error.retry_after(ms.div_ceil(1000).max(1));
    }
    let mut headers = HeaderMap::new();
    rate_headers(&mut headers, counter, 0, retry_after_ms.map(duration_text));
    error.with_headers(headers)
}

/// Adds OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for a per-minute
/// `counter` (other kinds have none).
fn rate_headers(headers: &mut HeaderMap, counter: Counter, remaining: u64, reset: Option<String>) {
    let [limit_name, remaining_name, reset_name] = match counter.kind {
        Kind::RequestsPerMinute => [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        Kind::TokensPerMinute => [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
        Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => return,
    };
    insert(headers, limit_name, counter.limit.to_string());
    insert(headers, remaining_name, remaining.to_string());
    if let Some(reset) = reset {
        insert(headers, reset_name, reset);
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let seconds = ms / 1000;
    let (hours, minutes, secs) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{secs}s")
    } else if minutes > 0 {
        format!("{minutes}m{secs}s")
    } else {
        let text = format!("{:.3}", ms as f64 / 1000.0);
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// An admitted request's hold on its counters: the tokens it reserved and its concurrency
/// place, until [`Admission::settle`]. Dropped unsettled (the caller went away), it keeps its
/// reservation as spent and frees its place.
pub struct Admission {
    limits: Arc<EdgeLimits>,
    tenant: Uuid,
    request_id: String,
    counters: Vec<Counter>,
    /// How each counter was counted: alone in Redis, or through this edge's share.
    routes: Vec<Route>,
    /// What it reserved.
    reserved: Amounts,
    month: Month,
    standings: Vec<Standing>,
    settled: bool,
    /// When its concurrency leases were last taken or extended.
    leased_at: std::time::Instant,
}

impl Admission {
    /// The counters counted for this request alone in Redis.
    fn alone(&self) -> impl Iterator<Item = &Counter> {
        self.counters
            .iter()
            .zip(&self.routes)
            .filter(|(_, route)| **route == Route::Alone)
            .map(|(counter, _)| counter)
    }

    /// Keeps a long reply's concurrency places: once a third of the lease has passed, extends
    /// it (in the background). A place in a share is kept with the share.
    pub fn keep_alive(&mut self) {
        let concurrent = self.alone().any(|c| c.kind == Kind::Concurrent);
        if !concurrent || self.leased_at.elapsed() < self.limits.store.lease / 3 {
            return;
        }
        self.leased_at = std::time::Instant::now();
        self.extend_in_background();
    }

    /// The `x-ratelimit-*` headers: for requests and for tokens per minute, the tightest of
    /// the key's and the plan's counters.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let tightest = |kind| {
            self.standings
                .iter()
                .filter(|s| s.counter.kind == kind)
                .min_by_key(|s| s.remaining)
        };
        for kind in [Kind::RequestsPerMinute, Kind::TokensPerMinute] {
            if let Some(standing) = tightest(kind) {
                rate_headers(
                    &mut headers,
                    standing.counter,
                    standing.remaining,
                    Some(duration_text(standing.reset_ms)),
                );
            }
        }
        headers
    }

    /// Settles the reservation with the usage of the reply's last chunk: the tokens billed
    /// (a DONE chunk's, or an ERROR chunk's for a reply that broke part-way; none for a call
    /// that failed outright) and what they cost on the model that answered.
    pub fn settle_by(self, last: &sluice_schemas::ReplyChunk) {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let (input, output) = (count(last.input_tokens), count(last.output_tokens));
        let spend_micros = if self.counters.iter().any(|c| c.kind == Kind::MonthlySpend) {
            let book = self.limits.store.prices.get();
            let now = sluice_pipelines::now_ms();
            let cached = count(last.cached_input_tokens);
            budgets::request_cost(&book, &last.model, now, input, output, cached).unwrap_or(0)
        } else {
            0
        };
        self.settle(Amounts {
            tokens: input.saturating_add(output),
            spend_micros,
        });
    }

    /// Settles the reservation to what the reply `used`, and frees the place. Counters in
    /// shares settle in memory; the rest are queued for the edge's settler
    /// ([`PendingSettles`]): the reply waits for neither.
    pub fn settle(mut self, used: Amounts) {
        self.settled = true;
        self.finish(used);
    }

    fn finish(&self, used: Amounts) {
        let store = &self.limits.store;
        if self.routes.iter().any(|r| *r != Route::Alone) {
            store.shares.settle(
                self.tenant,
                &self.counters,
                &self.routes,
                &self.month,
                &Return {
                    request_id: &self.request_id,
                    reserved: self.reserved,
                    used,
                },
            );
        }
        let alone: Vec<Counter> = self.alone().copied().collect();
        if !alone.is_empty() {
            store.pending.push(
                self.tenant,
                PendingSettle {
                    request_id: self.request_id.clone(),
                    counters: alone,
                    month: self.month.clone(),
                    reserved: self.reserved,
                    used,
                },
            );
        }
    }

    /// Extends the admission's concurrency leases on a task of its own: the reply does not
    /// wait for Redis.
    fn extend_in_background(&self) {
        let store = self.limits.store.clone();
        let (tenant, request_id, amounts, month) = (
            self.tenant,
            self.request_id.clone(),
            self.reserved,
            self.month.clone(),
        );
        let counters: Vec<Counter> = self.alone().copied().collect();
        tokio::spawn(async move {
            let demand = Demand {
                tenant,
                request_id: &request_id,
                counters: &counters,
                asks: &[],
                shares_only: false,
                amounts,
                lease: store.lease,
                month: &month,
            };
            store.calls.with_label_values(&["renew"]).inc();
            if let Err(error) = store.limiter.renew(&demand).await {
                store.store_errors.inc();
                tracing::warn!(%error, %request_id, "extending a request's concurrency lease failed; its place frees when its lease ends");
            }
        });
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.settled {
            self.finish(self.reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_stores::{billing::budgets::Budget, postgres::plans::Limits};

    #[test]
    fn attempts_count_per_ipv4_address_and_per_ipv6_slash_64() {
        assert_eq!(attempt_source("203.0.113.7"), "203.0.113.7");
        assert_eq!(attempt_source("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            attempt_source("2001:db8:1:2:bbbb::9"),
            attempt_source("2001:db8:1:2:aaaa::1")
        );
        assert_eq!(attempt_source("::ffff:203.0.113.7"), "203.0.113.7");
    }

    #[test]
    fn reset_durations_read_as_openai_writes_them() {
        assert_eq!(duration_text(20), "20ms");
        assert_eq!(duration_text(1000), "1s");
        assert_eq!(duration_text(1500), "1.5s");
        assert_eq!(duration_text(360_000), "6m0s");
        assert_eq!(duration_text(3_723_000), "1h2m3s");
    }

    #[test]
    fn a_grant_counts_its_keys_limits_and_its_plans() {
        let key_id = Uuid::new_v4();
        let grant = KeyGrant {
            tenant_id: Uuid::new_v4(),
            key_id,
            valid_until_ms: None,
            key: Limits {
                requests_per_minute: Some(5),
                ..Limits::default()
            },
            plan: Some((
                "team".into(),
                Limits {
                    tokens_per_minute: Some(100),
                    monthly_tokens: Some(1000),
                    ..Limits::default()
                },
            )),
            tenant_spend: Budget::new(5_000_000, Some(80)).ok(),
            key_spend: None,
        };
        let counters = counters(&grant);
        assert_eq!(counters.len(), 4);
        assert_eq!(counters[0].holder, Holder::Key(key_id));
        assert!(counters[1..].iter().all(|c| c.holder == Holder::Tenant));
        assert_eq!(
            (counters[3].kind, counters[3].limit),
            (Kind::MonthlySpend, 5_000_000),
            "the tenant's spend budget, in micro-units"
        );
        let unlimited = KeyGrant {
            plan: None,
            key: Limits::default(),
            tenant_spend: None,
            ..grant
        };
        assert!(super::counters(&unlimited).is_empty());
    }

    #[test]
    fn a_refusal_says_when_to_retry_in_openai_shape() {
        let counter = Counter {
            holder: Holder::Tenant,
            kind: Kind::RequestsPerMinute,
            limit: 60,
        };
        let error = refusal(counter, (Some(1200), false), Amounts::tokens(10), "USD");
        assert_eq!(error.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error.retry_after_secs, Some(2));
        assert_eq!(error.kind(), "rate_limit_error");
        assert_eq!(error.code.as_deref(), Some("rate_limit_exceeded"));
        let headers = error.headers.clone().unwrap_or_default();
        assert_eq!(
            headers
                .get("x-ratelimit-remaining-requests")
                .map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        let budget = Counter {
            kind: Kind::MonthlyTokens,
            ..counter
        };
        assert_eq!(
            refusal(budget, (Some(5), true), Amounts::tokens(10), "USD")
                .code
                .as_deref(),
            Some("insufficient_quota")
        );
        // A spend budget that cannot cover this request is not one that is spent.
        let spend = Counter {
            kind: Kind::MonthlySpend,
            limit: 5_000_000,
            ..counter
        };
        let short = refusal(spend, (Some(86_400_000), false), Amounts::tokens(10), "USD");
        assert!(
            short.message.contains("more than is left"),
            "{}",
            short.message
        );
        let spent = refusal(spend, (Some(86_400_000), true), Amounts::tokens(10), "USD");
        assert!(
            spent
                .message
                .contains("exceeded the monthly spend budget of 5.00 USD"),
            "{}",
            spent.message
        );
    }
}
