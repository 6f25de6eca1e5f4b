//! `sluice`: the one binary. Everything in one process for one machine (`sluice up`), each part
//! on its own so it scales as its own consumer group (`sluice edge`, `sluice run router`, ...),
//! and the tools around them (setup, tenants, models, dead letters, replays, benchmarks).
//!
//! Thin wiring: [`config`] (settings), [`stages`] (one closed enum of stages, each built from
//! the settings), [`process`] (a process's parts and its shutdown), [`setup`], [`admin`] and
//! [`bench`] (the commands).

mod admin;
mod bench;
mod billing;
mod config;
mod process;
mod setup;
mod stages;
mod tools;
mod workflows;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use sluice_pipelines::ReplayRange;
use sluice_stores::ProviderKind;
use stages::Stage;

/// mimalloc rather than the system allocator: a request allocates and frees many small buffers
/// on several threads, which glibc's allocator served with a sixth of the process's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Multi-tenant AI as a streaming dataflow"
)]
struct Cli {
    /// TOML configuration file (settings not in it take their defaults, and `SLUICE_<SECTION>__<FIELD>`
    /// environment variables override both).
    #[arg(long, env = "SLUICE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every part in one process: registry, edge, router, orchestrator, metering.
    Up,
    /// Run the HTTP edge alone.
    Edge,
    /// Run the schema registry alone.
    Registry,
    /// Run one stage alone (scale by running more: they share the stage's consumer group).
    Run {
        #[arg(value_enum)]
        stage: Stage,
    },
    /// Prepare the stores: PostgreSQL migrations, ClickHouse tables and Kafka topics.
    Setup,
    /// Apply PostgreSQL migrations and ClickHouse DDL.
    Migrate,
    /// Create Sluice's topics (existing ones are left alone).
    Topics,
    /// Register every record schema with the registry (it must be running).
    Schemas,
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage plans: the limits tenants are subscribed to.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Manage API keys: list, revoke, rotate, set a key's own limits.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage users: platform admins, tenant admins, members.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Feature flags: global, or a tenant's own (which overrides the global one).
    Flag {
        #[command(subcommand)]
        command: FlagCommand,
    },
    /// Read the audit log: every admin and key action.
    Audit {
        /// The tenant whose log to read (default: platform-level actions, such as plan changes).
        #[arg(long)]
        tenant: Option<String>,
        /// At most this many entries, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Manage the model catalogue.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The price book: versions of each model's, tool's, workflow's and plan's prices.
    Price {
        #[command(subcommand)]
        command: PriceCommand,
    },
    /// Monthly spend budgets: a tenant's own and its keys', enforced at the edge.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Workflow definitions (`workflows/*.yaml`).
    Workflow {
        #[command(subcommand)]
        command: WorkflowCommand,
    },
    /// A tenant's own tools: the HTTP endpoints its workflows call.
    Tool {
        #[command(subcommand)]
        command: ToolCommand,
    },
    /// Invoices: close a month, preview the current one, read and export them.
    Invoices {
        #[command(subcommand)]
        command: InvoicesCommand,
    },
    /// Re-read a topic between two times and feed it through a stage (backfills, evaluation).
    /// Runs outside the stage's consumer group; the metering sink makes a backfill idempotent.
    Replay {
        #[arg(value_enum)]
        stage: Stage,
        /// Start, Unix milliseconds (inclusive).
        #[arg(long)]
        from_ms: i64,
        /// End, Unix milliseconds (exclusive; default now).
        #[arg(long)]
        to_ms: Option<i64>,
        /// Topic to read (default: the stage's input topic).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Inspect the dead-letter queue and replay records from it.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Measure Sluice against the limits of the machine it runs on.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters: position in the DLQ, source topic/partition/offset, stage, reason.
    List {
        /// Only letters from this source topic.
        #[arg(long)]
        source: Option<String>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters' original records back to their source topics.
    Replay {
        /// DLQ positions (`partition:offset`, as `list` prints them) to replay.
        positions: Vec<String>,
        /// Replay every letter (from `--source` only, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only letters from this source topic.
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Chat completions through the whole dataflow (edge, broker, router, orchestrator,
    /// metering, SQL) vs. the same local upstream called directly, at several concurrencies.
    Gateway {
        /// Concurrent clients per level, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 50, 200])]
        clients: Vec<usize>,
        /// Measured seconds per level and path.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Unmeasured seconds before each measurement.
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        /// Ask for streamed (SSE) replies instead of whole ones.
        #[arg(long)]
        stream: bool,
        /// Samples of the one-hop broker latency.
        #[arg(long, default_value_t = 200)]
        hop_samples: usize,
        /// Seconds of idle CPU measured before the load.
        #[arg(long, default_value_t = 5)]
        idle_seconds: u64,
        /// The broker's process name on this machine, for its CPU share.
        #[arg(long, default_value = "tansu")]
        broker_process: String,
        /// Put the benchmark's tenant on a plan with every limit (requests and tokens a minute,
        /// concurrency, a monthly budget) set beyond reach, so every request is admitted and
        /// settled through the shared counters: what the limiter costs.
        #[arg(long)]
        limits: bool,
        /// After each level, run its clients again split between a tenant without limits and
        /// one on a plan with every limit set beyond reach, at the same time: the limiter's cost
        /// as a ratio of their rates (`limits_rate_ratio=`) and added p99
        /// (`limits_p99_added_ms_c10=`).
        #[arg(long, conflicts_with = "limits")]
        compare_limits: bool,
    },
    /// Workflow runs (`customer_support` on the simulated model) through the broker: runs/s
    /// and latency per run and per step against one broker hop, beside plain chat completions;
    /// and what the tool guard (bulkhead, breaker, timeout) adds to a tool call.
    Workflows {
        /// Concurrent clients per level, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 50])]
        clients: Vec<usize>,
        /// Measured seconds per level and path.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Unmeasured seconds before each measurement.
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        /// Calls timed with and without the tool guard.
        #[arg(long, default_value_t = 200_000)]
        guard_calls: u64,
        /// Samples of the one-hop broker latency.
        #[arg(long, default_value_t = 200)]
        hop_samples: usize,
    },
    /// Streaming WebSocket sessions held by one edge and the memory each costs, vs. a bare
    /// WebSocket server on the same stack.
    Websocket {
        /// Sessions to open.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Sessions opening at once.
        #[arg(long, default_value_t = 200)]
        connecting: usize,
        /// Seconds every session streams before the memory is read.
        #[arg(long, default_value_t = 10)]
        stream_seconds: u64,
    },
    /// The bare WebSocket server `bench websocket` measures against (started by it).
    #[command(hide = true)]
    WebsocketBareServer {
        #[arg(long)]
        listen: String,
    },
    /// Records through the operator runtime vs. raw librdkafka consume+produce on the same broker.
    Passthrough {
        /// Records per path.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        /// Approximate encoded size of each record (bytes).
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        /// Records the pipeline processes concurrently.
        #[arg(long, default_value_t = 32)]
        lanes: usize,
        /// Runs of each path (alternating); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Usage events through the per-tenant per-minute SQL aggregate (to ClickHouse) vs. raw
    /// librdkafka consume on the same broker.
    Window {
        /// Usage events per path.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Distinct tenants.
        #[arg(long, default_value_t = 100)]
        tenants: u64,
        /// Minutes of event time the records span.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Lanes of the SQL stage.
        #[arg(long, default_value_t = 4)]
        lanes: usize,
        /// Runs of each path (alternating); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// An invoice run over many usage events of many tenants vs. one plain ClickHouse `GROUP
    /// BY` over the same rows.
    Invoices {
        /// Usage events in the month invoiced.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Tenants they belong to (each gets an invoice).
        #[arg(long, default_value_t = 1_000)]
        tenants: u64,
    },
    /// The metering sink writing usage events to ClickHouse vs. `clickhouse-client` inserting
    /// the same rows in bulk.
    Sink {
        /// Usage events per path and round.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Runs of each path (alternating); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// ClickHouse's native (TCP) port, for `clickhouse-client` (the host, database, user and
        /// password are the configured ones).
        #[arg(long, env = "SLUICE_CLICKHOUSE_TCP_PORT", default_value_t = 19000)]
        clickhouse_port: u16,
    },
}

#[derive(Subcommand)]
pub(crate) enum ToolCommand {
    /// Add an HTTP tool for a tenant, or change it (and turn it on). `{name}` in the URL stands
    /// for the call's argument `name`; the other arguments go as the JSON body (as query
    /// parameters for GET and DELETE).
    Add {
        name: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        url: String,
        /// GET, POST, PUT, PATCH or DELETE.
        #[arg(long, default_value = "POST")]
        method: String,
        /// The environment variable (SLUICE_TOOL_SECRET_…) holding a bearer token for it.
        #[arg(long)]
        token_env: Option<String>,
        /// The part of the answer to keep, as a JSON Pointer (`/data/order`).
        #[arg(long)]
        result_pointer: Option<String>,
        /// A header sent as it is, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// A tenant's tools.
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Turn a tenant's tool on.
    Enable {
        name: String,
        #[arg(long)]
        tenant: String,
    },
    /// Turn a tenant's tool off: workflows that call it no longer run for the tenant.
    Disable {
        name: String,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum WorkflowCommand {
    /// Check definitions: each file, or each `.yaml` in each folder, given (default: the
    /// workflows Sluice ships). Prints every mistake with its file, line, column and field, and
    /// fails if there is one.
    Check { paths: Vec<PathBuf> },
    /// Check a definition and publish it as its workflow's next version (unless its latest
    /// version is the same text): a tenant's own, or with no tenant a built-in one.
    Publish {
        file: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The workflows a tenant sees (with no tenant, the built-in ones), at their latest
    /// versions.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Turn a workflow on for a tenant (workflows are on unless turned off).
    Enable {
        name: String,
        #[arg(long)]
        tenant: String,
    },
    /// Turn a workflow off for a tenant: the router no longer picks it for an intent.
    Disable {
        name: String,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant and print its API key (shown once).
    Create {
        name: String,
        /// Subscribe it to this plan (default: none, no limits).
        #[arg(long)]
        plan: Option<String>,
        /// Print JSON (`{"tenant_id", "name", "api_key"}`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Subscribe a tenant to a plan, replacing its current one (takes effect at once; tokens
    /// used this month still count against the new budget).
    Plan { name: String, plan: String },
    /// Print everything a tenant owns as one JSON document.
    Export { name: String },
    /// Load the business data a tenant's built-in tools act on (customers, then orders) from a
    /// JSON file shaped like the export's `customers` and `orders`; rows with an existing id are
    /// replaced.
    Load { name: String, file: PathBuf },
    /// Print the browser origins a tenant's keys may be used from (CORS), or replace them.
    Origins {
        name: String,
        /// Replace the list with these (`https://host[:port]`, or `*` for any).
        #[arg(long, num_args = 1..)]
        set: Option<Vec<String>>,
        /// Empty the list (browsers can no longer use the tenant's keys).
        #[arg(long, conflicts_with = "set")]
        clear: bool,
    },
    /// Delete a tenant: its keys and sessions stop at once; its rows go at the next purge
    /// after the grace period; its usage facts stay for invoicing.
    Delete { name: String },
    /// Remove the rows of tenants deleted more than the grace period ago.
    Purge {
        /// Days a deleted tenant's rows are kept (for an undo by an operator, or an export).
        #[arg(long, default_value_t = 30)]
        older_than_days: u32,
    },
    /// Issue another API key for an existing tenant.
    Key {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// A limit's value on the command line: a number, or `none` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitArg(pub Option<u64>);

impl std::str::FromStr for LimitArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(Self(None)),
            n => match n.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!("{n:?}: give a number from 1, or none")),
                Ok(n) => Ok(Self(Some(n))),
            },
        }
    }
}

/// A plan's or a key's limits on the command line; a limit left out is not set (or, with
/// `plan update`, left as it is).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct LimitArgs {
    /// Requests a minute (a number, or `none`).
    #[arg(long)]
    pub requests_per_minute: Option<LimitArg>,
    /// Prompt and completion tokens a minute (a number, or `none`).
    #[arg(long)]
    pub tokens_per_minute: Option<LimitArg>,
    /// Tokens a calendar month (UTC) (a number, or `none`).
    #[arg(long)]
    pub monthly_tokens: Option<LimitArg>,
    /// Requests at once (a number, or `none`).
    #[arg(long)]
    pub max_concurrent: Option<LimitArg>,
    /// The models that may be called, comma-separated (or `none` for every model).
    #[arg(long)]
    pub models: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum PlanCommand {
    /// Create a plan.
    Create {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Change some of a plan's limits (the others stay); every subscribed tenant gets them at
    /// once.
    Update {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Delete a plan no tenant is subscribed to.
    Delete { name: String },
    /// List plans and how many tenants each has.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum FlagCommand {
    /// Turn a flag on or off, for everyone or for one tenant; in force without a restart.
    Set {
        name: String,
        /// `on` or `off`.
        state: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a setting (a tenant then follows the global one; the global one its default).
    Unset {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List every setting.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Create a user; the password is read from the first line of standard input.
    Create {
        email: String,
        /// `platform_admin` (no tenant), `tenant_admin` or `member`.
        #[arg(long)]
        role: String,
        /// The user's tenant (not for a platform admin).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List a tenant's users.
    List {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List a tenant's keys (prefixes only; the secret is never stored).
    List {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once, on every edge.
    Revoke {
        /// The whole key, or its prefix as `key list` shows it.
        key: String,
    },
    /// Issue a replacement key; the old one keeps working for the grace period.
    Rotate {
        /// The whole key, or its prefix as `key list` shows it.
        key: String,
        /// Seconds the old key stays valid (0: it stops at once).
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Set a key's own limits (tighter than its plan's) and expiry: exactly those given.
    Limits {
        /// The whole key, or its prefix as `key list` shows it.
        key: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Seconds from now until the key expires (or `none`).
        #[arg(long)]
        expires_in_secs: Option<LimitArg>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ModelCommand {
    /// Add or replace a model.
    Add {
        /// Catalogue name callers use.
        name: String,
        /// `sim` or `openai`.
        #[arg(long)]
        provider: ProviderKind,
        /// Model name sent upstream (default: the catalogue name).
        #[arg(long)]
        upstream_model: Option<String>,
        /// Base URL of an OpenAI-compatible upstream (provider openai).
        #[arg(long)]
        base_url: Option<String>,
        /// Environment variable holding the upstream key.
        #[arg(long)]
        api_key_env: Option<String>,
        #[arg(long, default_value_t = 8192)]
        context_window: i32,
        /// Micro-dollars per million input tokens.
        #[arg(long, default_value_t = 0)]
        input_price_micros: i64,
        /// Micro-dollars per million output tokens.
        #[arg(long, default_value_t = 0)]
        output_price_micros: i64,
    },
    /// Disable a model (its rows in usage and invoices stay).
    Remove { name: String },
    /// List enabled models.
    List,
}

#[derive(Subcommand)]
pub(crate) enum PriceCommand {
    /// Add a version of an item's price, in force from `--from` (default now; never earlier).
    /// Prices are decimals in the billing currency: per million tokens for models, per call or
    /// run for tools and workflows, per month for a plan's base fee and included usage.
    Set {
        /// `model:<name>`, `tool:<name>`, `workflow:<name>` (`tool:*`, `workflow:*` for every
        /// one without its own price) or `plan:<name>`.
        item: String,
        /// Per million input tokens.
        #[arg(long, default_value = "0")]
        input: String,
        /// Per million output tokens.
        #[arg(long, default_value = "0")]
        output: String,
        /// Per million cached input tokens.
        #[arg(long, default_value = "0")]
        cached_input: String,
        /// Per tool call or workflow run.
        #[arg(long, default_value = "0")]
        per_unit: String,
        /// A plan's monthly base fee.
        #[arg(long, default_value = "0")]
        base_fee: String,
        /// The usage a plan's base fee includes each month.
        #[arg(long, default_value = "0")]
        included: String,
        /// When the price starts (RFC 3339, e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        from: Option<String>,
    },
    /// List price versions (of one item, or all).
    List {
        item: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the billing currency, or set it (only before the first invoice).
    Currency { code: Option<String> },
}

#[derive(Subcommand)]
pub(crate) enum BudgetCommand {
    /// Set a tenant's monthly spend budget (or one of its keys'), replacing any. Spend is
    /// usage priced by the price book; requests that would go beyond it get 429.
    Set {
        /// The tenant, by name.
        tenant: String,
        /// The budget a month, a decimal in the billing currency (e.g. 50.00).
        amount: String,
        /// Only this key's (its id, as `sluice key list` shows it).
        #[arg(long)]
        key: Option<sqlx::types::Uuid>,
        /// Alert at this share of the budget (percent, 1-100).
        #[arg(long)]
        alert: Option<i64>,
    },
    /// Remove a tenant's budget (or one of its keys').
    Remove {
        tenant: String,
        #[arg(long)]
        key: Option<sqlx::types::Uuid>,
    },
    /// A tenant's budgets and what was spent against each this month.
    List {
        tenant: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum InvoicesCommand {
    /// Close a month: one final invoice per tenant with something to bill. Safe to run again:
    /// tenants already invoiced for the month are left alone.
    Run {
        /// The month, YYYY-MM (it must have ended).
        #[arg(long)]
        period: String,
        /// Who issues them (numbering is per issuer, without gaps).
        #[arg(long, default_value = "default")]
        issuer: String,
        /// Only this tenant (by name).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The current month to date for a tenant, as it would be invoiced now.
    Preview {
        tenant: String,
        /// Print JSON (`currency`, `total`, `lines` with `model`, `input_tokens`,
        /// `output_tokens`, `amount`).
        #[arg(long)]
        json: bool,
    },
    /// List final invoices.
    List {
        /// Only this month (YYYY-MM).
        #[arg(long)]
        period: Option<String>,
        /// Only this tenant (by name).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Print one invoice (by number or id).
    Show {
        invoice: String,
        /// As JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// As CSV.
        #[arg(long)]
        csv: bool,
    },
    /// A month's invoices as one CSV (every tenant's, or one's).
    Export {
        #[arg(long)]
        period: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Compare a month's usage as the usage topic, the ClickHouse facts, the per-minute rollup
    /// and the invoices have it, and print every difference (last line `differences=<n>`).
    Reconcile {
        #[arg(long)]
        period: String,
        /// Only this tenant (by name).
        #[arg(long)]
        tenant: Option<String>,
        /// Leave out the rollup (when the SQL pipelines do not run).
        #[arg(long)]
        no_rollup: bool,
    },
    /// A tenant's usage per day, key and model, priced, as CSV.
    Usage {
        tenant: String,
        /// First day (YYYY-MM-DD, UTC; default: the first of this month).
        #[arg(long)]
        from: Option<String>,
        /// Day after the last (YYYY-MM-DD; default: tomorrow).
        #[arg(long)]
        to: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref(), std::env::vars())?;
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli.command, config))
}

fn init_logging(config: &Config) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Up => process::up(config).await,
        Command::Edge => process::edge_only(config).await,
        Command::Registry => process::registry_only(config).await,
        Command::Run { stage } => process::stage_only(config, stage).await,
        Command::Setup => {
            setup::migrate(&config).await?;
            setup::create_topics(&config).await
        }
        Command::Migrate => setup::migrate(&config).await,
        Command::Topics => setup::create_topics(&config).await,
        Command::Schemas => {
            let codec = process::codec(&config)?;
            codec.register_all().await?;
            println!("registered every schema with {}", config.registry.url);
            Ok(())
        }
        Command::Tenant { command } => admin::tenant(config, command).await,
        Command::Plan { command } => admin::plan(config, command).await,
        Command::Key { command } => admin::key(config, command).await,
        Command::User { command } => admin::user(config, command).await,
        Command::Flag { command } => admin::flag(config, command).await,
        Command::Audit {
            tenant,
            limit,
            json,
        } => admin::audit(config, tenant, limit, json).await,
        Command::Model { command } => admin::model(config, command).await,
        Command::Workflow { command } => workflows::workflow(config, command).await,
        Command::Tool { command } => tools::tool(config, command).await,
        Command::Price { command } => billing::price(config, command).await,
        Command::Budget { command } => billing::budget(config, command).await,
        Command::Invoices { command } => billing::invoices(config, command).await,
        Command::Dlq { command } => admin::dlq(config, command).await,
        Command::Replay {
            stage,
            from_ms,
            to_ms,
            topic,
        } => {
            let to_ms = to_ms.unwrap_or_else(sluice_pipelines::now_ms);
            if to_ms <= from_ms {
                anyhow::bail!("--to-ms must be after --from-ms");
            }
            let range = ReplayRange {
                topic,
                from_ms,
                to_ms,
            };
            let report = process::replay(&config, stage, range).await?;
            println!(
                "read {}, processed {}, dead-lettered {}",
                report.read, report.processed, report.dead_lettered
            );
            Ok(())
        }
        Command::Bench { command } => bench::run(config, command).await,
    }
}
