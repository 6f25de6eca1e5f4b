//! `sluice`: the one binary. Everything in one process for one machine (`sluice up`), each part
//! on its own so it scales as its own consumer group (`sluice edge`, `sluice run router`, ...),
//! and the tools around them (setup, tenants, models).

mod config;
mod stages;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use config::Config;
use sluice_pipelines::control;

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
    /// Manage the model catalogue.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
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
enum DlqCommand {
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
enum BenchCommand {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    Router,
    Orchestrator,
    Metering,
    /// The streaming SQL pipelines (`[sql]` in the configuration).
    Sql,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and print its API key (shown once).
    Create {
        name: String,
        /// Print JSON (`{"tenant_id", "name", "api_key"}`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue another API key for an existing tenant.
    Key {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Add or replace a model.
    Add {
        /// Catalogue name callers use.
        name: String,
        /// `sim` or `openai`.
        #[arg(long)]
        provider: String,
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

fn stage_kind(stage: Stage) -> stages::StageKind {
    match stage {
        Stage::Router => stages::StageKind::Router,
        Stage::Orchestrator => stages::StageKind::Orchestrator,
        Stage::Metering => stages::StageKind::Metering,
        Stage::Sql => stages::StageKind::Sql,
    }
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
        Command::Up => stages::up(config).await,
        Command::Edge => stages::edge_only(config).await,
        Command::Registry => stages::registry_only(config).await,
        Command::Run { stage } => stages::stage_only(config, stage_kind(stage)).await,
        Command::Setup => {
            stages::migrate(&config).await?;
            stages::create_topics(&config).await
        }
        Command::Migrate => stages::migrate(&config).await,
        Command::Topics => stages::create_topics(&config).await,
        Command::Schemas => {
            let codec = stages::codec(&config)?;
            codec.register_all().await?;
            println!("registered every schema with {}", config.registry.url);
            Ok(())
        }
        Command::Tenant { command } => tenant(config, command).await,
        Command::Model { command } => model(config, command).await,
        Command::Dlq { command } => dlq(config, command).await,
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
            let report = stages::replay(&config, stage_kind(stage), topic, from_ms, to_ms).await?;
            println!(
                "read {}, processed {}, dead-lettered {}",
                report.read, report.processed, report.dead_lettered
            );
            Ok(())
        }
        Command::Bench { command } => bench(config, command).await,
    }
}

async fn tenant(config: Config, command: TenantCommand) -> anyhow::Result<()> {
    let admin = control::connect(&config.postgres.admin_url, 2).await?;
    let (tenant, key, json) = match command {
        TenantCommand::Create { name, json } => {
            let (tenant, key) = control::create_tenant(&admin, &name).await?;
            (tenant, key, json)
        }
        TenantCommand::Key { name, json } => {
            let tenant = control::find_tenant(&admin, &name)
                .await?
                .with_context(|| format!("no tenant named {name:?}"))?;
            let key = control::create_api_key(&admin, tenant.id, "cli").await?;
            (tenant, key, json)
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "tenant_id": tenant.id, "name": tenant.name, "api_key": key })
        );
    } else {
        println!("tenant  {} ({})", tenant.name, tenant.id);
        println!("api key {key}");
        println!("(the key is shown once; Sluice stores only its hash)");
    }
    Ok(())
}

async fn dlq(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    use sluice_pipelines::dlq;
    let codec = stages::codec(&config)?;
    let topic = config.kafka.topics().dlq;
    let entries = dlq::read_all(&config.kafka, &codec, &topic).await?;
    let from = |source: &Option<String>, e: &dlq::Entry| {
        source.as_ref().is_none_or(|s| *s == e.letter.source_topic)
    };
    match command {
        DlqCommand::List { source, json } => {
            for e in entries.iter().filter(|e| from(&source, e)) {
                let l = &e.letter;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "position": e.position(), "source_topic": l.source_topic,
                            "source_partition": l.source_partition, "source_offset": l.source_offset,
                            "stage": l.stage, "reason": l.reason, "failed_at_ms": l.failed_at_ms,
                            "bytes": l.payload.as_ref().map_or(0, Vec::len),
                        })
                    );
                } else {
                    println!(
                        "{:<10} {}[{}]@{}  {}: {}",
                        e.position(),
                        l.source_topic,
                        l.source_partition,
                        l.source_offset,
                        l.stage,
                        l.reason
                    );
                }
            }
        }
        DlqCommand::Replay {
            positions,
            all,
            source,
        } => {
            if all != positions.is_empty() {
                anyhow::bail!("name DLQ positions to replay, or --all (not both)");
            }
            let chosen: Vec<dlq::Entry> = if all {
                entries.into_iter().filter(|e| from(&source, e)).collect()
            } else {
                let mut chosen = Vec::new();
                for position in &positions {
                    let entry = entries
                        .iter()
                        .find(|e| &e.position() == position)
                        .with_context(|| format!("no dead letter at {position}"))?;
                    chosen.push(entry.clone());
                }
                chosen
            };
            let replayed = dlq::replay(&config.kafka, &chosen).await?;
            println!("replayed {replayed} record(s)");
        }
    }
    Ok(())
}

