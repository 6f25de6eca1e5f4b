//! The schema registry's storage: tables `registry_schemas` (schema texts, with global ids),
//! `registry_subject_versions` and `registry_config` (compatibility levels; subject `''` holds
//! the global level). The REST service in front of it is the edge's `registry` module.
//!
//! Schema ids are global: the same schema registered under two subjects gets one id, and
//! registering a schema a subject already has returns the existing id. A new version must pass
//! the subject's compatibility level (BACKWARD unless configured otherwise); registrations of
//! one subject are serialised by an advisory lock, so two racing writers cannot both pass the
//! check against the same history.

use apache_avro::Schema;
use sluice_schemas::registry::CompatibilityLevel;
use sqlx::{PgPool, Row};

use crate::{Error, Result};

/// Row in `registry_config` that holds the global level.
const GLOBAL: &str = "";

/// Which version of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    /// The newest (`latest` or `-1` in Confluent's API).
    Latest,
    /// A version number (from 1).
    Number(i32),
}

/// One registered version of a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectVersion {
    pub version: i32,
    pub id: i32,
    pub schema: String,
}

/// What is missing when a version is not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The subject has no versions at all.
    Subject,
    /// The subject exists, but not that version.
    Version,
}

/// How a registration went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The subject already had this schema: its id.
    Existing(i32),
    /// A new version was added: the schema's id.
    Registered(i32),
    /// The schema breaks the subject's compatibility level.
    Incompatible {
        level: CompatibilityLevel,
        problems: Vec<String>,
    },
}

/// Parses a stored schema text; one that no longer parses is corruption.
pub fn parse_stored(text: &str) -> Result<Schema> {
    Schema::parse_str(text)
        .map_err(|e| Error::Corrupt(format!("a stored schema no longer parses: {e}")))
}

/// Every subject with at least one live version, sorted.
pub async fn subjects(pool: &PgPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT subject FROM registry_subject_versions WHERE NOT deleted ORDER BY subject",
    )
    .fetch_all(pool)
    .await?)
}

/// The live versions of `subject`, oldest first (empty: no such subject).
pub async fn versions(pool: &PgPool, subject: &str) -> Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT version FROM registry_subject_versions WHERE subject = $1 AND NOT deleted ORDER BY version",
    )
    .bind(subject)
    .fetch_all(pool)
    .await?)
}

/// One version of `subject`, or what is missing.
pub async fn version(
    pool: &PgPool,
    subject: &str,
    which: VersionRef,
) -> Result<Result<SubjectVersion, Missing>> {
    let row =
        match which {
            VersionRef::Latest => sqlx::query(
                "SELECT v.version, v.schema_id, s.schema_text FROM registry_subject_versions v \
                 JOIN registry_schemas s ON s.id = v.schema_id \
                 WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version DESC LIMIT 1",
            )
            .bind(subject)
            .fetch_optional(pool)
            .await?,
            VersionRef::Number(number) => sqlx::query(
                "SELECT v.version, v.schema_id, s.schema_text FROM registry_subject_versions v \
                 JOIN registry_schemas s ON s.id = v.schema_id \
                 WHERE v.subject = $1 AND v.version = $2 AND NOT v.deleted",
            )
            .bind(subject)
            .bind(number)
            .fetch_optional(pool)
            .await?,
        };
    if let Some(row) = row {
        return Ok(Ok(SubjectVersion {
            version: row.try_get(0)?,
            id: row.try_get(1)?,
            schema: row.try_get(2)?,
        }));
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM registry_subject_versions WHERE subject = $1 AND NOT deleted)",
    )
    .bind(subject)
    .fetch_one(pool)
    .await?;
    Ok(Err(if exists {
        Missing::Version
    } else {
        Missing::Subject
    }))
}

