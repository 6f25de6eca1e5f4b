//! The shared counters behind rate limits and quotas, in Redis, so a limit holds across every
//! edge replica: requests and tokens per minute, concurrent requests, and the monthly token and
//! spend budgets, per key and per tenant.
//!
//! - **Per minute** limits are token buckets that refill continuously, as OpenAI's do: a
//!   limit of N a minute admits a burst of N, then one more every 60/N seconds.
//! - **Concurrent** requests are leases in a sorted set, released when the request ends, and
//!   expiring on their own if the edge holding one dies.
//! - The **monthly budgets** are counters per calendar month (UTC): tokens, and spend in
//!   micro-units of the billing currency (each request's cost rounded up to a micro-unit).
//!
//! A request is admitted in one round trip ([`Limiter::admit`]): one script checks every
//! counter and, only if all have room, takes its share from each. Tokens are reserved as an
//! estimate (prompt plus `max_tokens`) and settled to the real count when the reply is done
//! ([`Limiter::settle`]), so concurrent requests cannot spend what others have reserved: a
//! budget is overrun only by what the requests in flight use beyond their estimates.
//!
//! **Shares.** A counter whose limit is large next to one request can instead be drawn on
//! through an edge's *share* ([`Ask::Share`]): the same script grants the edge a few more units
//! than the request needs, which the edge then hands out to its next requests without asking
//! Redis. What a share holds is taken from the counter like any request's demand, so every
//! limit still holds across edges; it only means one edge may hold room another wants, for as
//! long as the edge keeps it (it hands it back when idle). Concurrency places and budget tokens
//! held in shares are recorded per edge beside the counter and lapse unless renewed
//! ([`SHARE_LAPSE`]): a dead edge's places come free, and its budget requests in flight stay
//! counted as spent. Per-minute units in a dead edge's share are simply gone for the minute.
//!
//! Every counter of a request carries its tenant as the Redis hash tag, so one script's keys
//! are in one slot of a Redis cluster (a counter's shares are kept under keys derived from its
//! own, in the same slot).

use std::time::Duration;

use redis::{aio::ConnectionManager, Script};
use serde::{Deserialize, Serialize};
use sqlx::types::Uuid;

use crate::{Error, Result};

/// Where the counters live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every key Sluice writes.
    pub key_prefix: String,
    /// Longest wait for an answer (milliseconds) before the counters count as down.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "sluice".into(),
            timeout_ms: 500,
        }
    }
}

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    RequestsPerMinute,
    TokensPerMinute,
    Concurrent,
    MonthlyTokens,
    /// Money spent in the month, in micro-units of the billing currency.
    MonthlySpend,
}

impl Kind {
    fn script_kind(self) -> &'static str {
        match self {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => "rate",
            Kind::Concurrent => "concurrent",
            Kind::MonthlyTokens | Kind::MonthlySpend => "budget",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Kind::RequestsPerMinute => "rpm",
            Kind::TokensPerMinute => "tpm",
            Kind::Concurrent => "concurrent",
            Kind::MonthlyTokens => "tokens",
            Kind::MonthlySpend => "spend",
        }
    }

    /// What a demand of `amounts` costs this counter.
    pub fn cost(self, amounts: Amounts) -> u64 {
        match self {
            Kind::TokensPerMinute | Kind::MonthlyTokens => amounts.tokens,
            Kind::MonthlySpend => amounts.spend_micros,
            Kind::RequestsPerMinute | Kind::Concurrent => 1,
        }
    }

    /// Whether a demand's cost is an estimate, settled to the real amount afterwards.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Kind::TokensPerMinute | Kind::MonthlyTokens | Kind::MonthlySpend
        )
    }

    /// Whether it is a month's budget (counted per calendar month, seeded from the facts).
    pub fn is_budget(self) -> bool {
        matches!(self, Kind::MonthlyTokens | Kind::MonthlySpend)
    }
}

/// What one request costs or used: tokens (the prompt plus the reply) and money (micro-units
/// of the billing currency).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub tokens: u64,
    pub spend_micros: u64,
}

impl Amounts {
    /// `tokens` and no money.
    pub fn tokens(tokens: u64) -> Self {
        Self {
            tokens,
            spend_micros: 0,
        }
    }

    /// What `used` costs `kind` beyond (negative: short of) what `self` reserved.
    pub fn beyond(self, kind: Kind, used: Amounts) -> i64 {
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        signed(kind.cost(used)).saturating_sub(signed(kind.cost(self)))
    }
}

/// Whose counter it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Tenant,
    Key(Uuid),
    /// Attempts from one network address (login throttling): the demand's `tenant` is the
    /// address's [`address_scope`].
    Address,
}

