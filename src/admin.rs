//! The administrative commands: `sluice tenant`, `sluice plan`, `sluice key`, `sluice model`
//! and `sluice dlq`.

use anyhow::Context;
use serde_json::{json, Value};
use sluice_pipelines::dlq;
use sluice_stores::{
    postgres::{
        self,
        audit::{self, Action},
        business, keys, models, origins,
        plans::{self, Limits, LimitsChange},
        tenants,
        users::{self, Role},
    },
    ModelSpec,
};
use sqlx::{types::Uuid, PgPool};

use crate::{
    config::Config, process, DlqCommand, FlagCommand, KeyCommand, LimitArg, LimitArgs,
    ModelCommand, PlanCommand, TenantCommand, UserCommand,
};

/// Records an operator's action in the audit log: who (`cli:` and the operator's login name),
/// from where (this host).
pub(crate) async fn audit_cli(
    admin: &PgPool,
    tenant_id: Option<Uuid>,
    action: &str,
    target: &str,
    detail: Value,
) -> anyhow::Result<()> {
    let operator = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let mut conn = admin.acquire().await?;
    audit::record(
        &mut conn,
        &Action {
            tenant_id,
            actor: &format!("cli:{operator}"),
            action,
            target: Some(target),
            detail,
            source: Some(&host),
        },
    )
    .await?;
    Ok(())
}