/// The schema text with global id `id`.
pub async fn schema_by_id(pool: &PgPool, id: i64) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT schema_text FROM registry_schemas WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Every (subject, version) that uses schema `id`.
pub async fn uses_of_schema(pool: &PgPool, id: i64) -> Result<Vec<(String, i32)>> {
    let rows = sqlx::query(
        "SELECT subject, version FROM registry_subject_versions WHERE schema_id = $1 AND NOT deleted ORDER BY subject, version",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// The (version, id) under which `subject` holds the schema `text` (normalized), if it does.
pub async fn find_in_subject(
    pool: &PgPool,
    subject: &str,
    text: &str,
) -> Result<Option<(i32, i32)>> {
    let row = sqlx::query(
        "SELECT v.version, v.schema_id FROM registry_subject_versions v \
         JOIN registry_schemas s ON s.id = v.schema_id \
         WHERE v.subject = $1 AND s.schema_text = $2 AND NOT v.deleted ORDER BY v.version LIMIT 1",
    )
    .bind(subject)
    .bind(text)
    .fetch_optional(pool)
    .await?;
    row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .transpose()
}

/// Every live schema of `subject`, oldest first, parsed.
pub async fn history(pool: &PgPool, subject: &str) -> Result<Vec<Schema>> {
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT s.schema_text FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id \
         WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
    )
    .bind(subject)
    .fetch_all(pool)
    .await?;
    texts.iter().map(|t| parse_stored(t)).collect()
}

/// The level in force for `subject`: its own, else the global one, else BACKWARD.
pub async fn compatibility<'e, E>(executor: E, subject: &str) -> Result<CompatibilityLevel>
where
    E: sqlx::PgExecutor<'e>,
{
    let level: Option<String> = sqlx::query_scalar(
        "SELECT compatibility FROM registry_config WHERE subject = $1 OR subject = $2 \
         ORDER BY (subject = $1) DESC LIMIT 1",
    )
    .bind(subject)
    .bind(GLOBAL)
    .fetch_optional(executor)
    .await?;
    Ok(level.and_then(|l| l.parse().ok()).unwrap_or_default())
}

/// The level configured for `subject` itself (`None`: the global level), if one is.
pub async fn configured_level(pool: &PgPool, subject: Option<&str>) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT compatibility FROM registry_config WHERE subject = $1")
            .bind(subject.unwrap_or(GLOBAL))
            .fetch_optional(pool)
            .await?,
    )
}

/// Sets the level of `subject` (`None`: the global level).
pub async fn set_level(
    pool: &PgPool,
    subject: Option<&str>,
    level: CompatibilityLevel,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2) \
         ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
    )
    .bind(subject.unwrap_or(GLOBAL))
    .bind(level.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Registers `schema` (whose normalized text is `text`) under `subject`, if the subject's
/// compatibility level allows it.
pub async fn register(
    pool: &PgPool,
    subject: &str,
    schema: &Schema,
    text: &str,
) -> Result<Registration> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice-registry:' || $1))")
        .bind(subject)
        .execute(&mut *tx)
        .await?;
    let existing = sqlx::query(
        "SELECT s.schema_text, v.schema_id FROM registry_subject_versions v \
         JOIN registry_schemas s ON s.id = v.schema_id \
         WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
    )
    .bind(subject)
    .fetch_all(&mut *tx)
    .await?;
    let mut history = Vec::with_capacity(existing.len());
    for row in &existing {
        let stored: String = row.try_get(0)?;
        if stored == text {
            return Ok(Registration::Existing(row.try_get(1)?));
        }
        history.push(parse_stored(&stored)?);
    }
    let level = compatibility(&mut *tx, subject).await?;
    let problems = level.check(schema, &history);
    if !problems.is_empty() {
        return Ok(Registration::Incompatible { level, problems });
    }
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO registry_schemas (schema_text) VALUES ($1) \
         ON CONFLICT (schema_text) DO UPDATE SET schema_text = EXCLUDED.schema_text RETURNING id",
    )
    .bind(text)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO registry_subject_versions (subject, version, schema_id) \
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM registry_subject_versions WHERE subject = $1",
    )
    .bind(subject)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%subject, id, "schema registered");
    Ok(Registration::Registered(id))
}
