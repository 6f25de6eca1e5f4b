//! `sluice tool`: a tenant's own tools — the HTTP endpoints its workflows call.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::json;
use sluice_orchestrator::tools::{builtin, HttpTool, HttpToolConfig};
use sluice_stores::postgres::{self, tools};

use crate::{
    admin::{audit_cli, tenant_named},
    config::Config,
    ToolCommand,
};

/// What a tool's name may hold: what a workflow's steps can name.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

pub async fn tool(config: Config, command: ToolCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        ToolCommand::Add {
            name,
            tenant,
            url,
            method,
            token_env,
            result_pointer,
            headers,
        } => {
            if !valid_name(&name) {
                anyhow::bail!("a tool's name is 1 to 64 of a-z, 0-9 and _");
            }
            if builtin::NAMES.contains(&name.as_str()) {
                anyhow::bail!("{name} is a built-in tool: choose another name");
            }
            let headers = headers
                .iter()
                .map(|h| {
                    let (k, v) = h
                        .split_once(':')
                        .with_context(|| format!("a header is `Name: value`, not {h:?}"))?;
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                })
                .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
            let http = HttpToolConfig {
                url,
                method,
                bearer_token_env: token_env,
                headers,
                result_pointer,
            };
            HttpTool::new(http.clone()).map_err(anyhow::Error::msg)?;
            let tenant = tenant_named(&admin, &tenant).await?;
            let settings = serde_json::to_value(&http)?;
            let mut conn = admin.acquire().await?;
            let new = tools::put(&mut conn, tenant.id, &name, "http", &settings).await?;
            drop(conn);
            audit_cli(
                &admin,
                Some(tenant.id),
                "tool.put",
                &name,
                json!({ "url": http.url, "method": http.method }),
            )
            .await?;
            println!(
                "{} tool {name} for {}: {} {}",
                if new { "added" } else { "changed" },
                tenant.name,
                http.method.to_ascii_uppercase(),
                http.url
            );
            Ok(())
        }
        ToolCommand::List { tenant, json } => {
            let tenant = tenant_named(&admin, &tenant).await?;
            let mut conn = admin.acquire().await?;
            let list = tools::list(&mut conn, tenant.id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            for t in list {
                println!(
                    "{:<24} {:<5} {:<3} {} {}",
                    t.name,
                    t.kind,
                    if t.enabled { "on" } else { "off" },
                    t.config["method"].as_str().unwrap_or_default(),
                    t.config["url"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
        ToolCommand::Enable { name, tenant } => switch(&admin, &name, &tenant, true).await,
        ToolCommand::Disable { name, tenant } => switch(&admin, &name, &tenant, false).await,
    }
}

async fn switch(
    admin: &sqlx::PgPool,
    name: &str,
    tenant_name: &str,
    enabled: bool,
) -> anyhow::Result<()> {
    let tenant = tenant_named(admin, tenant_name).await?;
    let mut conn = admin.acquire().await?;
    if !tools::set_enabled(&mut conn, tenant.id, name, enabled).await? {
        anyhow::bail!("tenant {tenant_name} has no tool named {name:?} (see `sluice tool list --tenant {tenant_name}`)");
    }
    drop(conn);
    let action = if enabled {
        "tool.enable"
    } else {
        "tool.disable"
    };
    audit_cli(admin, Some(tenant.id), action, name, json!({})).await?;
    println!(
        "{name} is {} for {tenant_name}",
        if enabled { "on" } else { "off" }
    );
    Ok(())
}
