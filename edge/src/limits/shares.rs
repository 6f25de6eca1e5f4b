//! This edge's shares of the shared counters: for a counter whose limit is large next to one
//! request, the edge draws units from Redis a handful at a time ([`Ask::Share`]) and admits
//! requests from them in memory, so most requests cost no Redis call at all.
//!
//! - A counter is drawn on through a share when a sixteenth of its limit is worth at least
//!   four requests ([`shareable`]); smaller limits are counted request by request in Redis.
//! - A share is topped up in the background before it runs dry, by about a second's worth of
//!   what this edge takes and never more than a sixteenth of the limit.
//! - A share keeps at most one top-up's worth free: what ended requests give back beyond two
//!   goes back to the counter at once, and everything goes back after [`IDLE`] without a
//!   request. A budget share hands the tokens its requests used over to the month's counter
//!   within [`HAND_OVER_EVERY`]; an edge that stops hands everything back.
//! - So with E edges a limit still holds exactly; what changes is that a request may be
//!   refused while other edges hold room in their shares: at most about E × limit/8, and
//!   none of it for longer than [`IDLE`] after an edge's last request.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sluice_stores::limits::{Amounts, Ask, Counter, Holder, Kind, Month, Standing};
use sqlx::types::Uuid;

/// A share unused this long goes back.
pub(super) const IDLE: Duration = Duration::from_secs(3);
/// A share that holds nothing is forgotten (with the pace it learned) after this long unused.
const FORGET: Duration = Duration::from_secs(60);
/// How often the shares are looked after (topped up, handed back, renewed) at the latest.
pub(super) const SYNC_EVERY: Duration = Duration::from_millis(250);
/// How long a budget share keeps its requests' used tokens before handing them over to the
/// month's counter, at most (they go sooner with any other call about the share).
pub(super) const HAND_OVER_EVERY: Duration = Duration::from_secs(2);
/// How often a share running low asks for more at most.
const TOP_UP_EVERY: Duration = Duration::from_millis(50);
/// Redis calls about one tenant's shares go one at a time, on one of these locks.
const STRIPES: usize = 32;

/// Whether `counter` is drawn on through a share for a demand costing it `cost`.
pub(super) fn shareable(counter: &Counter, cost: u64) -> bool {
    counter.holder != Holder::Address && counter.limit / 16 >= cost.max(1).saturating_mul(4)
}

/// How one counter of an admitted request was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// In Redis, for this request alone.
    Alone,
    /// From this edge's share, in memory.
    Taken,
    /// Through this edge's share, in Redis, because the share was short.
    Asked,
}

/// Which share: a counter of a tenant, and for a budget, its month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ShareKey {
    tenant: Uuid,
    counter: Counter,
    month_start_ms: i64,
}

impl ShareKey {
    fn new(tenant: Uuid, counter: Counter, month: &Month) -> Self {
        let month_start_ms = if counter.kind.is_budget() {
            month.start_ms
        } else {
            0
        };
        Self {
            tenant,
            counter,
            month_start_ms,
        }
    }
}

/// One share.
#[derive(Debug)]
struct Share {
    /// Per-minute counters: the units in hand (negative: used beyond them, owed). Concurrency
    /// and budgets: what Redis records for this share.
    held: i64,
    /// Places (concurrency) or reserved tokens (budget) of this edge's requests in flight.
    in_use: u64,
    /// Budget tokens this edge's settled requests used, not yet in the month's counter.
    spent: u64,
    /// The requests whose tokens are in `spent`.
    spent_requests: Vec<String>,
    /// The counter's remaining beyond every share, at the last call.
    remaining: u64,
    /// Milliseconds until the counter is full, at the last call.
    reset_ms: u64,
    last_take: Instant,
    /// When Redis last answered for it (and renewed its record).
    answered_at: Instant,
    /// The cost of the last request.
    last_cost: u64,
    /// Units taken since `window_start`, and in the whole second before it.
    window_start: Instant,
    window_units: u64,
    per_second: u64,
}

impl Share {
    fn new(now: Instant) -> Self {
        Self {
            held: 0,
            in_use: 0,
            spent: 0,
            spent_requests: Vec::new(),
            remaining: 0,
            reset_ms: 0,
            last_take: now,
            answered_at: now,
            last_cost: 1,
            window_start: now,
            window_units: 0,
            per_second: 0,
        }
    }

