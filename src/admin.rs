//! The administrative commands: `sluice tenant`, `sluice model` and `sluice dlq`.

use anyhow::Context;
use sluice_pipelines::dlq;
use sluice_stores::{
    postgres::{self, models, tenants},
    ModelSpec,
};

use crate::{config::Config, process, DlqCommand, ModelCommand, TenantCommand};

pub async fn tenant(config: Config, command: TenantCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let (tenant, key, json) = match command {
        TenantCommand::Create { name, json } => {
            let (tenant, key) = tenants::create_tenant(&admin, &name).await?;
            (tenant, key, json)
        }
        TenantCommand::Key { name, json } => {
            let tenant = tenants::find_tenant(&admin, &name)
                .await?
                .with_context(|| format!("no tenant named {name:?}"))?;
            let key = tenants::create_api_key(&admin, tenant.id, "cli").await?;
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

pub async fn dlq(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    let codec = process::codec(&config)?;
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

pub async fn model(config: Config, command: ModelCommand) -> anyhow::Result<()> {
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
            let spec = ModelSpec {
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
            let problems = spec.validate();
            if !problems.is_empty() {
                anyhow::bail!("model {}: {}", spec.name, problems.join("; "));
            }
            let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
            models::upsert_model(&admin, &spec).await?;
            println!(
                "model {} saved (routers pick it up within their refresh interval)",
                spec.name
            );
        }
        ModelCommand::Remove { name } => {
            let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
            if !models::disable_model(&admin, &name).await? {
                anyhow::bail!("no enabled model named {name:?}");
            }
            println!("model {name} disabled");
        }
        ModelCommand::List => {
            let app = postgres::connect(&config.postgres.url, 2).await?;
            for m in models::enabled_models(&app).await? {
                println!(
                    "{:<24} {:<7} context {:>7}  in {:>9}  out {:>9} µ$/Mtok  {}",
                    m.name,
                    m.provider.as_str(),
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
