//! The schema registry's REST service: the subset of Confluent's API that serializers,
//! deserializers and `schema_registry_converter` use, over the registry's storage in
//! PostgreSQL (`sluice_stores::postgres::registry`). Served on its own listener by `sluice
//! registry` and `sluice up`; errors come in Confluent's shape, `{"error_code", "message"}`.

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
use sluice_schemas::registry::CompatibilityLevel;
use sluice_stores::postgres::registry::{self as store, Missing, Registration, VersionRef};
use sqlx::PgPool;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

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
    fn missing(missing: Missing, subject: &str, version: &str) -> Self {
        match missing {
            Missing::Subject => Self::subject_not_found(subject),
            Missing::Version => Self::version_not_found(version),
        }
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

impl From<sluice_stores::Error> for RegistryError {
    fn from(e: sluice_stores::Error) -> Self {
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

/// `latest`, `-1` or a version number from 1.
fn version_ref(version: &str) -> Result<VersionRef, RegistryError> {
    if version == "latest" || version == "-1" {
        return Ok(VersionRef::Latest);
    }
    version
        .parse()
        .ok()
        .filter(|n: &i32| *n > 0)
        .map(VersionRef::Number)
        .ok_or_else(|| {
            RegistryError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                format!("The specified version '{version}' is not a valid version id."),
            )
        })
}

async fn fetch_version(
    pool: &PgPool,
    subject: &str,
    version: &str,
) -> Result<store::SubjectVersion, RegistryError> {
    store::version(pool, subject, version_ref(version)?)
        .await?
        .map_err(|missing| RegistryError::missing(missing, subject, version))
}

async fn list_subjects(State(pool): State<PgPool>) -> Reply {
    ok(json!(store::subjects(&pool).await?))
}

async fn list_versions(State(pool): State<PgPool>, Path(subject): Path<String>) -> Reply {
    let versions = store::versions(&pool, &subject).await?;
    if versions.is_empty() {
        return Err(RegistryError::subject_not_found(&subject));
    }
    ok(json!(versions))
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
    match store::schema_by_id(&pool, id).await? {
        Some(schema) => ok(json!({ "schema": schema })),
        None => Err(RegistryError::schema_not_found()),
    }
}

async fn get_schema_versions(State(pool): State<PgPool>, Path(id): Path<i64>) -> Reply {
    let uses = store::uses_of_schema(&pool, id).await?;
    if uses.is_empty() {
        return Err(RegistryError::schema_not_found());
    }
    let out: Vec<Value> = uses
        .into_iter()
        .map(|(subject, version)| json!({ "subject": subject, "version": version }))
        .collect();
    ok(Value::Array(out))
}

async fn lookup_schema(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Reply {
    let candidate = parse_candidate(&body)?;
    match store::find_in_subject(&pool, &subject, &candidate.text).await? {
        Some((version, id)) => ok(
            json!({ "subject": subject, "version": version, "id": id, "schema": candidate.text }),
        ),
        None => Err(RegistryError::schema_not_found()),
    }
}

async fn register(State(pool): State<PgPool>, Path(subject): Path<String>, body: Bytes) -> Reply {
    let candidate = parse_candidate(&body)?;
    match store::register(&pool, &subject, &candidate.schema, &candidate.text).await? {
        Registration::Existing(id) | Registration::Registered(id) => ok(json!({ "id": id })),
        Registration::Incompatible { level, problems } => Err(RegistryError::new(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level}): {}",
                problems.join("; ")
            ),
        )),
    }
}

async fn check_compatibility(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    body: Bytes,
) -> Reply {
    let candidate = parse_candidate(&body)?;
    let level = store::compatibility(&pool, &subject).await?;
    let which = version_ref(&version)?;
    let against = if level.is_transitive() && which == VersionRef::Latest {
        let history = store::history(&pool, &subject).await?;
        if history.is_empty() {
            return Err(RegistryError::subject_not_found(&subject));
        }
        history
    } else {
        let row = fetch_version(&pool, &subject, &version).await?;
        vec![store::parse_stored(&row.schema)?]
    };
    let problems = level.check(&candidate.schema, &against);
    ok(json!({ "is_compatible": problems.is_empty(), "messages": problems }))
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: String,
}

async fn write_config(pool: &PgPool, subject: Option<&str>, body: &Bytes) -> Reply {
    let request: ConfigRequest = serde_json::from_slice(body)
        .map_err(|e| RegistryError::bad_request(format!("Invalid request body: {e}")))?;
    let level: CompatibilityLevel = request
        .compatibility
        .parse()
        .map_err(|e: String| RegistryError::new(StatusCode::UNPROCESSABLE_ENTITY, 42203, e))?;
    store::set_level(pool, subject, level).await?;
    ok(json!({ "compatibility": level.as_str() }))
}

async fn get_global_config(State(pool): State<PgPool>) -> Reply {
    let level = store::configured_level(&pool, None)
        .await?
        .unwrap_or_else(|| CompatibilityLevel::default().as_str().to_owned());
    ok(json!({ "compatibilityLevel": level }))
}

async fn put_global_config(State(pool): State<PgPool>, body: Bytes) -> Reply {
    write_config(&pool, None, &body).await
}

async fn get_subject_config(State(pool): State<PgPool>, Path(subject): Path<String>) -> Reply {
    match store::configured_level(&pool, Some(&subject)).await? {
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
    write_config(&pool, Some(&subject), &body).await
}