    /// Units ready to be handed out.
    fn free(&self, kind: Kind) -> i64 {
        match kind {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => self.held,
            Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => {
                let committed = self.in_use.saturating_add(self.spent);
                self.held
                    .saturating_sub(i64::try_from(committed).unwrap_or(i64::MAX))
            }
        }
    }

    /// Takes `cost` from the share if it has it.
    fn take(&mut self, kind: Kind, cost: u64, now: Instant) -> bool {
        let cost_signed = i64::try_from(cost).unwrap_or(i64::MAX);
        if self.free(kind) < cost_signed {
            return false;
        }
        self.commit(kind, cost, now);
        true
    }

    /// Counts `cost` as taken from the share by a request.
    fn commit(&mut self, kind: Kind, cost: u64, now: Instant) {
        match kind {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => {
                self.held = self
                    .held
                    .saturating_sub(i64::try_from(cost).unwrap_or(i64::MAX));
            }
            Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => {
                self.in_use = self.in_use.saturating_add(cost);
            }
        }
        self.note_take(cost, now);
    }

    /// Counts `cost` in this edge's pace of taking (which sizes its top-ups).
    fn note_take(&mut self, cost: u64, now: Instant) {
        self.last_take = now;
        self.last_cost = cost.max(1);
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.per_second = self.window_units;
            self.window_start = now;
            self.window_units = 0;
        }
        self.window_units = self.window_units.saturating_add(cost);
    }

    /// Undoes a [`Share::commit`] of `cost` (its request was refused elsewhere).
    fn uncommit(&mut self, kind: Kind, cost: u64) {
        match kind {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => {
                self.held = self
                    .held
                    .saturating_add(i64::try_from(cost).unwrap_or(i64::MAX));
            }
            Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => {
                self.in_use = self.in_use.saturating_sub(cost);
            }
        }
        self.window_units = self.window_units.saturating_sub(cost);
    }

    /// How much a top-up asks for: about a second of this edge's takes, never more than a
    /// sixteenth of the limit.
    fn chunk(&self, counter: &Counter) -> u64 {
        let want = match counter.kind {
            Kind::Concurrent => self.in_use.max(16),
            _ => self
                .per_second
                .max(self.window_units)
                .max(self.last_cost.saturating_mul(16)),
        };
        want.min(counter.limit / 16)
    }

    /// What to ask Redis for: `want` more units, keeping what the share has (no more than a
    /// top-up's worth; nothing if `idle`), handing over what is owed.
    fn ask(&self, counter: &Counter, want: u64, idle: bool) -> Ask {
        let kind = counter.kind;
        let free = self.free(kind);
        let most = i64::try_from(self.chunk(counter)).unwrap_or(i64::MAX);
        let keep = if idle { 0 } else { free.clamp(0, most) };
        match kind {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => Ask::Share {
                want,
                held: 0,
                in_flight: 0,
                // Beyond what it keeps: the excess back, or a debt taken.
                hand_over: free.saturating_sub(keep),
            },
            Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => {
                let keep = u64::try_from(keep).unwrap_or(0);
                Ask::Share {
                    want,
                    held: self.in_use.saturating_add(keep),
                    in_flight: self.in_use,
                    hand_over: i64::try_from(self.spent).unwrap_or(i64::MAX),
                }
            }
        }
    }

    /// Records what Redis did with `ask`: `cost` more taken for a request, `granted` more
    /// units, and what was handed over gone.
    fn answered(&mut self, kind: Kind, ask: &Ask, cost: u64, standing: &Standing, now: Instant) {
        let Ask::Share {
            held, hand_over, ..
        } = *ask
        else {
            return;
        };
        let granted = i64::try_from(standing.granted).unwrap_or(i64::MAX);
        match kind {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => {
                self.held = self.held.saturating_sub(hand_over).saturating_add(granted);
            }
            Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend => {
                let recorded = held.saturating_add(cost).saturating_add(standing.granted);
                self.held = i64::try_from(recorded).unwrap_or(i64::MAX);
                let handed = u64::try_from(hand_over).unwrap_or(0);
                self.spent = self.spent.saturating_sub(handed);
                if self.spent == 0 {
                    self.spent_requests.clear();
                }
            }
        }
        self.answered_at = now;
        self.remaining = standing.remaining;
        self.reset_ms = standing.reset_ms;
    }

    /// Whether it holds nothing and owes nothing.
    fn empty(&self) -> bool {
        self.held == 0 && self.in_use == 0 && self.spent == 0
    }
}

/// A request's reservation coming back: `reserved` held, `used` used.
pub(super) struct Return<'a> {
    pub request_id: &'a str,
    pub reserved: Amounts,
    pub used: Amounts,
}

