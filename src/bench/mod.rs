//! `sluice bench`: each benchmark measures Sluice against the limit on the same machine in the
//! same run and prints both: `passthrough`, `window` and `sink` print `ratio=<measured/limit>`
//! last, `invoices` `ratio=<run time ÷ GROUP BY time>`, `gateway` `max_rps=<n>
//! p99_tax_ms_c10=<x>`, `workflows` `runs_per_s=<n> step_p50_ms=<x> guard_ns_per_call=<n>
//! ratio=<one broker hop ÷ a step>`.

mod gateway;
mod invoices;
mod load;
mod under_test;
mod upstream;
mod websocket;
mod workflows;

use sluice_pipelines::bench::{passthrough, Summary};
use sluice_stores::ClickHouse;

use crate::{config::Config, process, BenchCommand};

/// Names the run's topics, deleted when it ended (as `sluice bench gateway` says up front).
fn print_topics(workspace: &str) {
    println!("topics: {workspace}.* (deleted when the run ended)");
}

/// Deletes a run's topics, its `sluice up`'s and `extra`, so that repeated runs do not pile
/// records up in the broker (the local one keeps them in memory).
async fn remove_topics(config: &Config, id: &str, extra: &[&str]) {
    let mut kafka = config.kafka.clone();
    kafka.topic_prefix = id.to_owned();
    let topics = kafka.topics();
    let mut names = topics.all().to_vec();
    names.extend_from_slice(extra);
    sluice_pipelines::bench::remove_topics(&kafka, id, &names).await;
}

/// `label: <median> records/s (rounds <slowest>..<fastest>)<extra>`.
fn print_rate(label: &str, rates: &Summary, extra: &str) {
    println!(
        "{label}: {:.0} records/s (rounds {:.0}..{:.0}){extra}",
        rates.median, rates.slowest, rates.fastest
    );
}

/// Runs a benchmark and prints its figures, the ratio last.
pub async fn run(config: Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Gateway {
            clients,
            seconds,
            warmup_seconds,
            stream,
            hop_samples,
            idle_seconds,
            broker_process,
            limits,
            compare_limits,
        } => {
            let options = gateway::GatewayOptions {
                clients,
                seconds,
                warmup_seconds,
                stream,
                hop_samples,
                idle_seconds,
                broker_process,
                limits,
                compare_limits,
            };
            gateway::run(&config, &options).await?;
        }
        BenchCommand::Workflows {
            clients,
            seconds,
            warmup_seconds,
            guard_calls,
            hop_samples,
        } => {
            let options = workflows::WorkflowOptions {
                clients,
                seconds,
                warmup_seconds,
                guard_calls,
                hop_samples,
            };
            workflows::run(&config, &options).await?;
        }
        BenchCommand::Websocket {
            sessions,
            connecting,
            stream_seconds,
        } => {
            let options = websocket::WebSocketOptions {
                sessions,
                connecting,
                stream_seconds,
            };
            websocket::run(&config, &options).await?;
        }
        BenchCommand::WebsocketBareServer { listen } => websocket::bare_server(&listen).await?,
        BenchCommand::Passthrough {
            records,
            record_bytes,
            lanes,
            rounds,
        } => {
            let options = passthrough::PassthroughOptions {
                records,
                record_bytes,
                lanes,
                rounds,
            };
            let codec = process::codec(&config)?;
            let report = passthrough::passthrough(&config.kafka, codec, &options).await?;
            print_topics(&report.workspace);
            println!(
                "records: {} of {} bytes, median of {rounds} rounds per path",
                report.records, report.record_bytes
            );
            print_rate(
                "raw librdkafka consume+produce",
                &report.comparison.limit,
                "",
            );
            print_rate(
                "pipeline (decode, operator, encode, ordered commit)",
                &report.comparison.measured,
                "",
            );
            println!("ratio={:.3}", report.comparison.ratio());
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
            let codec = process::codec(&config)?;
            let clickhouse = ClickHouse::new(&config.clickhouse);
            let report =
                sluice_sql::bench::window(&config.kafka, codec, clickhouse, &options).await?;
            print_topics(&report.workspace);
            println!(
                "records: {} usage events, {tenants} tenants over {minutes} minutes, median of {rounds} rounds per path",
                report.records
            );
            print_rate("raw librdkafka consume", &report.comparison.limit, "");
            print_rate(
                "SQL tenant_usage_1m (decode, window, DataFusion, ClickHouse, ordered commit)",
                &report.comparison.measured,
                &format!(
                    ", {} rows, at most {} rows held in windows",
                    report.rows, report.peak_held_rows
                ),
            );
            println!("ratio={:.3}", report.comparison.ratio());
        }
        BenchCommand::Invoices { events, tenants } => {
            invoices::run(&config, &invoices::InvoiceBenchOptions { events, tenants }).await?;
        }
        BenchCommand::Sink {
            records,
            rounds,
            clickhouse_port,
        } => {
            let ch = &config.clickhouse;
            // The host of the HTTP URL (`http://host:port`), which the native port shares.
            let host = ch
                .url
                .split("://")
                .nth(1)
                .and_then(|rest| rest.split([':', '/']).next())
                .unwrap_or("127.0.0.1")
                .to_owned();
            let options = sluice_clickhouse_sink::bench::SinkOptions {
                records,
                rounds,
                max_batch: config.stages.metering_max_batch,
                max_batch_bytes: config.stages.metering_max_batch_bytes,
                max_insert_events: config.stages.metering_max_insert_events,
                max_insert_age: std::time::Duration::from_millis(
                    config.stages.metering_max_insert_ms,
                ),
                client: sluice_clickhouse_sink::bench::ClientOptions {
                    program: "clickhouse-client".into(),
                    host,
                    port: clickhouse_port,
                    database: ch.database.clone(),
                    user: ch.user.clone(),
                    password: ch.password.clone(),
                },
            };
            let codec = process::codec(&config)?;
            let clickhouse = ClickHouse::new(&config.clickhouse);
            let report =
                sluice_clickhouse_sink::bench::sink(&config.kafka, codec, clickhouse, &options)
                    .await?;
            print_topics(&report.workspace);
            println!(
                "records: {} usage events per path, median of {rounds} rounds per path, sink batches of {}",
                report.records, options.max_batch
            );
            print_rate(
                "clickhouse-client, one bulk insert",
                &report.comparison.limit,
                "",
            );
            print_rate(
                "metering sink (consume, decode, batch, stored-id check, insert, commit)",
                &report.comparison.measured,
                "",
            );
            println!("ratio={:.3}", report.comparison.ratio());
        }
    }
    Ok(())
}
