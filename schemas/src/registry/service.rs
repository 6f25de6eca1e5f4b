//! The registry's REST service: the subset of Confluent's API that serializers, deserializers
//! and `schema_registry_converter` use, stored in PostgreSQL (tables `registry_schemas`,
//! `registry_subject_versions`, `registry_config`, created by Sluice's migrations).
//!
//! Schema ids are global: the same schema registered under two subjects gets one id, and
//! registering a schema a subject already has returns the existing id. New versions must pass
//! the subject's compatibility level (BACKWARD unless configured otherwise).

use apache_avro::Schema;
use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use super::CompatibilityLevel;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// Row in `registry_config` that holds the global level.
const GLOBAL: &str = "";

/// A registry error, answered in Confluent's shape: `{"error_code": .., "message": ..}`.
#[derive(Debug)]
pub struct RegistryError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl RegistryError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn subject_not_found(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        )
    }
    fn version_not_found(version: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        )
    }
    fn schema_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, 40403, "Schema not found")
    }
    fn invalid_schema(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, 42201, message)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, 422, message)
    }
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "schema registry store failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "Error in the backend data store",
        )
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        registry_json(
            self.status,
            json!({ "error_code": self.code, "message": self.message }),
        )
    }
}

fn registry_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Result<Response, RegistryError> {
    Ok(registry_json(StatusCode::OK, body))
}

type Reply = Result<Response, RegistryError>;

/// The registry's routes, ready to serve.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { registry_json(StatusCode::OK, json!({})) }),
        )
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup_schema))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route("/schemas/ids/{id}", get(get_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(get_schema_versions))
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_compatibility),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config).put(put_subject_config),
        )
        .with_state(pool)
}

/// The body of a register, lookup or compatibility request.
#[derive(Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

/// A parsed candidate schema with the normalized text it is stored as.
struct Candidate {
    schema: Schema,
    text: String,
}

fn parse_candidate(body: &Bytes) -> Result<Candidate, RegistryError> {
    let request: SchemaRequest = serde_json::from_slice(body)
        .map_err(|e| RegistryError::bad_request(format!("Invalid request body: {e}")))?;
    if let Some(kind) = request.schema_type.as_deref() {
        if !kind.eq_ignore_ascii_case("AVRO") {
            return Err(RegistryError::invalid_schema(format!(
                "Schema type {kind} is not supported; this registry stores AVRO"
            )));
        }
    }
    if !request.references.is_empty() {
        return Err(RegistryError::invalid_schema(
            "Schema references are not supported; inline the referenced types",
        ));
    }
    let json: Value = serde_json::from_str(&request.schema)
        .map_err(|e| RegistryError::invalid_schema(format!("Invalid schema: {e}")))?;
    let schema = Schema::parse(&json)
        .map_err(|e| RegistryError::invalid_schema(format!("Invalid schema: {e}")))?;
    Ok(Candidate {
        schema,
        text: json.to_string(),
    })
}

fn parse_stored(text: &str) -> Result<Schema, RegistryError> {
    Schema::parse_str(text).map_err(|e| {
        tracing::error!(error = %e, "stored schema no longer parses");
        RegistryError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "stored schema does not parse",
        )
    })
}

async fn list_subjects(State(pool): State<PgPool>) -> Reply {
    let subjects: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT subject FROM registry_subject_versions WHERE NOT deleted ORDER BY subject",
    )
    .fetch_all(&pool)
    .await?;
    ok(json!(subjects))
}

async fn list_versions(State(pool): State<PgPool>, Path(subject): Path<String>) -> Reply {
    let versions: Vec<i32> = sqlx::query_scalar(
        "SELECT version FROM registry_subject_versions WHERE subject = $1 AND NOT deleted ORDER BY version",
    )
    .bind(&subject)
    .fetch_all(&pool)
    .await?;
    if versions.is_empty() {
        return Err(RegistryError::subject_not_found(&subject));
    }
    ok(json!(versions))
}

/// One registered version of a subject.
struct VersionRow {
    version: i32,
    id: i32,
    schema: String,
}

