//! `sluice workflow`: check definitions, publish them to the registry, list what a tenant sees,
//! and turn workflows on or off for a tenant.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use sluice_orchestrator::workflow;
use sluice_stores::postgres::{self, workflows};
use sqlx::{types::Uuid, PgPool};

use crate::{
    admin::{audit_cli, tenant_named},
    config::Config,
    WorkflowCommand,
};

pub async fn workflow(config: Config, command: WorkflowCommand) -> anyhow::Result<()> {
    if let WorkflowCommand::Check { paths } = &command {
        return check(paths);
    }
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        WorkflowCommand::Check { .. } => Ok(()),
        WorkflowCommand::Publish { file, tenant } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let tenant = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?),
                None => None,
            };
            let tenant_id = tenant.as_ref().map(|t| t.id);
            let (name, version, new) =
                publish(&admin, tenant_id, &file.display().to_string(), &text).await?;
            let owner = tenant.map_or_else(|| "built-in".to_owned(), |t| t.name);
            if new {
                audit_cli(
                    &admin,
                    tenant_id,
                    "workflow.publish",
                    &name,
                    json!({ "version": version }),
                )
                .await?;
                println!("published {name} v{version} ({owner})");
            } else {
                println!("{name} v{version} ({owner}) is already published with this text");
            }
            Ok(())
        }
        WorkflowCommand::List { tenant, json } => {
            let tenant = match tenant {
                Some(name) => Some(tenant_named(&admin, &name).await?.id),
                None => None,
            };
            let mut conn = admin.acquire().await?;
            let entries = workflows::list(&mut conn, tenant).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            for e in entries {
                let missing = if e.ready {
                    ""
                } else {
                    " (its tools are missing)"
                };
                println!(
                    "{:<24} v{:<4} {:<8} {:<3} intents: {}{missing}",
                    e.name,
                    e.version,
                    if e.own { "own" } else { "built-in" },
                    if e.enabled { "on" } else { "off" },
                    e.intents.join(", ")
                );
            }
            Ok(())
        }
        WorkflowCommand::Enable { name, tenant } => switch(&admin, &name, &tenant, true).await,
        WorkflowCommand::Disable { name, tenant } => switch(&admin, &name, &tenant, false).await,
    }
}

/// Turns workflow `name` on or off for tenant `tenant_name`.
async fn switch(
    admin: &PgPool,
    name: &str,
    tenant_name: &str,
    enabled: bool,
) -> anyhow::Result<()> {
    let tenant = tenant_named(admin, tenant_name).await?;
    let mut conn = admin.acquire().await?;
    let known = workflows::list(&mut conn, Some(tenant.id))
        .await?
        .iter()
        .any(|e| e.name == name);
    if !known {
        anyhow::bail!("tenant {tenant_name} has no workflow named {name:?} (see `sluice workflow list --tenant {tenant_name}`)");
    }
    workflows::set_enabled(&mut conn, tenant.id, name, enabled).await?;
    drop(conn);
    let action = if enabled {
        "workflow.enable"
    } else {
        "workflow.disable"
    };
    audit_cli(admin, Some(tenant.id), action, name, json!({})).await?;
    println!(
        "{name} is {} for {tenant_name}",
        if enabled { "on" } else { "off" }
    );
    Ok(())
}

/// Checks the definition in `text` (from `file`) and publishes it for `tenant` (`None`:
/// built-in): `(name, version, whether that version is new)`.
pub async fn publish(
    admin: &PgPool,
    tenant: Option<Uuid>,
    file: &str,
    text: &str,
) -> anyhow::Result<(String, i32, bool)> {
    let checked = workflow::load(file, text).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", lines.join("\n"))
    })?;
    let version = i32::try_from(checked.version).context("version out of range")?;
    let mut tx = admin.begin().await?;
    let new = workflows::publish(
        &mut tx,
        tenant,
        &workflows::Publication {
            name: &checked.name,
            version,
            description: &checked.description,
            intents: &checked.intents,
            tools: &checked.tools,
            definition: text,
        },
    )
    .await?;
    tx.commit().await?;
    Ok((checked.name, version, new))
}

/// Publishes the workflows Sluice ships as built-in ones (a new version only where the text
/// changed); part of `sluice setup`.
pub async fn publish_shipped(admin: &PgPool) -> anyhow::Result<()> {
    for (file, text) in workflow::SHIPPED {
        let (name, version, new) = publish(admin, None, file, text).await?;
        if new {
            println!("workflows: published {name} v{version}");
        }
    }
    Ok(())
}

/// `sluice workflow check`.
fn check(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut files: Vec<(String, String)> = Vec::new();
    if paths.is_empty() {
        files.extend(
            workflow::SHIPPED
                .iter()
                .map(|(name, text)| ((*name).to_owned(), (*text).to_owned())),
        );
    }
    for path in paths {
        let mut found = Vec::new();
        if path.is_dir() {
            for entry in
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
            {
                let entry = entry?.path();
                if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    found.push(entry);
                }
            }
            found.sort();
        } else {
            found.push(path.clone());
        }
        for file in found {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            files.push((file.display().to_string(), text));
        }
    }
    let mut mistakes = 0;
    for (file, text) in &files {
        match workflow::load(file, text) {
            Ok(w) => println!(
                "ok {file}: {} v{}, {} steps",
                w.name,
                w.version,
                w.steps.len()
            ),
            Err(errors) => {
                mistakes += errors.len();
                for error in errors {
                    println!("{error}");
                }
            }
        }
    }
    if mistakes > 0 {
        anyhow::bail!("{mistakes} mistake(s) in {} file(s) checked", files.len());
    }
    Ok(())
}
