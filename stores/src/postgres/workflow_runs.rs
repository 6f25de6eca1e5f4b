//! Workflow runs as callers see them (`workflow_runs`): status, last step and event, reply; and
//! the waits for external events, with the state each resumes from. The row's `seq` is the
//! latest event the run has written: the workflow stage checks it before running a step, so
//! an event read again after a crash or a rebalance, after its step's event was written, runs
//! nothing. Every query names the tenant.

use serde::Serialize;
use sqlx::{postgres::PgRow, types::Uuid, PgConnection, PgPool, Row};

use crate::Result;

/// A run as its caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunEntry {
    pub run_id: String,
    pub workflow: String,
    pub version: i32,
    pub status: String,
    pub step: Option<String>,
    pub seq: i32,
    pub reply: Option<String>,
    pub waiting_event: Option<String>,
    /// The wait's deadline (Unix milliseconds).
    pub wait_deadline_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// What a run is after its event `seq`.
#[derive(Clone, Copy)]
pub struct Status<'a> {
    pub run_id: &'a str,
    pub workflow: &'a str,
    pub version: i32,
    /// `running`, `ended`, `handed_off` or `failed` (waits are recorded by [`wait`]).
    pub status: &'a str,
    pub step: Option<&'a str>,
    pub seq: i32,
    pub reply: Option<&'a str>,
}

/// Records `status` for `tenant`'s run, unless its event's, or a later one's, is there already
/// (the first status written for an event stands); whether it was recorded.
pub async fn record(conn: &mut PgConnection, tenant: Uuid, status: &Status<'_>) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO workflow_runs (tenant_id, run_id, workflow, version, status, step, seq, reply) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tenant_id, run_id) DO UPDATE SET status = EXCLUDED.status, \
             step = EXCLUDED.step, seq = EXCLUDED.seq, reply = EXCLUDED.reply, \
             waiting_event = NULL, wait_deadline = NULL, state_json = NULL, \
             timeout_sent_at = NULL, updated_at = now() \
           WHERE workflow_runs.seq < EXCLUDED.seq",
    )
    .bind(tenant)
    .bind(status.run_id)
    .bind(status.workflow)
    .bind(status.version)
    .bind(status.status)
    .bind(status.step)
    .bind(status.seq)
    .bind(status.reply)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Records that `tenant`'s run waits, from its event `status.seq`, for `event` until
/// `deadline_ms`, resuming from `state_json`, its events on `topic` (the same guard as
/// [`record`]).
pub async fn wait(
    conn: &mut PgConnection,
    tenant: Uuid,
    status: &Status<'_>,
    (event, deadline_ms, state_json, topic): (&str, i64, &str, &str),
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO workflow_runs (tenant_id, run_id, workflow, version, status, step, seq, \
                waiting_event, wait_deadline, state_json, events_topic) \
         VALUES ($1, $2, $3, $4, 'waiting', $5, $6, $7, to_timestamp($8::bigint / 1000.0), $9, $10) \
         ON CONFLICT (tenant_id, run_id) DO UPDATE SET status = 'waiting', step = EXCLUDED.step, \
             seq = EXCLUDED.seq, reply = NULL, waiting_event = EXCLUDED.waiting_event, \
             wait_deadline = EXCLUDED.wait_deadline, state_json = EXCLUDED.state_json, \
             events_topic = EXCLUDED.events_topic, timeout_sent_at = NULL, updated_at = now() \
           WHERE workflow_runs.seq < EXCLUDED.seq",
    )
    .bind(tenant)
    .bind(status.run_id)
    .bind(status.workflow)
    .bind(status.version)
    .bind(status.step)
    .bind(status.seq)
    .bind(event)
    .bind(deadline_ms)
    .bind(state_json)
    .bind(topic)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The latest event `tenant`'s run has recorded, if any.
pub async fn recorded_seq(
    conn: &mut PgConnection,
    tenant: Uuid,
    run_id: &str,
) -> Result<Option<i32>> {
    Ok(
        sqlx::query_scalar("SELECT seq FROM workflow_runs WHERE tenant_id = $1 AND run_id = $2")
            .bind(tenant)
            .bind(run_id)
            .fetch_optional(conn)
            .await?,
    )
}