async fn fetch_version(
    pool: &PgPool,
    subject: &str,
    version: &str,
) -> Result<VersionRow, RegistryError> {
    let row = if version == "latest" || version == "-1" {
        sqlx::query(
            "SELECT v.version, v.schema_id, s.schema_text FROM registry_subject_versions v \
             JOIN registry_schemas s ON s.id = v.schema_id \
             WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version DESC LIMIT 1",
        )
        .bind(subject)
        .fetch_optional(pool)
        .await?
    } else {
        let number: i32 = version
            .parse()
            .ok()
            .filter(|n: &i32| *n > 0)
            .ok_or_else(|| {
                RegistryError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    42202,
                    format!("The specified version '{version}' is not a valid version id."),
                )
            })?;
        sqlx::query(
            "SELECT v.version, v.schema_id, s.schema_text FROM registry_subject_versions v \
             JOIN registry_schemas s ON s.id = v.schema_id \
             WHERE v.subject = $1 AND v.version = $2 AND NOT v.deleted",
        )
        .bind(subject)
        .bind(number)
        .fetch_optional(pool)
        .await?
    };
    match row {
        Some(row) => Ok(VersionRow {
            version: row.try_get(0)?,
            id: row.try_get(1)?,
            schema: row.try_get(2)?,
        }),
        None => {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM registry_subject_versions WHERE subject = $1 AND NOT deleted)",
            )
            .bind(subject)
            .fetch_one(pool)
            .await?;
            Err(if exists {
                RegistryError::version_not_found(version)
            } else {
                RegistryError::subject_not_found(subject)
            })
        }
    }
}

async fn get_version(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
) -> Reply {
    let row = fetch_version(&pool, &subject, &version).await?;
    ok(json!({ "subject": subject, "version": row.version, "id": row.id, "schema": row.schema }))
}

async fn get_version_schema(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
) -> Reply {
    let row = fetch_version(&pool, &subject, &version).await?;
    Ok(registry_json(
        StatusCode::OK,
        serde_json::from_str(&row.schema).unwrap_or(Value::String(row.schema)),
    ))
}

async fn get_schema_by_id(State(pool): State<PgPool>, Path(id): Path<i64>) -> Reply {
    let text: Option<String> =
        sqlx::query_scalar("SELECT schema_text FROM registry_schemas WHERE id = $1")
            .bind(id)
            .fetch_optional(&pool)
            .await?;
    match text {
        Some(schema) => ok(json!({ "schema": schema })),
        None => Err(RegistryError::schema_not_found()),
    }
}

async fn get_schema_versions(State(pool): State<PgPool>, Path(id): Path<i64>) -> Reply {
    let rows = sqlx::query(
        "SELECT subject, version FROM registry_subject_versions WHERE schema_id = $1 AND NOT deleted ORDER BY subject, version",
    )
    .bind(id)
    .fetch_all(&pool)
    .await?;
    if rows.is_empty() {
        return Err(RegistryError::schema_not_found());
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let subject: String = row.try_get(0)?;
        let version: i32 = row.try_get(1)?;
        out.push(json!({ "subject": subject, "version": version }));
    }
    ok(Value::Array(out))
}

async fn lookup_schema(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Reply {
    let candidate = parse_candidate(&body)?;
    let row = sqlx::query(
        "SELECT v.version, v.schema_id FROM registry_subject_versions v \
         JOIN registry_schemas s ON s.id = v.schema_id \
         WHERE v.subject = $1 AND s.schema_text = $2 AND NOT v.deleted ORDER BY v.version LIMIT 1",
    )
    .bind(&subject)
    .bind(&candidate.text)
    .fetch_optional(&pool)
    .await?;
    match row {
        Some(row) => {
            let version: i32 = row.try_get(0)?;
            let id: i32 = row.try_get(1)?;
            ok(
                json!({ "subject": subject, "version": version, "id": id, "schema": candidate.text }),
            )
        }
        None => Err(RegistryError::schema_not_found()),
    }
}

async fn compatibility_level<'e, E>(
    executor: E,
    subject: &str,
) -> Result<CompatibilityLevel, RegistryError>
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