pub async fn tenant(config: Config, command: TenantCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let (tenant, key, json) = match command {
        TenantCommand::Create { name, plan, json } => {
            if let Some(plan) = &plan {
                let plans = plans::list_plans(&admin).await?;
                if !plans.iter().any(|p| &p.name == plan) {
                    anyhow::bail!("no plan named {plan:?} (see `sluice plan list`)");
                }
            }
            let (tenant, key) = tenants::create_tenant(&admin, &name).await?;
            if let Some(plan) = &plan {
                plans::subscribe(&admin, tenant.id, plan).await?;
            }
            audit_cli(
                &admin,
                Some(tenant.id),
                "tenant.create",
                &name,
                json!({ "plan": plan }),
            )
            .await?;
            (tenant, key, json)
        }
        TenantCommand::Export { name } => {
            let tenant = tenant_named(&admin, &name).await?;
            let clickhouse = sluice_stores::ClickHouse::new(&config.clickhouse);
            let mut conn = admin.acquire().await?;
            let export = sluice_stores::export::tenant_export(
                &mut conn,
                &clickhouse,
                tenant.id,
                sluice_pipelines::now_ms(),
            )
            .await?;
            drop(conn);
            audit_cli(&admin, Some(tenant.id), "tenant.export", &name, json!({})).await?;
            // Written as it is read: a large tenant's usage facts never sit whole in memory.
            use futures::StreamExt;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let mut pieces = std::pin::pin!(export.into_stream());
            while let Some(piece) = pieces.next().await {
                out.write_all(&piece?)?;
            }
            writeln!(out)?;
            return Ok(());
        }
        TenantCommand::Load { name, file } => {
            #[derive(serde::Deserialize)]
            struct Data {
                #[serde(default)]
                customers: Vec<business::Customer>,
                #[serde(default)]
                orders: Vec<business::Order>,
            }
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let data: Data = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not business data: {e}", file.display()))?;
            let tenant = tenant_named(&admin, &name).await?;
            let mut tx = admin.begin().await?;
            for customer in &data.customers {
                business::upsert_customer(&mut tx, tenant.id, customer).await?;
            }
            for order in &data.orders {
                business::upsert_order(&mut tx, tenant.id, order).await?;
            }
            tx.commit().await?;
            let counts = json!({ "customers": data.customers.len(), "orders": data.orders.len() });
            audit_cli(&admin, Some(tenant.id), "tenant.load", &name, counts).await?;
            println!(
                "loaded {} customers and {} orders into {name}",
                data.customers.len(),
                data.orders.len()
            );
            return Ok(());
        }
        TenantCommand::Origins { name, set, clear } => {
            let tenant = tenant_named(&admin, &name).await?;
            let mut conn = admin.acquire().await?;
            let origins = match (set, clear) {
                (None, false) => origins::list(&mut conn, tenant.id).await?,
                (set, _) => {
                    let mut tx = admin.begin().await?;
                    let origins =
                        origins::replace(&mut tx, tenant.id, &set.unwrap_or_default()).await?;
                    tx.commit().await?;
                    audit_cli(
                        &admin,
                        Some(tenant.id),
                        "tenant.origins",
                        &name,
                        json!({ "origins": origins }),
                    )
                    .await?;
                    origins
                }
            };
            drop(conn);
            if origins.is_empty() {
                println!("tenant {name} lists no origins: browsers cannot use its keys");
            }
            for origin in origins {
                println!("{origin}");
            }
            return Ok(());
        }
        TenantCommand::Delete { name } => {
            let tenant = tenant_named(&admin, &name).await?;
            let mut conn = admin.acquire().await?;
            tenants::delete_tenant(&mut conn, tenant.id).await?;
            drop(conn);
            audit_cli(&admin, Some(tenant.id), "tenant.delete", &name, json!({})).await?;
            println!("tenant {name} deleted: its keys and sessions stop at once on every edge; `sluice tenant purge` removes its rows after the grace period");
            return Ok(());
        }
        TenantCommand::Purge { older_than_days } => {
            let purged = tenants::purge_deleted(&admin, older_than_days).await?;
            for name in &purged {
                audit_cli(
                    &admin,
                    None,
                    "tenant.purge",
                    name,
                    json!({ "older_than_days": older_than_days }),
                )
                .await?;
            }
            println!("purged {} tenant(s): {}", purged.len(), purged.join(", "));
            return Ok(());
        }
        TenantCommand::Plan { name, plan } => {
            let tenant = tenant_named(&admin, &name).await?;
            plans::subscribe(&admin, tenant.id, &plan).await?;
            audit_cli(
                &admin,
                Some(tenant.id),
                "tenant.plan",
                &name,
                json!({ "plan": plan }),
            )
            .await?;
            println!("tenant {name} is on plan {plan} (in force on every edge at once)");
            return Ok(());
        }
        TenantCommand::Key { name, json } => {
            let tenant = tenant_named(&admin, &name).await?;
            let key = tenants::create_api_key(&admin, tenant.id, "cli").await?;
            audit_cli(
                &admin,
                Some(tenant.id),
                "key.create",
                &key[..16],
                json!({ "name": "cli" }),
            )
            .await?;
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

fn u32_limit(value: Option<u64>) -> anyhow::Result<Option<u32>> {
    value
        .map(|v| u32::try_from(v).context("a per-minute or concurrency limit must be below 2^32"))
        .transpose()
}

fn models_arg(models: &str) -> Option<Vec<String>> {
    (models != "none").then(|| {
        models
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect()
    })
}

impl LimitArgs {
    /// The limits given; those left out are not limited.
    fn limits(&self) -> anyhow::Result<Limits> {
        let value = |arg: Option<LimitArg>| arg.and_then(|a| a.0);
        Ok(Limits {
            requests_per_minute: u32_limit(value(self.requests_per_minute))?,
            tokens_per_minute: u32_limit(value(self.tokens_per_minute))?,
            monthly_tokens: value(self.monthly_tokens),
            max_concurrent: u32_limit(value(self.max_concurrent))?,
            allowed_models: self.models.as_deref().and_then(models_arg),
        })
    }

    /// The limits given, as a change; those left out stay as they are.
    fn change(&self) -> anyhow::Result<LimitsChange> {
        let small = |arg: Option<LimitArg>| arg.map(|a| u32_limit(a.0)).transpose();
        Ok(LimitsChange {
            requests_per_minute: small(self.requests_per_minute)?,
            tokens_per_minute: small(self.tokens_per_minute)?,
            monthly_tokens: self.monthly_tokens.map(|a| a.0),
            max_concurrent: small(self.max_concurrent)?,
            allowed_models: self.models.as_deref().map(models_arg),
        })
    }
}

fn limit_text(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub async fn plan(config: Config, command: PlanCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        PlanCommand::Create { name, limits } => {
            let limits = limits.limits()?;
            plans::create_plan(&mut *admin.acquire().await?, &name, &limits).await?;
            audit_cli(&admin, None, "plan.create", &name, json!(limits)).await?;
            println!("plan {name} created");
        }
        PlanCommand::Update { name, limits } => {
            let plan =
                plans::update_plan(&mut *admin.acquire().await?, &name, &limits.change()?).await?;
            audit_cli(&admin, None, "plan.update", &name, json!(plan.limits)).await?;
            println!(
                "plan {name} updated (in force for its {} tenant(s) on every edge at once)",
                plan.tenants
            );
        }
        PlanCommand::Delete { name } => {
            plans::delete_plan(&mut *admin.acquire().await?, &name).await?;
            audit_cli(&admin, None, "plan.delete", &name, json!({})).await?;
            println!("plan {name} deleted");
        }
        PlanCommand::List { json } => {
            for plan in plans::list_plans(&admin).await? {
                if json {
                    println!("{}", serde_json::to_string(&plan)?);
                    continue;
                }
                let l = &plan.limits;
                println!(
                    "{:<20} rpm {:>8}  tpm {:>10}  month {:>12}  concurrent {:>6}  models {}  tenants {}",
                    plan.name,
                    limit_text(l.requests_per_minute.map(u64::from)),
                    limit_text(l.tokens_per_minute.map(u64::from)),
                    limit_text(l.monthly_tokens),
                    limit_text(l.max_concurrent.map(u64::from)),
                    l.allowed_models.as_ref().map_or("all".to_owned(), |m| m.join(",")),
                    plan.tenants
                );
            }
        }
    }
    Ok(())
}

pub async fn key(config: Config, command: KeyCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        KeyCommand::List { tenant, json } => {
            let found = tenant_named(&admin, &tenant).await?;
            let mut conn = admin.acquire().await?;
            for key in keys::list_keys(&mut conn, found.id).await? {
                if json {
                    println!("{}", serde_json::to_string(&key)?);
                } else {
                    println!(
                        "{}…  {:<12} {:<8} created {}",
                        key.prefix,
                        key.name,
                        if key.active { "active" } else { "inactive" },
                        key.created_at_ms
                    );
                }
            }
        }
        KeyCommand::Revoke { key } => {
            let found = keys::find_key(&admin, &key).await?;
            let mut conn = admin.acquire().await?;
            keys::revoke(&mut conn, found.id).await?;
            drop(conn);
            audit_cli(
                &admin,
                Some(found.tenant_id),
                "key.revoke",
                &found.prefix,
                json!({ "id": found.id }),
            )
            .await?;
            println!(
                "key {}… of {} revoked (every edge refuses it within moments)",
                found.prefix, found.tenant
            );
        }
        KeyCommand::Rotate {
            key,
            grace_secs,
            json,
        } => {
            let found = keys::find_key(&admin, &key).await?;
            let mut tx = admin.begin().await?;
            let (new_key, new_id) = keys::rotate(&mut tx, found.id, grace_secs).await?;
            tx.commit().await?;
            audit_cli(
                &admin,
                Some(found.tenant_id),
                "key.rotate",
                &found.prefix,
                json!({ "id": found.id, "new_id": new_id, "grace_secs": grace_secs }),
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "tenant": found.tenant, "api_key": new_key, "old_key_valid_for_secs": grace_secs })
                );
            } else {
                println!("api key {new_key}");
                println!(
                    "(shown once; the old key {}… keeps working for {grace_secs} s)",
                    found.prefix
                );
            }
        }
        KeyCommand::Limits {
            key,
            limits,
            expires_in_secs,
        } => {
            let found = keys::find_key(&admin, &key).await?;
            let expires_at_ms = expires_in_secs.and_then(|a| a.0).map(|secs| {
                sluice_pipelines::now_ms()
                    .saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
            });
            let limits = limits.limits()?;
            keys::set_key_limits(&admin, found.id, &limits, expires_at_ms).await?;
            audit_cli(
                &admin,
                Some(found.tenant_id),
                "key.limits",
                &found.prefix,
                json!({ "limits": limits, "expires_at_ms": expires_at_ms }),
            )
            .await?;
            println!("key {}… of {} updated", found.prefix, found.tenant);
        }
    }
    Ok(())
}