/// The scope one network address's counters live under, in place of a tenant's id.
pub fn address_scope(address: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("sluice-address:{address}").as_bytes(),
    )
}

/// One limit on one holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counter {
    pub holder: Holder,
    pub kind: Kind,
    pub limit: u64,
}

/// A calendar month (UTC): the period of a monthly budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Month {
    /// `YYYY-MM`.
    pub label: String,
    /// Its first millisecond, Unix time.
    pub start_ms: i64,
    /// The first millisecond of the next month.
    pub end_ms: i64,
}

impl Month {
    /// The month holding `at_ms`.
    pub fn of(at_ms: i64) -> Self {
        use chrono::{Datelike, TimeZone, Utc};
        let at = Utc
            .timestamp_millis_opt(at_ms)
            .single()
            .unwrap_or(chrono::DateTime::UNIX_EPOCH);
        let (year, month) = (at.year(), at.month());
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let first = |y: i32, m: u32| {
            Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                .single()
                .map_or(0, |t| t.timestamp_millis())
        };
        Self {
            label: format!("{year:04}-{month:02}"),
            start_ms: first(year, month),
            end_ms: first(next_year, next_month),
        }
    }
}

/// How long an edge's share lasts unless renewed: a dead edge's share comes free after it.
pub const SHARE_LAPSE: Duration = Duration::from_secs(15);

/// How a counter is asked for a demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ask {
    /// For this request alone: its own concurrency place, its tokens straight into the month's
    /// counter.
    #[default]
    Alone,
    /// Through the asking edge's share (see the module doc).
    Share {
        /// Units to grant the share beyond the demand's cost, as many as there is room for.
        want: u64,
        /// What the share holds before this demand, as the edge counts it (concurrency places,
        /// budget tokens; per-minute counters keep no record of shares). The counter records
        /// the share as this plus the cost plus what is granted.
        held: u64,
        /// Budget tokens the edge's requests in flight have reserved, before this demand.
        in_flight: u64,
        /// Units handed over first: per-minute, the share's unused units going back to the
        /// bucket (negative: units the edge used beyond its share, taken now); budget, tokens
        /// the edge's settled requests used, added to the month's counter.
        hand_over: i64,
    },
}

/// One request's demand on its counters.
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    pub tenant: Uuid,
    /// Ends the request's concurrency lease early ([`Limiter::settle`]).
    pub request_id: &'a str,
    pub counters: &'a [Counter],
    /// How each counter is asked, in the order of `counters` (missing: [`Ask::Alone`]).
    pub asks: &'a [Ask],
    /// No request at all, only shares being topped up, handed back or renewed: nothing costs
    /// anything and nothing is refused.
    pub shares_only: bool,
    /// What is reserved: the prompt plus the most the reply may use, in tokens and money.
    pub amounts: Amounts,
    /// Longest a concurrency lease lasts if it is never released.
    pub lease: Duration,
    pub month: &'a Month,
}

/// One admitted request's settlement (see [`Limiter::settle_many`]).
#[derive(Debug, Clone)]
pub struct Settle<'a> {
    pub request_id: &'a str,
    pub counters: &'a [Counter],
    pub month: &'a Month,
    /// What the request reserved, and what it used: the difference is taken (or given back).
    pub reserved: Amounts,
    pub used: Amounts,
}

/// Where a counter stands after an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub counter: Counter,
    /// What is left (requests, tokens or places).
    pub remaining: u64,
    /// Milliseconds until the counter is full again (for a monthly budget: the month's end).
    pub reset_ms: u64,
    /// Units granted to the edge's share beyond the demand ([`Ask::Share`]).
    pub granted: u64,
}

/// The answer to a [`Demand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every counter had room; each has given its share.
    Admitted(Vec<Standing>),
    /// `counter` had no room; nothing was taken (nor handed over). `retry_after_ms` is when it will have room
    /// for this demand if nothing else takes it (`None`: never, the demand is larger than the
    /// limit itself).
    Refused {
        counter: Counter,
        retry_after_ms: Option<u64>,
        /// The counter is a budget used up to its limit (not merely short of room for this
        /// demand's estimate, or held for a moment in other edges' shares).
        spent: bool,
    },
    /// The month's budget counter is not in Redis (a new month, or Redis lost it): it must be
    /// seeded with what was already used ([`Limiter::seed_month`]) before admitting.
    Unseeded(Counter),
}