/// A waiting run: the step it waits at, the sequence number of its waiting event, the event it
/// waits for, and the state to resume from.
pub struct Waiting {
    pub workflow: String,
    pub version: i32,
    pub step: String,
    pub seq: i32,
    pub event: String,
    pub deadline_ms: i64,
    /// Whether its deadline has passed (by the database's clock, as the sweep judges it).
    pub due: bool,
    pub state_json: String,
}

/// `tenant`'s run `run_id` if it is waiting.
pub async fn waiting(
    conn: &mut PgConnection,
    tenant: Uuid,
    run_id: &str,
) -> Result<Option<Waiting>> {
    let row = sqlx::query(
        "SELECT workflow, version, step, seq, waiting_event, \
                (extract(epoch FROM wait_deadline) * 1000)::bigint, state_json, \
                wait_deadline <= now() \
           FROM workflow_runs \
          WHERE tenant_id = $1 AND run_id = $2 AND status = 'waiting'",
    )
    .bind(tenant)
    .bind(run_id)
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(Waiting {
            workflow: row.try_get(0)?,
            version: row.try_get(1)?,
            step: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            seq: row.try_get(3)?,
            event: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
            deadline_ms: row.try_get::<Option<i64>, _>(5)?.unwrap_or_default(),
            state_json: row.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
            due: row.try_get::<Option<bool>, _>(7)?.unwrap_or(false),
        })
    })
    .transpose()
}

const ENTRY: &str = "SELECT run_id, workflow, version, status, step, seq, reply, waiting_event, \
                            (extract(epoch FROM wait_deadline) * 1000)::bigint, \
                            (extract(epoch FROM updated_at) * 1000)::bigint \
                       FROM workflow_runs WHERE tenant_id = $1";

fn entry(row: &PgRow) -> Result<RunEntry> {
    Ok(RunEntry {
        run_id: row.try_get(0)?,
        workflow: row.try_get(1)?,
        version: row.try_get(2)?,
        status: row.try_get(3)?,
        step: row.try_get(4)?,
        seq: row.try_get(5)?,
        reply: row.try_get(6)?,
        waiting_event: row.try_get(7)?,
        wait_deadline_ms: row.try_get(8)?,
        updated_at_ms: row.try_get(9)?,
    })
}

/// `tenant`'s run `run_id`.
pub async fn find(conn: &mut PgConnection, tenant: Uuid, run_id: &str) -> Result<Option<RunEntry>> {
    let row = sqlx::query(&format!("{ENTRY} AND run_id = $2"))
        .bind(tenant)
        .bind(run_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(entry).transpose()
}

/// `tenant`'s runs, newest first, for its export.
pub async fn export(conn: &mut PgConnection, tenant: Uuid) -> Result<Vec<RunEntry>> {
    let rows = sqlx::query(&format!("{ENTRY} ORDER BY created_at DESC, run_id"))
        .bind(tenant)
        .fetch_all(conn)
        .await?;
    rows.iter().map(entry).collect()
}

/// Claims runs past their wait's deadline whose events are on `topic`, across tenants, each at
/// most once every `again_s` seconds: `(tenant, run, the sequence number of its waiting event)`.
pub async fn due(
    app: &PgPool,
    limit: i32,
    again_s: i32,
    topic: &str,
) -> Result<Vec<(Uuid, String, i32)>> {
    let rows = sqlx::query_as::<_, (Uuid, String, i32)>(
        "SELECT tenant_id, run_id, seq FROM sluice_due_waits($1, $2, $3)",
    )
    .bind(limit)
    .bind(again_s)
    .bind(topic)
    .fetch_all(app)
    .await?;
    Ok(rows)
}

/// Records `tenant`'s run as failed at its event `status.seq` with the reason as its reply,
/// whatever it was doing: it cannot go on (its definition no longer loads, its state does not
/// read). The same guard as [`record`]: a later event's status stands.
pub async fn fail(conn: &mut PgConnection, tenant: Uuid, status: &Status<'_>) -> Result<bool> {
    record(
        conn,
        tenant,
        &Status {
            status: "failed",
            ..*status
        },
    )
    .await
}
