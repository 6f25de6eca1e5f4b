//! Workflow runs at the edge: a run's status (`GET /v1/workflows/runs/{run}`) and the external
//! events a waiting run waits for (`POST /v1/workflows/runs/{run}/events`), put on
//! `sluice.workflow-events` for the workflow stage to resume it.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_pipelines::{now_ms, trace::TraceContext};
use sluice_schemas::WorkflowEvent;
use sluice_stores::postgres::{tenant_transaction, workflow_runs};
use utoipa::ToSchema;

use crate::{auth::Caller, control::parse, error::ApiError, EdgeState};

/// An external event for a waiting run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalForm {
    /// The event's name: the one the run's `wait` step waits for.
    pub event: String,
    /// Its data: the wait step's answer (`${steps.<id>…}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

fn unavailable(e: sluice_stores::Error) -> ApiError {
    ApiError::unavailable(format!("Sluice cannot read workflow runs right now: {e}"))
}

fn not_found(run: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "run_not_found",
        format!("There is no workflow run {run}."),
    )
}

async fn find(
    state: &EdgeState,
    caller: &Caller,
    run: &str,
) -> Result<workflow_runs::RunEntry, ApiError> {
    let tenant = caller.tenant.0;
    let mut tx = tenant_transaction(&state.app_pool, tenant)
        .await
        .map_err(unavailable)?;
    let found = workflow_runs::find(&mut tx, tenant, run)
        .await
        .map_err(unavailable)?;
    tx.commit()
        .await
        .map_err(|e| unavailable(sluice_stores::Error::from(e)))?;
    // A key limited to some models sees only the runs of the workflows its list names.
    found
        .filter(|entry| {
            caller.grant.allows(&format!(
                "{}{}",
                crate::openai::WORKFLOW_PREFIX,
                entry.workflow
            ))
        })
        .ok_or_else(|| not_found(run))
}

/// `GET /v1/workflows/runs/{run}`: a run of the caller's tenant: its status (`running`,
/// `waiting`, `ended`, `handed_off`, `failed`), last step and, once ended, its reply.
#[utoipa::path(get, path = "/v1/workflows/runs/{run}", tag = "workflows", security(("bearer" = [])),
    params(("run" = String, Path, description = "The run's id: the id of the chat completion that started it")),
    responses((status = 200, description = "`{\"object\": \"workflow.run\", \"run_id\", \"workflow\", \"version\", \"status\", \"step\", \"seq\", \"reply\", \"waiting_event\", \"wait_deadline_ms\", \"updated_at_ms\"}`", body = Object), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 404, description = "No such run (or another tenant's)", body = crate::api_doc::ErrorBody), (status = 503, description = "PostgreSQL is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn show(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    Path(run): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = find(&state, &caller, &run).await?;
    let mut body = serde_json::to_value(&entry).unwrap_or(Value::Null);
    body["object"] = json!("workflow.run");
    Ok(Json(body))
}

/// `POST /v1/workflows/runs/{run}/events`: the event a waiting run waits for; the run goes on
/// with its data as the wait step's answer.
#[utoipa::path(post, path = "/v1/workflows/runs/{run}/events", tag = "workflows", security(("bearer" = [])),
    params(("run" = String, Path, description = "The run's id")),
    request_body = SignalForm,
    responses((status = 202, description = "`{\"object\": \"workflow.event\", \"run_id\", \"event\"}`: the run resumes", body = Object), (status = 400, description = "Invalid event", body = crate::api_doc::ErrorBody), (status = 401, description = "No or wrong key or token", body = crate::api_doc::ErrorBody), (status = 404, description = "No such run (or another tenant's)", body = crate::api_doc::ErrorBody), (status = 409, description = "The run is not waiting for this event", body = crate::api_doc::ErrorBody), (status = 503, description = "PostgreSQL or the broker is unavailable", body = crate::api_doc::ErrorBody)))]
pub async fn signal(
    State(state): State<Arc<EdgeState>>,
    caller: Caller,
    Path(run): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let form: SignalForm = parse(&body)?;
    let entry = find(&state, &caller, &run).await?;
    if entry.status != "waiting" || entry.waiting_event.as_deref() != Some(form.event.as_str()) {
        let now = match (entry.status.as_str(), &entry.waiting_event) {
            ("waiting", Some(event)) => format!("it waits for {event}"),
            (status, _) => format!("it is {status}"),
        };
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_not_waiting",
            format!(
                "Run {run} is not waiting for the event {}: {now}.",
                form.event
            ),
        )
        .with_param("event"));
    }
    let record = WorkflowEvent {
        run_id: run.clone(),
        seq: 0,
        tenant_id: caller.tenant.0.to_string(),
        workflow: entry.workflow,
        version: entry.version,
        kind: "signal".into(),
        step: None,
        // The wait it answers: a signal sent again resumes no later wait of the run.
        detail_json: Some(
            json!({ "event": form.event, "data": form.data, "seq": entry.seq }).to_string(),
        ),
        next_step: None,
        state_json: "{}".into(),
        occurred_at_ms: now_ms(),
        trace_id: None,
    };
    let mut out = sluice_pipelines::Emitter::new(
        state.producer.clone(),
        state.codec.clone(),
        TraceContext::new_root(),
    );
    let sent = match out
        .emit(&state.topics.workflow_events, None, run.as_bytes(), &record)
        .await
    {
        Ok(()) => out.flush().await.map(|_| ()),
        Err(e) => Err(e),
    };
    sent.map_err(|e| {
        ApiError::unavailable(format!("Sluice could not accept the event right now: {e}"))
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "object": "workflow.event", "run_id": run, "event": form.event })),
    ))
}