/// Checks every counter and, only if all have room, takes the demand from each; for a counter
/// asked through an edge's share, also grants up to `want` units more to the share.
/// KEYS[i]: counter i. ARGV: request id, lease ms, month end ms, the edge's share holder, share
/// lapse ms, then per counter its kind, limit, cost, want, share (-1: this request alone),
/// tokens in flight and units handed over. Answers {1, remaining, reset, granted, ...} or
/// {0, i, retry ms (-1: never), 1 if a budget is spent to its limit} or {2, i}.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, lease, month_end = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, ttl = ARGV[4], tonumber(ARGV[5])
-- Edges' shares of a counter live beside it, in its hash slot: KEY:shares (edge -> units),
-- KEY:in-flight (edge -> tokens of its requests in flight, budgets), KEY:share-ends (edge by
-- when its share lapses). A lapsed share is dropped; a budget keeps its requests in flight as
-- spent. Answers the units the other edges hold.
local function others(key, spent)
  local ends = key .. ':share-ends'
  local lapsed = redis.call('ZRANGEBYSCORE', ends, '-inf', now)
  for _, edge in ipairs(lapsed) do
    if spent then
      local tokens = redis.call('HGET', key .. ':in-flight', edge)
      if tokens and redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, tokens) end
      redis.call('HDEL', key .. ':in-flight', edge)
    end
    redis.call('HDEL', key .. ':shares', edge)
  end
  if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', ends, '-inf', now) end
  local total = 0
  local all = redis.call('HGETALL', key .. ':shares')
  for j = 1, #all, 2 do
    if all[j] ~= holder then total = total + tonumber(all[j + 1]) end
  end
  return total
end
local function set_share(key, units, tokens)
  if units > 0 then
    redis.call('HSET', key .. ':shares', holder, units)
    redis.call('ZADD', key .. ':share-ends', now + ttl, holder)
    redis.call('PEXPIRE', key .. ':shares', 2 * ttl)
    redis.call('PEXPIRE', key .. ':share-ends', 2 * ttl)
    if tokens then
      redis.call('HSET', key .. ':in-flight', holder, tokens)
      redis.call('PEXPIRE', key .. ':in-flight', 2 * ttl)
    end
  else
    redis.call('HDEL', key .. ':shares', holder)
    redis.call('HDEL', key .. ':in-flight', holder)
    redis.call('ZREM', key .. ':share-ends', holder)
  end