/// One tenant's shares that need Redis, and what to ask for each.
pub(super) struct Sync {
    pub tenant: Uuid,
    pub month: Month,
    pub counters: Vec<Counter>,
    pub asks: Vec<Ask>,
}

/// This edge's shares.
pub(super) struct Shares {
    table: Mutex<HashMap<ShareKey, Share>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Woken when a share runs low.
    pub wake: tokio::sync::Notify,
    lapse: Duration,
}

impl Shares {
    /// Shares that Redis forgets unless renewed within `lapse`.
    pub fn new(lapse: Duration) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            wake: tokio::sync::Notify::new(),
            lapse,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<ShareKey, Share>> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lock that Redis calls about `tenant`'s shares take, so what the edge holds and
    /// what Redis records agree.
    pub fn stripe(&self, tenant: Uuid) -> &tokio::sync::Mutex<()> {
        let index = usize::try_from(tenant.as_u128() % STRIPES as u128).unwrap_or(0);
        &self.stripes[index]
    }

    /// Counts a request of `amounts` on each counter from this edge's shares where they have
    /// it, and says how each counter goes: `Taken`, or still to ask Redis (`Alone`, or
    /// `Asked` through a short share). `routes` holds what an earlier call decided: only the
    /// counters it left to Redis are tried again. `going_anyway`: the request asks Redis in
    /// any case, so a share it would leave low is asked (and topped up) in the same call.
    pub fn take(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        amounts: Amounts,
        month: &Month,
        routes: &mut Vec<Route>,
        going_anyway: bool,
    ) {
        let now = Instant::now();
        let mut low = false;
        let mut table = self.table();
        routes.resize(counters.len(), Route::Asked);
        for (counter, route) in counters.iter().zip(routes.iter_mut()) {
            if *route == Route::Taken {
                continue;
            }
            let cost = counter.kind.cost(amounts);
            if !shareable(counter, cost) {
                *route = Route::Alone;
                continue;
            }
            let share = table
                .entry(ShareKey::new(tenant, *counter, month))
                .or_insert_with(|| Share::new(now));
            share.last_cost = cost.max(1);
            let cost_signed = i64::try_from(cost).unwrap_or(i64::MAX);
            let left = u64::try_from(share.free(counter.kind).saturating_sub(cost_signed));
            let leaves_low = left.map_or(true, |left| left < share.chunk(counter) / 2);
            if going_anyway && leaves_low {
                *route = Route::Asked;
            } else if share.take(counter.kind, cost, now) {
                *route = Route::Taken;
                low |= leaves_low;
            } else {
                *route = Route::Asked;
            }
        }
        drop(table);
        if low {
            self.wake.notify_one();
        }
    }

    /// Puts back what [`Shares::take`] took for a request that was then refused.
    pub fn untake(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        routes: &[Route],
        amounts: Amounts,
        month: &Month,
    ) {
        let mut table = self.table();
        for (counter, _) in counters
            .iter()
            .zip(routes)
            .filter(|(_, r)| **r == Route::Taken)
        {
            if let Some(share) = table.get_mut(&ShareKey::new(tenant, *counter, month)) {
                share.uncommit(counter.kind, counter.kind.cost(amounts));
            }
        }
    }

    /// What to ask Redis for the `Asked` counters (call with the tenant's stripe held).
    pub fn asks(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        routes: &[Route],
        month: &Month,
    ) -> Vec<Ask> {
        let now = Instant::now();
        let mut table = self.table();
        counters
            .iter()
            .zip(routes)
            .map(|(counter, route)| match route {
                Route::Asked => {
                    let share = table
                        .entry(ShareKey::new(tenant, *counter, month))
                        .or_insert_with(|| Share::new(now));
                    share.ask(counter, share.chunk(counter), false)
                }
                Route::Alone | Route::Taken => Ask::Alone,
            })
            .collect()
    }