async fn register(State(pool): State<PgPool>, Path(subject): Path<String>, body: Bytes) -> Reply {
    let candidate = parse_candidate(&body)?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice-registry:' || $1))")
        .bind(&subject)
        .execute(&mut *tx)
        .await?;
    let existing = sqlx::query(
        "SELECT s.schema_text, v.schema_id FROM registry_subject_versions v \
         JOIN registry_schemas s ON s.id = v.schema_id \
         WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
    )
    .bind(&subject)
    .fetch_all(&mut *tx)
    .await?;
    let mut history = Vec::with_capacity(existing.len());
    for row in &existing {
        let text: String = row.try_get(0)?;
        if text == candidate.text {
            let id: i32 = row.try_get(1)?;
            return ok(json!({ "id": id }));
        }
        history.push(parse_stored(&text)?);
    }
    let level = compatibility_level(&mut *tx, &subject).await?;
    let problems = level.check(&candidate.schema, &history);
    if !problems.is_empty() {
        return Err(RegistryError::new(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level}): {}",
                problems.join("; ")
            ),
        ));
    }
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO registry_schemas (schema_text) VALUES ($1) \
         ON CONFLICT (schema_text) DO UPDATE SET schema_text = EXCLUDED.schema_text RETURNING id",
    )
    .bind(&candidate.text)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO registry_subject_versions (subject, version, schema_id) \
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM registry_subject_versions WHERE subject = $1",
    )
    .bind(&subject)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%subject, id, "schema registered");
    ok(json!({ "id": id }))
}

async fn check_compatibility(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    body: Bytes,
) -> Reply {
    let candidate = parse_candidate(&body)?;
    let level = compatibility_level(&pool, &subject).await?;
    let against = if level.is_transitive() && (version == "latest" || version == "-1") {
        let texts: Vec<String> = sqlx::query_scalar(
            "SELECT s.schema_text FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id \
             WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
        )
        .bind(&subject)
        .fetch_all(&pool)
        .await?;
        if texts.is_empty() {
            return Err(RegistryError::subject_not_found(&subject));
        }
        texts
            .iter()
            .map(|t| parse_stored(t))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![parse_stored(
            &fetch_version(&pool, &subject, &version).await?.schema,
        )?]
    };
    let problems = level.check(&candidate.schema, &against);
    ok(json!({ "is_compatible": problems.is_empty(), "messages": problems }))
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: String,
}

async fn read_config(pool: &PgPool, subject: &str) -> Result<Option<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("SELECT compatibility FROM registry_config WHERE subject = $1")
            .bind(subject)
            .fetch_optional(pool)
            .await?,
    )
}

async fn write_config(pool: &PgPool, subject: &str, body: &Bytes) -> Reply {
    let request: ConfigRequest = serde_json::from_slice(body)
        .map_err(|e| RegistryError::bad_request(format!("Invalid request body: {e}")))?;
    let level: CompatibilityLevel = request
        .compatibility
        .parse()
        .map_err(|e: String| RegistryError::new(StatusCode::UNPROCESSABLE_ENTITY, 42203, e))?;
    sqlx::query(
        "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2) \
         ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
    )
    .bind(subject)
    .bind(level.as_str())
    .execute(pool)
    .await?;
    ok(json!({ "compatibility": level.as_str() }))
}

async fn get_global_config(State(pool): State<PgPool>) -> Reply {
    let level = read_config(&pool, GLOBAL)
        .await?
        .unwrap_or_else(|| CompatibilityLevel::default().as_str().to_owned());
    ok(json!({ "compatibilityLevel": level }))
}

async fn put_global_config(State(pool): State<PgPool>, body: Bytes) -> Reply {
    write_config(&pool, GLOBAL, &body).await
}

async fn get_subject_config(State(pool): State<PgPool>, Path(subject): Path<String>) -> Reply {
    match read_config(&pool, &subject).await? {
        Some(level) => ok(json!({ "compatibilityLevel": level })),
        None => Err(RegistryError::new(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )),
    }
}

async fn put_subject_config(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Reply {
    if subject.is_empty() {
        return Err(RegistryError::bad_request("subject must not be empty"));
    }
    write_config(&pool, &subject, &body).await
}