/// The tenant named `name`, or an error saying there is none.
pub(crate) async fn tenant_named(admin: &PgPool, name: &str) -> anyhow::Result<tenants::Tenant> {
    tenants::find_tenant(admin, name)
        .await?
        .with_context(|| format!("no tenant named {name:?}"))
}

pub async fn user(config: Config, command: UserCommand) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    match command {
        UserCommand::Create {
            email,
            role,
            tenant,
        } => {
            let role = Role::parse(&role)?;
            let tenant_id = match &tenant {
                Some(name) => Some(tenant_named(&admin, name).await?.id),
                None => None,
            };
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            users::check_credentials(&email, &password)?;
            let hash =
                tokio::task::spawn_blocking(move || users::hash_password(&password)).await??;
            let mut conn = admin.acquire().await?;
            let id = users::add_user(&mut conn, tenant_id, &email, &hash, role).await?;
            drop(conn);
            audit_cli(
                &admin,
                tenant_id,
                "user.create",
                &email,
                json!({ "role": role }),
            )
            .await?;
            println!("user {email} ({}) created: {id}", role.as_str());
        }
        UserCommand::List { tenant, json } => {
            let tenant_id = tenant_named(&admin, &tenant).await?.id;
            let mut conn = admin.acquire().await?;
            for member in users::list_members(&mut conn, tenant_id).await? {
                if json {
                    println!("{}", serde_json::to_string(&member)?);
                } else {
                    println!(
                        "{:<40} {:<13} {}",
                        member.email,
                        member.role.as_str(),
                        if member.disabled {
                            "disabled"
                        } else {
                            "active"
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn flag(config: Config, command: FlagCommand) -> anyhow::Result<()> {
    use sluice_stores::postgres::flags;
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let (name, tenant) = match &command {
        FlagCommand::Set { name, tenant, .. } | FlagCommand::Unset { name, tenant } => {
            (name.clone(), tenant.clone())
        }
        FlagCommand::List { .. } => (String::new(), None),
    };
    let (tenant_id, whom) = match &tenant {
        Some(tenant) => (Some(tenant_named(&admin, tenant).await?.id), tenant.clone()),
        None => (None, "everyone".to_owned()),
    };
    match command {
        FlagCommand::Set { state, .. } => {
            let enabled = match state.as_str() {
                "on" => true,
                "off" => false,
                other => anyhow::bail!("{other:?}: say on or off"),
            };
            flags::set(&admin, &name, tenant_id, enabled).await?;
            audit_cli(
                &admin,
                tenant_id,
                "flag.set",
                &name,
                json!({ "enabled": enabled }),
            )
            .await?;
            println!("flag {name} is {state} for {whom} (in force within moments, no restart)");
        }
        FlagCommand::Unset { .. } => {
            if !flags::unset(&admin, &name, tenant_id).await? {
                anyhow::bail!("flag {name} has no setting for {whom}");
            }
            audit_cli(&admin, tenant_id, "flag.unset", &name, json!({})).await?;
            println!("flag {name}: the setting for {whom} is removed");
        }
        FlagCommand::List { json } => {
            for setting in flags::list(&admin).await? {
                if json {
                    println!("{}", serde_json::to_string(&setting)?);
                } else {
                    println!(
                        "{:<32} {:<40} {}",
                        setting.name,
                        setting.tenant.as_deref().unwrap_or("(everyone)"),
                        if setting.enabled { "on" } else { "off" }
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn audit(
    config: Config,
    tenant: Option<String>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2).await?;
    let tenant_id = match &tenant {
        Some(name) => Some(tenant_named(&admin, name).await?.id),
        None => None,
    };
    let mut conn = admin.acquire().await?;
    for entry in audit::entries(&mut conn, tenant_id, None, limit).await? {
        if json {
            println!("{}", serde_json::to_string(&entry)?);
        } else {
            println!(
                "{}  {:<24} {:<16} {:<28} {} {}",
                entry.at_ms,
                entry.actor,
                entry.action,
                entry.target.unwrap_or_default(),
                entry.source.unwrap_or_default(),
                entry.detail
            );
        }
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