    /// Records Redis's answer to `asks` for an admitted request of `amounts` (`None`: a sync).
    pub fn admitted(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        asks: &[Ask],
        standings: &[Standing],
        amounts: Option<Amounts>,
        month: &Month,
    ) {
        let now = Instant::now();
        let mut table = self.table();
        for ((counter, ask), standing) in counters.iter().zip(asks).zip(standings) {
            if *ask == Ask::Alone {
                continue;
            }
            let share = table
                .entry(ShareKey::new(tenant, *counter, month))
                .or_insert_with(|| Share::new(now));
            let cost = amounts.map_or(0, |a| counter.kind.cost(a));
            share.answered(counter.kind, ask, cost, standing, now);
            match (amounts, counter.kind) {
                (None, _) => {}
                // Redis took the cost from the bucket, not from the share.
                (Some(_), Kind::RequestsPerMinute | Kind::TokensPerMinute) => {
                    share.note_take(cost, now);
                }
                // Redis recorded the cost in the share: it is this request's, in use.
                (Some(_), Kind::Concurrent | Kind::MonthlyTokens | Kind::MonthlySpend) => {
                    share.commit(counter.kind, cost, now);
                }
            }
        }
    }

    /// Where the counters a request took from shares stand, for its headers.
    pub fn standings(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        routes: &[Route],
        month: &Month,
        from_redis: &[Standing],
    ) -> Vec<Standing> {
        let table = self.table();
        counters
            .iter()
            .zip(routes)
            .map(|(counter, route)| {
                let from_redis = from_redis.iter().find(|s| s.counter == *counter).copied();
                let share = table.get(&ShareKey::new(tenant, *counter, month));
                match (route, share, from_redis) {
                    (Route::Alone, _, Some(standing)) | (_, None, Some(standing)) => standing,
                    (_, Some(share), _) => {
                        let free = u64::try_from(share.free(counter.kind)).unwrap_or(0);
                        let remaining = share.remaining.saturating_add(free).min(counter.limit);
                        let reset_ms = match counter.kind {
                            Kind::RequestsPerMinute | Kind::TokensPerMinute => (counter.limit
                                - remaining)
                                .saturating_mul(60_000)
                                .div_ceil(counter.limit.max(1)),
                            _ => share.reset_ms,
                        };
                        Standing {
                            counter: *counter,
                            remaining,
                            reset_ms,
                            granted: 0,
                        }
                    }
                    (_, None, None) => Standing {
                        counter: *counter,
                        remaining: 0,
                        reset_ms: 0,
                        granted: 0,
                    },
                }
            })
            .collect()
    }

    /// Settles a request counted through shares (`Taken` or `Asked`): its place comes back to
    /// the share, its unused tokens too, and a budget's used tokens wait to be handed over.
    pub fn settle(
        &self,
        tenant: Uuid,
        counters: &[Counter],
        routes: &[Route],
        month: &Month,
        back: &Return<'_>,
    ) {
        let now = Instant::now();
        let mut table = self.table();
        for (counter, _) in counters
            .iter()
            .zip(routes)
            .filter(|(_, r)| **r != Route::Alone)
        {
            // A per-minute share may have been forgotten while the request ran (it holds no
            // requests in flight); its unused tokens start it again.
            let share = table
                .entry(ShareKey::new(tenant, *counter, month))
                .or_insert_with(|| Share::new(now));
            let kind = counter.kind;
            let unused = -back.reserved.beyond(kind, back.used);
            match kind {
                Kind::RequestsPerMinute => {}
                Kind::TokensPerMinute => share.held = share.held.saturating_add(unused),
                Kind::Concurrent => share.in_use = share.in_use.saturating_sub(1),
                Kind::MonthlyTokens | Kind::MonthlySpend => {
                    share.in_use = share.in_use.saturating_sub(kind.cost(back.reserved));
                    share.spent = share.spent.saturating_add(kind.cost(back.used));
                    share.spent_requests.push(back.request_id.to_owned());
                }
            }
        }
    }

    /// The requests whose use of `tenant`'s budget `counter` in `month` this edge holds and
    /// has not yet handed over.
    pub fn unhanded_requests(&self, tenant: Uuid, counter: &Counter, month: &Month) -> Vec<String> {
        self.table()
            .iter()
            .filter(|(key, _)| {
                key.tenant == tenant
                    && key.counter.holder == counter.holder
                    && key.counter.kind == counter.kind
                    && key.month_start_ms == month.start_ms
            })
            .flat_map(|(_, share)| share.spent_requests.iter().cloned())
            .collect()
    }

    /// The tenants whose shares need Redis now: running low, idle with units to hand back,
    /// owing, or due for renewal (`closing`: every share with anything to hand back). Shares
    /// with nothing left are forgotten.
    pub fn due(&self, closing: bool) -> Vec<Uuid> {
        let now = Instant::now();
        let mut tenants = Vec::new();
        self.table().retain(|key, share| {
            if share.empty() && now.duration_since(share.last_take) >= FORGET {
                return false;
            }
            let needs = if closing {
                !share.empty()
            } else {
                Self::needs(key, share, now, self.lapse)
            };
            if needs && !tenants.contains(&key.tenant) {
                tenants.push(key.tenant);
            }
            true
        });
        tenants
    }