async fn bench(config: Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Passthrough {
            records,
            record_bytes,
            lanes,
            rounds,
        } => {
            let options = sluice_pipelines::bench::PassthroughOptions {
                records,
                record_bytes,
                lanes,
                rounds,
            };
            let codec = stages::codec(&config)?;
            let report =
                sluice_pipelines::bench::passthrough(&config.kafka, codec, &options).await?;
            println!(
                "records: {} of {} bytes, median of {rounds} rounds per path",
                report.records, report.record_bytes
            );
            println!(
                "raw librdkafka consume+produce: {:.0} records/s (rounds {:.0}..{:.0})",
                report.raw_per_sec, report.raw_range.0, report.raw_range.1
            );
            println!(
                "pipeline (decode, operator, encode, ordered commit): {:.0} records/s (rounds {:.0}..{:.0})",
                report.pipeline_per_sec, report.pipeline_range.0, report.pipeline_range.1
            );
            println!("ratio={:.3}", report.ratio());
        }
        BenchCommand::Window {
            records,
            tenants,
            minutes,
            lanes,
            rounds,
        } => {
            let options = sluice_sql::bench::WindowOptions {
                records,
                tenants,
                minutes,
                rounds,
                lanes,
            };
            let codec = stages::codec(&config)?;
            let target = sluice_sql::ClickHouseTarget {
                clickhouse: config.clickhouse.clone(),
                table: "tenant_usage_1m".into(),
            };
            let report = sluice_sql::bench::window(&config.kafka, codec, target, &options).await?;
            println!(
                "records: {} usage events, {tenants} tenants over {minutes} minutes, median of {rounds} rounds per path",
                report.records
            );
            println!(
                "raw librdkafka consume: {:.0} records/s (rounds {:.0}..{:.0})",
                report.raw_per_sec, report.raw_range.0, report.raw_range.1
            );
            println!(
                "SQL tenant_usage_1m (decode, window, DataFusion, ClickHouse, ordered commit): {:.0} records/s (rounds {:.0}..{:.0}), {} rows",
                report.sql_per_sec, report.sql_range.0, report.sql_range.1, report.rows
            );
            println!("ratio={:.3}", report.ratio());
        }
    }
    Ok(())
}

async fn model(config: Config, command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Add {
            name,
            provider,
            upstream_model,
            base_url,
            api_key_env,
            context_window,
            input_price_micros,
            output_price_micros,
        } => {
            if !["sim", "openai"].contains(&provider.as_str()) {
                anyhow::bail!("--provider must be sim or openai");
            }
            if provider == "openai" && base_url.is_none() {
                anyhow::bail!("--base-url is required for provider openai");
            }
            let admin = control::connect(&config.postgres.admin_url, 2).await?;
            let spec = control::ModelSpec {
                upstream_model: upstream_model.unwrap_or_else(|| name.clone()),
                name,
                provider,
                base_url,
                api_key_env,
                context_window,
                input_price_micros,
                output_price_micros,
                created_at: 0,
            };
            control::upsert_model(&admin, &spec).await?;
            println!(
                "model {} saved (routers pick it up within their refresh interval)",
                spec.name
            );
        }
        ModelCommand::Remove { name } => {
            let admin = control::connect(&config.postgres.admin_url, 2).await?;
            if !control::disable_model(&admin, &name).await? {
                anyhow::bail!("no enabled model named {name:?}");
            }
            println!("model {name} disabled");
        }
        ModelCommand::List => {
            let app = control::connect(&config.postgres.url, 2).await?;
            for m in control::enabled_models(&app).await? {
                println!(
                    "{:<24} {:<7} context {:>7}  in {:>9}  out {:>9} µ$/Mtok  {}",
                    m.name,
                    m.provider,
                    m.context_window,
                    m.input_price_micros,
                    m.output_price_micros,
                    m.base_url.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
