//! `sluice setup`, `migrate` and `topics`: preparing the stores and the broker.

use anyhow::Context;
use sluice_pipelines::kafka;
use sluice_stores::{clickhouse, postgres};

use crate::config::Config;

/// Applies PostgreSQL migrations and ClickHouse DDL.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let admin = postgres::connect(&config.postgres.admin_url, 2)
        .await
        .context("connecting to PostgreSQL as the owner")?;
    let applied = postgres::migrate(&admin).await?;
    println!("postgres: {} migration(s) applied", applied.len());
    // ClickHouse has no locks: setups running at once take turns through PostgreSQL's, so a
    // new rollup is filled from the stored facts once.
    let mut turn = admin.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice-clickhouse-migrations'))")
        .execute(&mut *turn)
        .await?;
    let migrated = clickhouse::schema::migrate(&config.clickhouse).await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext('sluice-clickhouse-migrations'))")
        .execute(&mut *turn)
        .await?;
    migrated.context("creating ClickHouse tables")?;
    println!("clickhouse: database {} ready", config.clickhouse.database);
    crate::workflows::publish_shipped(&admin).await?;
    Ok(())
}

/// Creates the topics.
pub async fn create_topics(config: &Config) -> anyhow::Result<()> {
    let topics = config.kafka.topics();
    let created = kafka::ensure_topics(&config.kafka, &topics.all()).await?;
    println!(
        "kafka: {} topic(s) created, {} already there",
        created.len(),
        topics.all().len() - created.len()
    );
    Ok(())
}