    fn needs(key: &ShareKey, share: &Share, now: Instant, lapse: Duration) -> bool {
        let kind = key.counter.kind;
        let free = share.free(kind);
        let idle = now.duration_since(share.last_take) >= IDLE;
        let chunk = share.chunk(&key.counter);
        let low = u64::try_from(free).unwrap_or(0) < chunk / 2;
        // Settled requests give their places and unused tokens back to the share: what grows
        // beyond two top-ups' worth goes back to the counter for the other edges.
        let swollen = u64::try_from(free).unwrap_or(0) > chunk.saturating_mul(2);
        let recorded = !matches!(kind, Kind::RequestsPerMinute | Kind::TokensPerMinute);
        let since_answer = now.duration_since(share.answered_at);
        (idle && free != 0)
            // A counter with no room grants nothing: ask again only now and then.
            || (!idle && low && since_answer >= TOP_UP_EVERY)
            || free < 0
            || (swollen && since_answer >= TOP_UP_EVERY)
            || (share.spent > 0 && since_answer >= HAND_OVER_EVERY)
            || (recorded && share.held > 0 && since_answer >= lapse / 3)
    }

    /// What to ask Redis for `tenant`'s shares that need it, one call per month (call with
    /// the tenant's stripe held; `closing`: hands every share back).
    pub fn sync(&self, tenant: Uuid, closing: bool) -> Vec<Sync> {
        let now = Instant::now();
        let mut syncs: Vec<Sync> = Vec::new();
        for (key, share) in self.table().iter() {
            let needs = if closing {
                !share.empty()
            } else {
                Self::needs(key, share, now, self.lapse)
            };
            if key.tenant != tenant || !needs {
                continue;
            }
            let idle = closing || now.duration_since(share.last_take) >= IDLE;
            let free = u64::try_from(share.free(key.counter.kind)).unwrap_or(0);
            let want = if idle {
                0
            } else {
                share.chunk(&key.counter).saturating_sub(free)
            };
            let ask = share.ask(&key.counter, want, idle);
            let month = if key.counter.kind.is_budget() {
                Month::of(key.month_start_ms)
            } else {
                Month::of(sluice_pipelines::now_ms())
            };
            match syncs.iter_mut().find(|s| s.month == month) {
                Some(sync) => {
                    sync.counters.push(key.counter);
                    sync.asks.push(ask);
                }
                None => syncs.push(Sync {
                    tenant,
                    month,
                    counters: vec![key.counter],
                    asks: vec![ask],
                }),
            }
        }
        syncs
    }