end
local N = 7
local out, after = {1}, {}
for i = 1, #KEYS do
  local a = 5 + N * (i - 1)
  local kind, limit, cost, want = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local share, give = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 7])
  local room, reset
  if cost > limit then return {0, i, -1} end
  if kind == 'rate' then
    local state = redis.call('HMGET', KEYS[i], 'level', 'at')
    local level = limit
    if state[1] then
      level = math.min(limit, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * limit / 60000)
    end
    level = math.min(limit, level + give)
    if cost > 0 and level < cost then return {0, i, math.ceil((cost - level) * 60000 / limit)} end
    room = level - cost
  elseif kind == 'concurrent' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local open = redis.call('ZCARD', KEYS[i]) + others(KEYS[i], false) + math.max(share, 0)
    if cost > 0 and open + cost > limit then return {0, i, 1000} end
    room = limit - open - cost
  else
    local held = others(KEYS[i], true)
    local used = redis.call('GET', KEYS[i])
    if not used then return {2, i} end
    used = tonumber(used) + math.max(give, 0)
    if cost > 0 and used + held + math.max(share, 0) + cost > limit then
      -- Room held in other edges' shares comes back within moments; spent room at month's end.
      if used + cost <= limit then return {0, i, 1000, 0} end
      local spent = 0
      if used >= limit then spent = 1 end
      return {0, i, math.max(1, month_end - now), spent}
    end
    room = limit - used - held - math.max(share, 0) - cost
  end
  local granted = 0
  if share >= 0 and room > 0 then granted = math.min(tonumber(ARGV[a + 4]), math.floor(room)) end
  after[i] = room - granted
  if kind == 'rate' then
    reset = math.ceil((limit - math.max(0, after[i])) * 60000 / limit)
  elseif kind == 'concurrent' then
    reset = 0
  else
    reset = math.max(0, month_end - now)
  end
  out[#out + 1] = math.max(0, math.floor(after[i]))
  out[#out + 1] = reset
  out[#out + 1] = granted
end
for i = 1, #KEYS do
  local a = 5 + N * (i - 1)
  local kind, limit, cost = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local share, in_flight, give = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local granted = out[3 * i + 1]
  if kind == 'rate' then
    redis.call('HSET', KEYS[i], 'level', tostring(after[i]), 'at', now)
    redis.call('PEXPIRE', KEYS[i], 61000 + math.max(0, math.ceil(-after[i] * 60000 / limit)))
  elseif kind == 'concurrent' then
    if share >= 0 then
      set_share(KEYS[i], share + cost + granted, nil)
    elseif cost > 0 then
      redis.call('ZADD', KEYS[i], now + lease, id)
      redis.call('PEXPIRE', KEYS[i], lease + 1000)
    end
  else
    if give > 0 then redis.call('INCRBY', KEYS[i], give) end
    if share >= 0 then
      set_share(KEYS[i], share + cost + granted, in_flight + cost)
    elseif cost > 0 then
      redis.call('INCRBY', KEYS[i], cost)
    end
  end
end
return out
";

/// Settles requests of one tenant (their keys share its hash slot): gives back (or takes more
/// of) the tokens each reserved and ends its concurrency lease. KEYS: every request's counters,
/// in order. ARGV: the number of requests, then per request its id and number of counters, and
/// per counter its kind, limit and the tokens to take beyond the reservation (negative: give
/// back). One call settles a whole batch: the script's fixed cost is paid once.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a, k = 2, 1
for r = 1, tonumber(ARGV[1]) do
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for i = 1, n do
    local kind, limit, delta = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local key = KEYS[k]
    a, k = a + 3, k + 1
    if kind == 'rate' and delta ~= 0 then
      local state = redis.call('HMGET', key, 'level', 'at')
      local level = limit
      if state[1] then
        level = math.min(limit, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * limit / 60000)
      end
      level = math.min(limit, level - delta)
      redis.call('HSET', key, 'level', tostring(level), 'at', now)
      redis.call('PEXPIRE', key, 61000 + math.max(0, math.ceil(-level * 60000 / limit)))
    elseif kind == 'concurrent' then
      redis.call('ZREM', key, id)
    elseif kind == 'budget' and delta ~= 0 and redis.call('EXISTS', key) == 1 then
      if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  end
end
return 1
";

/// Extends a request's concurrency leases. KEYS: its concurrency counters. ARGV: request id,
/// lease ms.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], lease + 1000)
  end
end
return 1
";

/// The counters, in Redis.
#[derive(Clone)]
pub struct Limiter {
    connection: ConnectionManager,
    prefix: String,
    /// Names this process's shares in Redis.
    share_holder: String,
    share_lapse: Duration,
    admit: Script,
    settle: Script,
    renew: Script,
}

impl Limiter {
    /// A limiter on the Redis at `config.url`; connects on first use, and again whenever the
    /// connection is lost.
    pub fn new(config: &RedisConfig) -> Result<Self> {
        let client = redis::Client::open(config.url.as_str())?;
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let connection = client.get_connection_manager_lazy(
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1),
        )?;
        Ok(Self {
            connection,
            share_lapse: SHARE_LAPSE,
            prefix: config.key_prefix.clone(),
            share_holder: Uuid::new_v4().simple().to_string(),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            renew: Script::new(RENEW),
        })
    }

    /// The same counters, as another process would see them (its own shares), whose shares
    /// lapse after `lapse` unless renewed.
    pub fn another_holder(&self, lapse: Duration) -> Self {
        Self {
            share_holder: Uuid::new_v4().simple().to_string(),
            share_lapse: lapse,
            ..self.clone()
        }
    }

    /// How long this process's shares last unless renewed.
    pub fn share_lapse(&self) -> Duration {
        self.share_lapse
    }

    /// The Redis key of `counter` for `tenant` (in `month`, for a budget).
    fn key(&self, tenant: Uuid, counter: &Counter, month: &Month) -> String {
        let holder = match counter.holder {
            Holder::Tenant => "tenant".to_owned(),
            Holder::Key(id) => format!("key:{}", id.simple()),
            Holder::Address => "address".to_owned(),
        };
        let kind = counter.kind.suffix();
        match counter.kind {
            Kind::MonthlyTokens | Kind::MonthlySpend => format!(
                "{}:{{{}}}:{holder}:{kind}:{}",
                self.prefix,
                tenant.simple(),
                month.label
            ),
            _ => format!("{}:{{{}}}:{holder}:{kind}", self.prefix, tenant.simple()),
        }
    }

    /// Admits `demand` if every counter has room for it, taking its share from each (and
    /// granting shares what there is room for).
    pub async fn admit(&self, demand: &Demand<'_>) -> Result<Verdict> {
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .arg(demand.request_id)
            .arg(u64::try_from(demand.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(demand.month.end_ms)
            .arg(&self.share_holder)
            .arg(u64::try_from(self.share_lapse.as_millis()).unwrap_or(u64::MAX));
        for (i, counter) in demand.counters.iter().enumerate() {
            let cost = if demand.shares_only {
                0
            } else {
                counter.kind.cost(demand.amounts)
            };
            let (want, held, in_flight, hand_over) =
                match demand.asks.get(i).copied().unwrap_or_default() {
                    Ask::Alone => (0, -1, 0, 0),
                    Ask::Share {
                        want,
                        held,
                        in_flight,
                        hand_over,
                    } => (
                        want,
                        i64::try_from(held).unwrap_or(i64::MAX),
                        in_flight,
                        hand_over,
                    ),
                };
            invocation
                .key(self.key(demand.tenant, counter, demand.month))
                .arg(counter.kind.script_kind())
                .arg(counter.limit)
                .arg(cost)
                .arg(want)
                .arg(held)
                .arg(in_flight)
                .arg(hand_over);
        }
        let mut connection = self.connection.clone();
        let answer: Vec<i64> = invocation.invoke_async(&mut connection).await?;
        let counter_at = |i: Option<&i64>| {
            i.and_then(|i| usize::try_from(*i).ok())
                .and_then(|i| demand.counters.get(i.checked_sub(1)?))
                .copied()
                .ok_or_else(|| Error::Corrupt(format!("limit script answered {answer:?}")))
        };
        let unsigned = |v: Option<&i64>| v.map_or(0, |v| u64::try_from(*v).unwrap_or(0));
        match answer.first() {
            Some(1) => Ok(Verdict::Admitted(
                demand
                    .counters
                    .iter()
                    .zip(answer[1..].chunks(3))
                    .map(|(counter, triple)| Standing {
                        counter: *counter,
                        remaining: unsigned(triple.first()),
                        reset_ms: unsigned(triple.get(1)),
                        granted: unsigned(triple.get(2)),
                    })
                    .collect(),
            )),
            Some(0) => Ok(Verdict::Refused {
                counter: counter_at(answer.get(1))?,
                retry_after_ms: answer.get(2).and_then(|ms| u64::try_from(*ms).ok()),
                spent: answer.get(3) == Some(&1),
            }),
            Some(2) => Ok(Verdict::Unseeded(counter_at(answer.get(1))?)),
            _ => Err(Error::Corrupt(format!("limit script answered {answer:?}"))),
        }
    }

    /// Sets `tenant`'s budget `counter` for `month` to `used` (tokens or micro-units) unless
    /// it is already there (an edge that seeded it first, or admissions since, win).
    pub async fn seed_month(
        &self,
        tenant: Uuid,
        counter: &Counter,
        month: &Month,
        used: u64,
    ) -> Result<()> {
        let key = self.key(tenant, counter, month);
        // Kept for a month after the month ends, for anyone reading it late.
        let expire_at_ms = month.end_ms.saturating_add(31 * 86_400_000);
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(&key)
            .arg(used)
            .arg("NX")
            .arg("PXAT")
            .arg(expire_at_ms)
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Settles a request admitted with `demand` to what it `used`: takes what it used beyond
    /// its reservation (or gives the difference back) and ends its concurrency lease.
    pub async fn settle(&self, demand: &Demand<'_>, used: Amounts) -> Result<()> {
        let settle = Settle {
            request_id: demand.request_id,
            counters: demand.counters,
            month: demand.month,
            reserved: demand.amounts,
            used,
        };
        self.settle_many(demand.tenant, &[settle]).await
    }

    /// Settles many requests of `tenant` in one call (see [`Limiter::settle`]).
    pub async fn settle_many(&self, tenant: Uuid, settles: &[Settle<'_>]) -> Result<()> {
        if settles.is_empty() {
            return Ok(());
        }
        let mut invocation = self.settle.prepare_invoke();
        invocation.arg(settles.len());
        for settle in settles {
            invocation.arg(settle.request_id).arg(settle.counters.len());
            for counter in settle.counters {
                let delta = if counter.kind.is_settled() {
                    settle.reserved.beyond(counter.kind, settle.used)
                } else {
                    0
                };
                invocation
                    .key(self.key(tenant, counter, settle.month))
                    .arg(counter.kind.script_kind())
                    .arg(counter.limit)
                    .arg(delta);
            }
        }
        let mut connection = self.connection.clone();
        invocation.invoke_async::<i64>(&mut connection).await?;
        Ok(())
    }

    /// Extends the concurrency leases of a request admitted with `demand` by `demand.lease`
    /// from now (a long reply keeps its place for as long as it streams). A lease already
    /// released stays released.
    pub async fn renew(&self, demand: &Demand<'_>) -> Result<()> {
        let mut invocation = self.renew.prepare_invoke();
        invocation
            .arg(demand.request_id)
            .arg(u64::try_from(demand.lease.as_millis()).unwrap_or(u64::MAX));
        let mut any = false;
        for counter in demand
            .counters
            .iter()
            .filter(|c| c.kind == Kind::Concurrent)
        {
            invocation.key(self.key(demand.tenant, counter, demand.month));
            any = true;
        }
        if any {
            let mut connection = self.connection.clone();
            invocation.invoke_async::<i64>(&mut connection).await?;
        }
        Ok(())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_run_from_the_first_to_the_first() {
        // 2026-12-06T16:00:00Z
        let month = Month::of(1_796_572_800_000);
        assert_eq!(month.label, "2026-12");
        assert_eq!(month.start_ms, 1_796_083_200_000);
        assert_eq!(month.end_ms, 1_798_761_600_000, "2027-01-01");
        let february = Month::of(1_803_772_800_000); // 2027-02-28
        assert_eq!(february.label, "2027-02");
        assert_eq!(february.end_ms - february.start_ms, 28 * 86_400_000);
    }

    #[test]
    fn each_kind_counts_its_own_amount_and_settles_the_difference() {
        let reserved = Amounts {
            tokens: 40,
            spend_micros: 9,
        };
        let used = Amounts {
            tokens: 25,
            spend_micros: 11,
        };
        assert_eq!(Kind::MonthlyTokens.cost(reserved), 40);
        assert_eq!(Kind::MonthlySpend.cost(reserved), 9);
        assert_eq!(Kind::Concurrent.cost(reserved), 1);
        assert_eq!(reserved.beyond(Kind::TokensPerMinute, used), -15);
        assert_eq!(reserved.beyond(Kind::MonthlySpend, used), 2);
        assert_eq!(reserved.beyond(Kind::RequestsPerMinute, used), 0);
        assert!(Kind::MonthlySpend.is_budget() && Kind::MonthlySpend.is_settled());
        assert!(!Kind::Concurrent.is_settled());
    }

    /// A tenant's counter of `kind` with `limit`.
    fn tenant_counter(kind: Kind, limit: u64) -> Counter {
        Counter {
            holder: Holder::Tenant,
            kind,
            limit,
        }
    }

    /// A limiter on the local stack's Redis (`SLUICE_REDIS__URL`, as `deploy/local` sets it),
    /// with keys of a fresh prefix.
    fn local_limiter() -> Limiter {
        let url = std::env::var("SLUICE_REDIS__URL").unwrap_or_else(|_| RedisConfig::default().url);
        Limiter::new(&RedisConfig {
            url,
            key_prefix: format!("test-{}", Uuid::new_v4().simple()),
            timeout_ms: 2000,
        })
        .expect("a Redis URL")
    }

    fn demand<'a>(
        tenant: Uuid,
        id: &'a str,
        counters: &'a [Counter],
        tokens: u64,
        month: &'a Month,
    ) -> Demand<'a> {
        Demand {
            tenant,
            request_id: id,
            counters,
            asks: &[],
            shares_only: false,
            amounts: Amounts::tokens(tokens),
            lease: Duration::from_secs(60),
            month,
        }
    }

    #[tokio::test]
    async fn counters_admit_until_full_and_settle_gives_back() {
        let limiter = local_limiter();
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let counters = [
            tenant_counter(Kind::RequestsPerMinute, 3),
            tenant_counter(Kind::TokensPerMinute, 100),
            tenant_counter(Kind::Concurrent, 2),
            tenant_counter(Kind::MonthlyTokens, 1000),
        ];
        let first = demand(tenant, "a", &counters, 40, &month);
        assert_eq!(
            limiter.admit(&first).await.ok(),
            Some(Verdict::Unseeded(counters[3])),
            "a month's budget starts from what was used"
        );
        limiter
            .seed_month(tenant, &counters[3], &month, 100)
            .await
            .ok();
        let Ok(Verdict::Admitted(standing)) = limiter.admit(&first).await else {
            panic!("the first request fits");
        };
        assert_eq!(standing[0].remaining, 2);
        assert_eq!(standing[1].remaining, 60);
        assert_eq!(standing[2].remaining, 1);
        assert_eq!(standing[3].remaining, 860);
        let second = demand(tenant, "b", &counters, 40, &month);
        assert!(matches!(
            limiter.admit(&second).await,
            Ok(Verdict::Admitted(_))
        ));
        // Two in flight: the third waits for a place, and nothing was taken from the others.
        let third = demand(tenant, "c", &counters, 10, &month);
        assert!(matches!(
            limiter.admit(&third).await,
            Ok(Verdict::Refused { counter, .. }) if counter.kind == Kind::Concurrent
        ));
        // The first used 5 tokens of the 40 reserved: 35 come back, and its place frees.
        limiter.settle(&first, Amounts::tokens(5)).await.ok();
        let Ok(Verdict::Admitted(standing)) = limiter.admit(&third).await else {
            panic!("room again");
        };
        assert_eq!(standing[0].remaining, 0);
        assert!(standing[1].remaining >= 45, "{standing:?}");
        assert_eq!(standing[3].remaining, 1000 - 100 - 5 - 40 - 10);
        // Requests per minute are spent: the fourth is told when one comes back (20 s).
        limiter.settle(&second, Amounts::tokens(40)).await.ok();
        let fourth = demand(tenant, "d", &counters, 1, &month);
        let Ok(Verdict::Refused {
            counter,
            retry_after_ms: Some(ms),
            spent: false,
        }) = limiter.admit(&fourth).await
        else {
            panic!("out of requests");
        };
        assert_eq!(counter.kind, Kind::RequestsPerMinute);
        assert!((15_000..=20_000).contains(&ms), "{ms}");
        // A demand larger than the limit itself never fits.
        let huge = demand(tenant, "e", &counters[1..2], 101, &month);
        assert!(matches!(
            limiter.admit(&huge).await,
            Ok(Verdict::Refused {
                retry_after_ms: None,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_refused_budget_says_whether_it_is_spent_or_only_short_for_this_demand() {
        let limiter = local_limiter();
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let budget = [tenant_counter(Kind::MonthlySpend, 100)];
        limiter
            .seed_month(tenant, &budget[0], &month, 95)
            .await
            .unwrap();
        let mut costly = demand(tenant, "a", &budget, 0, &month);
        costly.amounts.spend_micros = 10;
        assert!(
            matches!(
                limiter.admit(&costly).await,
                Ok(Verdict::Refused { spent: false, retry_after_ms: Some(ms), .. }) if ms > 1000
            ),
            "95 of 100 spent: a demand of 10 does not fit, a smaller one would"
        );
        let mut small = demand(tenant, "b", &budget, 0, &month);
        small.amounts.spend_micros = 5;
        assert!(matches!(
            limiter.admit(&small).await,
            Ok(Verdict::Admitted(_))
        ));
        small.request_id = "c";
        assert!(
            matches!(
                limiter.admit(&small).await,
                Ok(Verdict::Refused { spent: true, .. })
            ),
            "100 of 100: spent"
        );
    }

    #[tokio::test]
    async fn a_renewed_lease_outlives_its_first_term_and_an_unrenewed_one_expires() {
        let limiter = local_limiter();
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let one_place = [tenant_counter(Kind::Concurrent, 1)];
        let demand = |id| Demand {
            tenant,
            request_id: id,
            counters: &one_place,
            asks: &[],
            shares_only: false,
            amounts: Amounts::tokens(1),
            lease: Duration::from_millis(2000),
            month: &month,
        };
        assert!(matches!(
            limiter.admit(&demand("long")).await,
            Ok(Verdict::Admitted(_))
        ));
        tokio::time::sleep(Duration::from_millis(1400)).await;
        limiter.renew(&demand("long")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            matches!(
                limiter.admit(&demand("next")).await,
                Ok(Verdict::Refused { .. })
            ),
            "renewed: the place is still held past its first term"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            matches!(
                limiter.admit(&demand("next")).await,
                Ok(Verdict::Admitted(_))
            ),
            "not renewed again: the lease expired and the place is free"
        );
        // Renewing a released lease does not take the place back.
        limiter
            .settle(&demand("next"), Amounts::tokens(1))
            .await
            .unwrap();
        limiter.renew(&demand("next")).await.unwrap();
        assert!(matches!(
            limiter.admit(&demand("third")).await,
            Ok(Verdict::Admitted(_))
        ));
    }

    #[tokio::test]
    async fn one_call_settles_a_batch_each_to_its_own_usage() {
        let limiter = local_limiter();
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let counters = [
            tenant_counter(Kind::TokensPerMinute, 100),
            tenant_counter(Kind::Concurrent, 2),
        ];
        for id in ["a", "b"] {
            assert!(matches!(
                limiter
                    .admit(&demand(tenant, id, &counters, 40, &month))
                    .await,
                Ok(Verdict::Admitted(_))
            ));
        }
        let settle = |id, used| Settle {
            request_id: id,
            counters: &counters,
            month: &month,
            reserved: Amounts::tokens(40),
            used: Amounts::tokens(used),
        };
        // `a` used 10 of its 40, `b` 50: 30 back, 10 more taken; both places free.
        limiter
            .settle_many(tenant, &[settle("a", 10), settle("b", 50)])
            .await
            .unwrap();
        let Ok(Verdict::Admitted(standing)) = limiter
            .admit(&demand(tenant, "c", &counters, 1, &month))
            .await
        else {
            panic!("room again");
        };
        assert!(
            (39..=41).contains(&standing[0].remaining),
            "100 - 10 - 50 - 1, plus what refilled since: {standing:?}"
        );
        assert_eq!(standing[1].remaining, 1, "both places were freed");
        limiter.settle_many(tenant, &[]).await.unwrap();
    }

    #[tokio::test]
    async fn shares_count_against_every_edge_and_a_dead_edges_share_lapses() {
        let edge_a = local_limiter();
        let edge_b = edge_a.another_holder(SHARE_LAPSE);
        let dying = edge_a.another_holder(Duration::from_millis(400));
        let tenant = Uuid::new_v4();
        let month = Month::of(1_796_572_800_000);
        let places = [tenant_counter(Kind::Concurrent, 64)];
        let share = |want, held| Ask::Share {
            want,
            held,
            in_flight: 0,
            hand_over: 0,
        };
        // Edge A takes a place for a request and ten more for its share: 11 of 64.
        let asks = [share(10, 0)];
        let mut first = demand(tenant, "a", &places, 1, &month);
        first.asks = &asks;
        let Ok(Verdict::Admitted(standing)) = edge_a.admit(&first).await else {
            panic!("room for a share");
        };
        assert_eq!((standing[0].granted, standing[0].remaining), (10, 53));
        // Edge B's requests, each alone, find 53 places.
        for i in 0..53 {
            let id = format!("b{i}");
            assert!(matches!(
                edge_b.admit(&demand(tenant, &id, &places, 1, &month)).await,
                Ok(Verdict::Admitted(_))
            ));
        }
        assert!(matches!(
            edge_b
                .admit(&demand(tenant, "full", &places, 1, &month))
                .await,
            Ok(Verdict::Refused { .. })
        ));
        // A keeps only its request's place and hands the ten back: B finds them.
        let back = [share(0, 1)];
        let mut hand_back = demand(tenant, "", &places, 0, &month);
        hand_back.asks = &back;
        hand_back.shares_only = true;
        assert!(matches!(
            edge_a.admit(&hand_back).await,
            Ok(Verdict::Admitted(_))
        ));
        assert!(matches!(
            edge_b
                .admit(&demand(tenant, "again", &places, 1, &month))
                .await,
            Ok(Verdict::Admitted(_))
        ));

        // A budget share of an edge that dies: its free tokens come back when it lapses, and
        // its requests in flight stay spent.
        let budget = [tenant_counter(Kind::MonthlyTokens, 1000)];
        edge_a
            .seed_month(tenant, &budget[0], &month, 0)
            .await
            .unwrap();
        let asks = [share(100, 0)];
        let mut dying_demand = demand(tenant, "d", &budget, 50, &month);
        dying_demand.asks = &asks;
        assert!(matches!(
            dying.admit(&dying_demand).await,
            Ok(Verdict::Admitted(_))
        ));
        assert!(
            matches!(
                edge_b
                    .admit(&demand(tenant, "x", &budget, 900, &month))
                    .await,
                Ok(Verdict::Refused {
                    retry_after_ms: Some(1000),
                    spent: false,
                    ..
                })
            ),
            "150 tokens held in the share: room soon, not at the month's end"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(matches!(
            edge_b
                .admit(&demand(tenant, "y", &budget, 900, &month))
                .await,
            Ok(Verdict::Admitted(_))
        ));
        assert!(
            matches!(
                edge_b
                    .admit(&demand(tenant, "z", &budget, 60, &month))
                    .await,
                Ok(Verdict::Refused { .. })
            ),
            "the dead edge's 50 tokens in flight still count"
        );

        // Per-minute units granted to a share leave the bucket.
        let rate = [tenant_counter(Kind::RequestsPerMinute, 100)];
        let asks = [share(10, 0)];
        let mut shared = demand(tenant, "r", &rate, 1, &month);
        shared.asks = &asks;
        assert!(matches!(
            edge_a.admit(&shared).await,
            Ok(Verdict::Admitted(_))
        ));
        let Ok(Verdict::Admitted(standing)) =
            edge_b.admit(&demand(tenant, "s", &rate, 1, &month)).await
        else {
            panic!("room left");
        };
        assert!((88..=89).contains(&standing[0].remaining), "{standing:?}");
    }
}