    /// Records Redis's answer to a [`Sync`].
    pub fn synced(&self, sync: &Sync, standings: &[Standing]) {
        self.admitted(
            sync.tenant,
            &sync.counters,
            &sync.asks,
            standings,
            None,
            &sync.month,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(kind: Kind, limit: u64) -> Counter {
        Counter {
            holder: Holder::Tenant,
            kind,
            limit,
        }
    }

    fn standing(counter: Counter, granted: u64) -> Standing {
        Standing {
            counter,
            remaining: 1000,
            reset_ms: 0,
            granted,
        }
    }

    #[test]
    fn small_limits_are_counted_alone_and_large_ones_through_shares() {
        assert!(!shareable(&counter(Kind::RequestsPerMinute, 60), 1));
        assert!(shareable(&counter(Kind::RequestsPerMinute, 64), 1));
        // A budget of 300 tokens for requests of 28: each request alone.
        assert!(!shareable(&counter(Kind::MonthlyTokens, 300), 28));
        assert!(shareable(&counter(Kind::MonthlyTokens, 100_000), 542));
        let address = Counter {
            holder: Holder::Address,
            ..counter(Kind::RequestsPerMinute, 1_000_000)
        };
        assert!(
            !shareable(&address, 1),
            "login attempts are always counted alone"
        );
    }

    #[test]
    fn a_share_hands_out_what_it_was_granted_then_asks_again() {
        let shares = Shares::new(Duration::from_secs(15));
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let counters = [
            counter(Kind::RequestsPerMinute, 1_000_000),
            counter(Kind::Concurrent, 1_000),
            counter(Kind::MonthlySpend, 10_000_000),
        ];
        let mut routes = Vec::new();
        shares.take(tenant, &counters, spend(100), &month, &mut routes, false);
        assert_eq!(routes, [Route::Asked; 3], "nothing held yet");
        let asks = shares.asks(tenant, &counters, &routes, &month);
        // Redis grants 3 requests, 2 places and 250 micro-units beyond the first request.
        let granted = [3, 2, 250];
        let standings: Vec<_> = counters
            .iter()
            .zip(granted)
            .map(|(c, g)| standing(*c, g))
            .collect();
        shares.admitted(
            tenant,
            &counters,
            &asks,
            &standings,
            Some(spend(100)),
            &month,
        );
        // Two more requests fit (places and money run out after them); the third asks.
        for _ in 0..2 {
            let mut routes = Vec::new();
            shares.take(tenant, &counters, spend(100), &month, &mut routes, false);
            assert_eq!(routes, [Route::Taken; 3]);
        }
        let mut routes = Vec::new();
        shares.take(tenant, &counters, spend(100), &month, &mut routes, false);
        assert_eq!(routes, [Route::Taken, Route::Asked, Route::Asked]);
        shares.untake(tenant, &counters, &routes, spend(100), &month);
        // A request settles: its place and its unused money come back to the share.
        shares.settle(
            tenant,
            &counters,
            &[Route::Taken; 3],
            &month,
            &Return {
                request_id: "r1",
                reserved: spend(100),
                used: spend(40),
            },
        );
        let mut routes = Vec::new();
        shares.take(tenant, &counters, spend(100), &month, &mut routes, false);
        assert_eq!(
            routes,
            [Route::Taken; 3],
            "the untaken request and the settled one's room"
        );
        assert_eq!(
            shares.unhanded_requests(tenant, &counters[2], &month),
            ["r1"]
        );
        let tokens = counter(Kind::MonthlyTokens, 10_000_000);
        assert!(shares.unhanded_requests(tenant, &tokens, &month).is_empty());
        // The money spent is owed to the month's counter: a sync hands them over and records
        // what the share still holds (closing: only its requests in flight).
        let syncs = shares.sync(tenant, true);
        let budget = syncs
            .iter()
            .flat_map(|s| s.counters.iter().zip(&s.asks))
            .find(|(c, _)| c.kind == Kind::MonthlySpend)
            .map(|(_, a)| *a);
        let Some(Ask::Share {
            held,
            in_flight,
            hand_over,
            ..
        }) = budget
        else {
            panic!("the budget share owes what was spent: {budget:?}");
        };
        assert_eq!(hand_over, 40);
        assert_eq!(in_flight, 300, "three requests in flight");
        assert_eq!(held, 300, "the 10 free micro-units go back");
    }

    /// A request costing `micros` of money (and as many tokens, which a spend budget ignores).
    fn spend(micros: u64) -> Amounts {
        Amounts {
            tokens: micros,
            spend_micros: micros,
        }
    }

    #[test]
    fn a_share_swollen_by_settled_requests_hands_the_excess_back() {
        let shares = Shares::new(Duration::from_secs(15));
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let places = [counter(Kind::Concurrent, 10_000)];
        let mut routes = Vec::new();
        shares.take(
            tenant,
            &places,
            Amounts::tokens(1),
            &month,
            &mut routes,
            false,
        );
        let asks = shares.asks(tenant, &places, &routes, &month);
        shares.admitted(
            tenant,
            &places,
            &asks,
            &[standing(places[0], 100)],
            Some(Amounts::tokens(1)),
            &month,
        );
        // 40 more requests, then they all end: 100 free places, far more than a top-up.
        for _ in 0..40 {
            let mut routes = Vec::new();
            shares.take(
                tenant,
                &places,
                Amounts::tokens(1),
                &month,
                &mut routes,
                false,
            );
            assert_eq!(routes, [Route::Taken]);
        }
        let back = Return {
            request_id: "r",
            reserved: Amounts::tokens(1),
            used: Amounts::tokens(1),
        };
        for _ in 0..40 {
            shares.settle(tenant, &places, &[Route::Taken], &month, &back);
        }
        std::thread::sleep(TOP_UP_EVERY);
        assert_eq!(shares.due(false), [tenant]);
        let syncs = shares.sync(tenant, false);
        let Some(Ask::Share { held, want, .. }) = syncs.first().and_then(|s| s.asks.first()) else {
            panic!(
                "the swollen share syncs: {:?}",
                syncs.first().map(|s| &s.asks)
            );
        };
        assert_eq!(*want, 0);
        assert_eq!(
            *held,
            1 + 16,
            "the first request's place and one top-up's worth"
        );
    }
}
