//! The workflow engine: runs a definition one step per event.
//!
//! A run starts when the orchestrator takes a request for `workflow/<name>` off `sluice.routed`:
//! it fixes the definition's version, checks the inputs, and writes the run's `started` event
//! ([`start`]). The workflow stage reads `sluice.workflow-events`; for each event that leads to a
//! step it runs that step — a tool call, a model call, a branch, a parallel fan-out, a hand-off,
//! an end — and writes the next event, which carries the run's whole state after it
//! ([`RunState`]). So a run is resumed from its latest event alone, and every transition is a
//! record.
//!
//! # Exactly once
//! An event's offset is committed only once the event it leads to is acknowledged and the
//! run's status row in PostgreSQL (`workflow_runs`) names that event. Before running a step the
//! stage checks that row (and its own memory of the runs it wrote lately): an event whose next
//! one is recorded already runs nothing, whoever reads it — this process again, or another after
//! a crash or rebalance. A step cut short between its event and its status (a crash) runs
//! again: a tool call with the same idempotency key (`<run>:<step>`; built-in writes and HTTP
//! tools honour it), a model call whose usage event has the same id (`<run>:<step>`, counted
//! once by the meters), a reply chunk with the same sequence number (dropped by the edge); the
//! first event recorded for a sequence number is the one the run follows. A retry of the record
//! after a failed status write writes only the status, never runs the step again.
//!
//! # Sagas
//! A step that fails writes `step_failed` first; the steps with a `compensate` the run has
//! completed are then undone in reverse order (`compensated`), each compensation once per run
//! (its key is `<run>:<step>:undo`), and the run goes to the failed step's `on_error` or fails.
//! A crash between the two events undoes again with the same keys; a run never ends half-done
//! without an event that says so.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use sluice_pipelines::{
    metrics::Metrics, now_ms, Emitter, ProcessError, RecordContext, RecordOperator, Topics,
};
use sluice_schemas::{
    tokens, ChatMessage, ChatRequest, ReplyAddress, ReplyChunk, ReplyKind, ResponseFormat,
    RoutedRequest, ToolInvocation, ToolOutcome, UsageEvent, WorkflowEvent,
};
use sluice_stores::{
    postgres::{flags::Flags, tenant_transaction, workflow_runs},
    ModelCatalog,
};
use sqlx::{types::Uuid, PgPool};

use super::{
    definition::{Step, StepKind, Workflow},
    run::{Caller, RunState, MAX_STATE_BYTES},
};
use crate::{
    providers::ProviderEvent,
    tools::{BuiltinTools, HttpTool, HttpToolConfig, Reach, Resilience, ToolError},
    Orchestrator,
};

/// The provider name of a routing decision that starts a workflow run.
pub const PROVIDER: &str = sluice_router::WORKFLOW_PROVIDER;

/// What a model name for a workflow starts with.
pub const MODEL_PREFIX: &str = sluice_router::WORKFLOW_PREFIX;

/// How long the latest event this process wrote for a run is remembered after the run was
/// last heard of (past it, PostgreSQL's record of the run answers).
const REMEMBER_QUIET: Duration = Duration::from_secs(600);
/// How often runs not heard of for a while are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// The largest answer of one step the run keeps (every later event carries it).
pub const MAX_ANSWER_BYTES: usize = 128 * 1024;
/// The most of a tool's answer its result record carries.
const MAX_RESULT_RECORD_BYTES: usize = 64 * 1024;

/// Definitions by (tenant, name, version), read from the registry once each: versions never
/// change once published.
pub struct Definitions {
    app: PgPool,
    cache: Mutex<HashMap<(Uuid, String, i32), Arc<Workflow>>>,
}

impl Definitions {
    pub fn new(app: PgPool) -> Self {
        Self {
            app,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The definition of `name` that `tenant` runs, at `version` (`None`: the latest); `None`
    /// if there is none. A stored definition that no longer loads (a newer build's checks) is
    /// an error naming it.
    pub async fn get(
        &self,
        tenant: Uuid,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<Arc<Workflow>>, sluice_stores::Error> {
        if let Some(v) = version {
            if let Some(found) = self.cached(tenant, name, v) {
                return Ok(Some(found));
            }
        }
        let mut tx = tenant_transaction(&self.app, tenant).await?;
        let found =
            sluice_stores::postgres::workflows::definition(&mut tx, tenant, name, version).await?;
        tx.commit().await?;
        let Some((version, text)) = found else {
            return Ok(None);
        };
        let workflow = super::load(&format!("{name}.yaml"), &text).map_err(|errors| {
            let first = errors.first().map(ToString::to_string).unwrap_or_default();
            sluice_stores::Error::Invalid(format!("stored workflow {name} v{version}: {first}"))
        })?;
        let workflow = Arc::new(workflow);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert((tenant, name.to_owned(), version), workflow.clone());
        }
        Ok(Some(workflow))
    }

    /// The name of the workflow `tenant` runs for `intent`, if it has one on.
    pub async fn for_intent(
        &self,
        tenant: Uuid,
        intent: &str,
    ) -> Result<Option<String>, sluice_stores::Error> {
        let mut tx = tenant_transaction(&self.app, tenant).await?;
        let found = sluice_stores::postgres::workflows::for_intent(&mut tx, tenant, intent).await?;
        tx.commit().await?;
        Ok(found.map(|entry| entry.name))
    }

    fn cached(&self, tenant: Uuid, name: &str, version: i32) -> Option<Arc<Workflow>> {
        self.cache
            .lock()
            .ok()?
            .get(&(tenant, name.to_owned(), version))
            .cloned()
    }
}

/// Why a run cannot start: the HTTP status, code and message the caller gets, and the
/// parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRefusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl StartRefusal {
    fn invalid(message: String, param: Option<String>) -> Self {
        Self {
            status: 400,
            code: "invalid_request_error",
            message,
            param,
        }
    }
}

/// The `started` event of the run `routed` asks for, following `workflow`: the inputs checked
/// against the ones it declares.
pub fn start(
    routed: &RoutedRequest,
    workflow: &Workflow,
    trace_id: String,
) -> Result<WorkflowEvent, StartRefusal> {
    let request = &routed.request;
    let inputs: Map<String, Value> = match request.workflow_inputs_json.as_deref() {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(inputs)) => inputs,
            _ => {
                return Err(StartRefusal::invalid(
                    "`inputs` must be a JSON object.".into(),
                    Some("inputs".into()),
                ))
            }
        },
    };
    for name in inputs.keys() {
        if !workflow.inputs.iter().any(|i| &i.name == name) {
            let known: Vec<&str> = workflow.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(StartRefusal::invalid(
                format!(
                    "Workflow {} takes no input `{name}` (it takes: {}).",
                    workflow.name,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                Some(format!("inputs.{name}")),
            ));
        }
    }
    for input in &workflow.inputs {
        match inputs.get(&input.name) {
            None | Some(Value::Null) if input.required => {
                return Err(StartRefusal::invalid(
                    format!(
                        "Workflow {} needs the input `{}`.",
                        workflow.name, input.name
                    ),
                    Some(format!("inputs.{}", input.name)),
                ))
            }
            Some(value)
                if !value.is_null() && !super::definition::value_of_type(value, input.kind) =>
            {
                return Err(StartRefusal::invalid(
                    format!(
                        "The input `{}` of workflow {} must be of type {}.",
                        input.name,
                        workflow.name,
                        input.kind.name()
                    ),
                    Some(format!("inputs.{}", input.name)),
                ))
            }
            _ => {}
        }
    }
    let Some(first) = workflow.steps.first() else {
        return Err(StartRefusal::invalid(
            format!("Workflow {} has no steps.", workflow.name),
            Some("model".into()),
        ));
    };
    let message = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let state = RunState {
        run_id: request.request_id.clone(),
        tenant_id: request.tenant_id.clone(),
        workflow: workflow.name.clone(),
        version: i32::try_from(workflow.version).unwrap_or(i32::MAX),
        caller: Caller {
            session_id: request.session_id.clone(),
            key_id: request.key_id.clone(),
            user_id: request.user_id.clone(),
            stream: request.stream,
            reply_topic: request.reply_to.topic.clone(),
            reply_partition: request.reply_to.partition,
            received_at_ms: request.received_at_ms,
            allowed_models: request.allowed_models.clone(),
        },
        message,
        inputs,
        ..RunState::default()
    };
    let state_json = serde_json::to_string(&state).map_err(|e| {
        StartRefusal::invalid(format!("the run's state cannot be written: {e}"), None)
    })?;
    if state_json.len() > MAX_STATE_BYTES {
        return Err(StartRefusal::invalid(
            format!("The message and inputs take more than {MAX_STATE_BYTES} bytes."),
            Some("inputs".into()),
        ));
    }
    Ok(WorkflowEvent {
        run_id: state.run_id.clone(),
        seq: 0,
        tenant_id: state.tenant_id.clone(),
        workflow: state.workflow.clone(),
        version: state.version,
        kind: "started".into(),
        step: None,
        detail_json: None,
        next_step: Some(first.id.clone()),
        state_json,
        occurred_at_ms: now_ms(),
        trace_id: Some(trace_id),
    })
}

/// What a step did: the event it leads to.
struct Transition {
    kind: &'static str,
    step: String,
    detail: Value,
    next: Option<String>,
}

/// What a model step asks: the model (or `auto`), its texts, and the form of the answer.
struct ModelAsk<'a> {
    model: &'a str,
    system: Option<&'a str>,
    prompt: &'a str,
    format: Option<ResponseFormat>,
}

/// What a tool or model step answered, or why it failed.
type Acted = Result<Value, String>;

/// Records a step's work puts on the topics besides its event.
#[derive(Default)]
struct Records {
    outcomes: Vec<ToolOutcome>,
    usage: Vec<UsageEvent>,
}

/// The workflow stage's operator: `sluice.workflow-events` → the next event, with tool calls,
/// tool results, usage and the run's reply on their topics.
pub struct WorkflowEngine {
    definitions: Arc<Definitions>,
    builtin: BuiltinTools,
    app: PgPool,
    resilience: Resilience,
    reach: Reach,
    models: Arc<Orchestrator>,
    catalog: Arc<ModelCatalog>,
    topics: Topics,
    metrics: Arc<Metrics>,
    /// `model.<name>` switches, and the router's settings: model steps are routed as the
    /// router routes requests.
    flags: Arc<Flags>,
    router: sluice_router::RouterConfig,
    /// What this process has written for each run lately.
    written: Mutex<Written>,
}

/// The latest event this process wrote for each run, and its status when PostgreSQL has not
/// taken it yet (a retry of the record then writes only that, never runs the step again).
#[derive(Default)]
struct Written {
    runs: HashMap<String, Latest>,
    pruned: Option<Instant>,
}

struct Latest {
    seq: i32,
    pending: Option<StatusWrite>,
    seen: Instant,
}

/// A run's status after an event, to write to PostgreSQL, and the reply that follows it (a
/// wait's, sent only once the row it points the caller to exists).
#[derive(Clone)]
struct StatusWrite {
    tenant: Uuid,
    run_id: String,
    workflow: String,
    version: i32,
    status: &'static str,
    step: Option<String>,
    seq: i32,
    reply: Option<String>,
    wait: Option<(String, i64, String)>,
    then: Option<(String, i32, ReplyChunk)>,
}

/// How model steps are called: routed as the router routes requests (the catalogue, the
/// `model.<name>` switches, the router's settings), through the orchestrator's providers.
pub struct ModelSteps {
    pub providers: Arc<Orchestrator>,
    pub catalog: Arc<ModelCatalog>,
    pub flags: Arc<Flags>,
    pub router: sluice_router::RouterConfig,
}

impl WorkflowEngine {
    pub fn new(
        definitions: Arc<Definitions>,
        app: PgPool,
        (resilience, reach): (Resilience, Reach),
        model_steps: ModelSteps,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ModelSteps {
            providers: models,
            catalog,
            flags,
            router,
        } = model_steps;
        Self {
            metrics,
            flags,
            router,
            definitions,
            builtin: BuiltinTools::new(app.clone()),
            app,
            resilience,
            reach,
            models,
            catalog,
            topics,
            written: Mutex::new(Written::default()),
        }
    }

    /// The latest event this process wrote for `run`, and its status if still to be written.
    fn latest(&self, run: &str) -> Option<(i32, Option<StatusWrite>)> {
        let written = self.written.lock().ok()?;
        written
            .runs
            .get(run)
            .map(|latest| (latest.seq, latest.pending.clone()))
    }

    /// Remembers that this process wrote event `seq` of `run`, with its status `pending` until
    /// it is in PostgreSQL; now and then forgets runs not heard of for a while.
    fn remember(&self, run: &str, seq: i32, pending: Option<StatusWrite>) {
        let Ok(mut written) = self.written.lock() else {
            return;
        };
        let now = Instant::now();
        let latest = written.runs.entry(run.to_owned()).or_insert(Latest {
            seq,
            pending: None,
            seen: now,
        });
        if seq >= latest.seq {
            latest.seq = seq;
            latest.pending = pending;
        }
        latest.seen = now;
        if written.pruned.is_none_or(|at| at.elapsed() > PRUNE_EVERY) {
            written.pruned = Some(now);
            written
                .runs
                .retain(|_, latest| latest.seen.elapsed() < REMEMBER_QUIET);
        }
    }

    /// Writes a run's status to PostgreSQL, then the reply that waits for it.
    async fn write_status(
        &self,
        write: StatusWrite,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let status = workflow_runs::Status {
            run_id: &write.run_id,
            workflow: &write.workflow,
            version: write.version,
            status: write.status,
            step: write.step.as_deref(),
            seq: write.seq,
            reply: write.reply.as_deref(),
        };
        let mut tx = tenant_transaction(&self.app, write.tenant).await?;
        match &write.wait {
            Some((event, deadline, state_json)) => {
                workflow_runs::wait(
                    &mut tx,
                    write.tenant,
                    &status,
                    (event, *deadline, state_json, &self.topics.workflow_events),
                )
                .await?
            }
            None => workflow_runs::record(&mut tx, write.tenant, &status).await?,
        };
        tx.commit().await.map_err(sluice_stores::Error::from)?;
        if let Some((topic, partition, chunk)) = &write.then {
            out.emit(topic, Some(*partition), write.run_id.as_bytes(), chunk)
                .await?;
        }
        self.remember(&write.run_id, write.seq, None);
        Ok(())
    }

    /// Whether the step `event` leads to has run already: this process, or another before a
    /// crash or rebalance, wrote the event after it (then only its status may be left to write).
    async fn ran_already(
        &self,
        event: &WorkflowEvent,
        tenant: Uuid,
        out: &mut Emitter,
    ) -> Result<bool, ProcessError> {
        // The memory is trusted only when it says the step ran: another instance may have run
        // it since, while the partition was away.
        if let Some((seq, pending)) = self.latest(&event.run_id) {
            if seq > event.seq {
                if let Some(write) = pending.filter(|w| w.seq > event.seq) {
                    self.write_status(write, out).await?;
                }
                return Ok(true);
            }
        }
        let mut tx = tenant_transaction(&self.app, tenant).await?;
        let recorded = workflow_runs::recorded_seq(&mut tx, tenant, &event.run_id).await?;
        tx.commit().await.map_err(sluice_stores::Error::from)?;
        Ok(recorded.is_some_and(|seq| seq > event.seq))
    }

    /// A tenant's HTTP tool `name` (an enabled row of its `tools`, kind `http`).
    /// A store that cannot be read is a failure worth retrying (the step fails only once the
    /// record's own retries give up); a tool that is missing or set up wrong is a refusal.
    async fn http_tool(&self, tenant: Uuid, name: &str) -> Result<HttpTool, ToolError> {
        let refused = |message: String| ToolError::Refused {
            message,
            attempts: 0,
        };
        let found = async {
            let mut tx = tenant_transaction(&self.app, tenant).await?;
            let found = sluice_stores::postgres::tools::find(&mut tx, tenant, name).await?;
            tx.commit().await?;
            Ok::<_, sluice_stores::Error>(found)
        }
        .await
        .map_err(|e| ToolError::Exhausted {
            message: format!("reading tool {name}: {e}"),
            attempts: 0,
        })?;
        match found {
            Some(tool) if tool.kind == "http" => {
                let config: HttpToolConfig = serde_json::from_value(tool.config)
                    .map_err(|e| refused(format!("tool {name} is not set up right: {e}")))?;
                Ok(HttpTool::new(config)
                    .map_err(|e| refused(format!("tool {name} is not set up right: {e}")))?
                    .reaching(self.reach))
            }
            Some(tool) => Err(refused(format!(
                "tool {name} is of kind {}, not http",
                tool.kind
            ))),
            None => Err(refused(format!(
                "the tenant has no enabled tool named {name}"
            ))),
        }
    }

    /// Calls `tool` with `arguments` under the tool's guard; the call's outcome record and,
    /// when it answered, its billable usage event go into `records`.
    async fn call_tool(
        &self,
        state: &RunState,
        invocation: &ToolInvocation,
        arguments: &Value,
        records: &mut Records,
    ) -> Acted {
        let tool = invocation.tool.as_str();
        let key = invocation.idempotency_key.as_str();
        let started = Instant::now();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let tenant = Uuid::parse_str(&state.tenant_id).map_err(|e| e.to_string());
        let result = match tenant {
            Err(e) => Err(ToolError::Refused {
                message: format!("the run's tenant is not a UUID: {e}"),
                attempts: 0,
            }),
            Ok(tenant) if crate::tools::builtin::NAMES.contains(&tool) => {
                self.resilience
                    .call(tool, &state.tenant_id, |n| {
                        attempts.store(n, std::sync::atomic::Ordering::Relaxed);
                        self.builtin.call(tenant, tool, arguments, key)
                    })
                    .await
            }
            Ok(tenant) => match self.http_tool(tenant, tool).await {
                Err(e) => Err(e),
                Ok(http) => {
                    let http = &http;
                    self.resilience
                        .call(tool, &state.tenant_id, |n| {
                            attempts.store(n, std::sync::atomic::Ordering::Relaxed);
                            http.call(arguments, key)
                        })
                        .await
                }
            },
        };
        let (outcome, answer, error) = match &result {
            Ok(answer) => {
                let text = answer.to_string();
                let kept = if text.len() > MAX_RESULT_RECORD_BYTES {
                    json!({ "truncated": true, "bytes": text.len() }).to_string()
                } else {
                    text
                };
                ("ok", Some(kept), None)
            }
            Err(e) => (e.outcome(), None, Some(e.to_string())),
        };
        records.outcomes.push(ToolOutcome {
            run_id: invocation.run_id.clone(),
            step: invocation.step.clone(),
            tenant_id: invocation.tenant_id.clone(),
            tool: tool.to_owned(),
            idempotency_key: key.to_owned(),
            compensation: invocation.compensation,
            outcome: outcome.to_owned(),
            attempts: i32::try_from(attempts.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(i32::MAX),
            latency_ms: elapsed_ms(started),
            result_json: answer,
            error,
            occurred_at_ms: now_ms(),
            trace_id: invocation.trace_id.clone(),
        });
        if result.is_ok() {
            let mut usage = usage_of(state, key, &format!("tool:{tool}"), "tool");
            usage.latency_ms = Some(elapsed_ms(started));
            usage.trace_id.clone_from(&invocation.trace_id);
            records.usage.push(usage);
        }
        result.map_err(|e| e.to_string())
    }

    /// Calls the model of a model step; its usage event goes into `records`, its tokens into
    /// the answer (`text`, and `json` when the step asks for JSON).
    async fn call_model(
        &self,
        state: &RunState,
        step: &str,
        asked: ModelAsk<'_>,
        trace_id: &str,
        records: &mut Records,
    ) -> Acted {
        let ModelAsk {
            model,
            system,
            prompt,
            format,
        } = asked;
        let json_answer = format.is_some();
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::text("system", state.render_text(system)));
        }
        messages.push(ChatMessage::text("user", state.render_text(prompt)));
        let request = ChatRequest {
            request_id: format!("{}:{step}", state.run_id),
            tenant_id: state.tenant_id.clone(),
            session_id: state.caller.session_id.clone(),
            model: model.to_owned(),
            messages,
            reply_to: ReplyAddress {
                topic: state.caller.reply_topic.clone(),
                partition: state.caller.reply_partition,
            },
            received_at_ms: state.caller.received_at_ms,
            key_id: state.caller.key_id.clone(),
            user_id: state.caller.user_id.clone(),
            allowed_models: state.caller.allowed_models.clone(),
            response_format: format,
            ..ChatRequest::default()
        };
        let models = self.catalog.snapshot();
        let flags = self.flags.get();
        let tenant = Uuid::parse_str(&state.tenant_id).ok();
        let usable = |m: &sluice_stores::ModelSpec| {
            flags.enabled(
                &sluice_stores::postgres::flags::model_flag(&m.name),
                tenant,
                true,
            )
        };
        let decision = sluice_router::decide(&request, &models, usable, &self.router, now_ms())
            .map_err(|refusal| format!("model {model}: {}", refusal.message))?;
        let routed = RoutedRequest { request, decision };
        let started = Instant::now();
        let key = format!("{}:{step}", state.run_id);
        let mut usage = usage_of(
            state,
            &key,
            &routed.decision.model,
            &routed.decision.provider,
        );
        usage.trace_id = Some(trace_id.to_owned());
        let mut events = match self.models.start_call(&routed).await {
            Ok(events) => events,
            Err(e) => {
                usage.billable = false;
                usage.outcome = Some(e.code.clone());
                records.usage.push(usage);
                return Err(format!("model {}: {}", routed.decision.model, e.message));
            }
        };
        let mut text = String::new();
        let mut reported = (None, None);
        let mut failure = None;
        let mut finished = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(ProviderEvent::Delta(delta)) => text.push_str(&delta),
                Ok(ProviderEvent::ToolCall(_)) => {}
                Ok(ProviderEvent::Done {
                    input_tokens,
                    output_tokens,
                    ..
                }) => {
                    reported = (input_tokens, output_tokens);
                    finished = true;
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let input = reported.0.unwrap_or_else(|| routed.request.prompt_tokens());
        let output = reported
            .1
            .unwrap_or_else(|| i64::try_from(tokens::count(&text)).unwrap_or(i64::MAX));
        usage.latency_ms = Some(elapsed_ms(started));
        usage.billable = finished || output > 0;
        if usage.billable {
            usage.input_tokens = input;
            usage.output_tokens = output;
        }
        if !finished {
            let why = failure
                .map(|e| e.message)
                .unwrap_or_else(|| "the model's stream ended without finishing".into());
            usage.outcome = Some("upstream_error".into());
            records.usage.push(usage);
            return Err(format!("model {}: {why}", routed.decision.model));
        }
        records.usage.push(usage);
        let mut answer = json!({ "text": text, "model": routed.decision.model,
                                 "input_tokens": input, "output_tokens": output });
        if json_answer {
            match json_object_in(&text) {
                Some(object) => answer["json"] = object,
                None => {
                    return Err(format!(
                        "model {} did not answer with a JSON object",
                        routed.decision.model
                    ))
                }
            }
        }
        Ok(answer)
    }

    /// Runs a tool or model step (alone or as a member of a parallel step); the caller has
    /// put a tool call's record on `sluice.tool-calls` before.
    async fn act(
        &self,
        state: &RunState,
        step: &Step,
        trace_id: &str,
        records: &mut Records,
    ) -> Acted {
        let answer = self.act_unchecked(state, step, trace_id, records).await?;
        let bytes = answer.to_string().len();
        if bytes > MAX_ANSWER_BYTES {
            return Err(format!(
                "step {} answered {bytes} bytes; a step's answer is kept only up to {MAX_ANSWER_BYTES}",
                step.id
            ));
        }
        Ok(answer)
    }

    async fn act_unchecked(
        &self,
        state: &RunState,
        step: &Step,
        trace_id: &str,
        records: &mut Records,
    ) -> Acted {
        match &step.kind {
            StepKind::Tool {
                tool, arguments, ..
            } => {
                let arguments = state.arguments(arguments);
                let invocation = invocation(state, &step.id, tool, &arguments, false, trace_id);
                self.call_tool(state, &invocation, &arguments, records)
                    .await
            }
            StepKind::Model {
                model,
                system,
                prompt,
                json,
                schema,
            } => {
                let format = match schema {
                    Some(schema) => Some(ResponseFormat {
                        kind: "json_schema".into(),
                        json_schema_json: Some(
                            json!({"name": step.id, "schema": schema}).to_string(),
                        ),
                    }),
                    None => json.then(|| ResponseFormat {
                        kind: "json_object".into(),
                        json_schema_json: None,
                    }),
                };
                let asked = ModelAsk {
                    model,
                    system: system.as_deref(),
                    prompt,
                    format,
                };
                self.call_model(state, &step.id, asked, trace_id, records)
                    .await
            }
            _ => Err(format!("step {} is not a tool or model step", step.id)),
        }
    }

    /// Keeps what a tool or model step answered in the state.
    fn keep(state: &mut RunState, step: &Step, answer: Value) {
        if let StepKind::Model { .. } = step.kind {
            state.last_text = answer
                .get("text")
                .and_then(Value::as_str)
                .map(str::to_owned);
            state.input_tokens += answer
                .get("input_tokens")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            state.output_tokens += answer
                .get("output_tokens")
                .and_then(Value::as_i64)
                .unwrap_or(0);
        }
        if let StepKind::Tool {
            compensate: Some(_),
            ..
        } = step.kind
        {
            state.to_undo.push(step.id.clone());
        }
        state.answers.insert(step.id.clone(), answer);
    }

    /// The transition after step `index` failed with `error`: to `step_failed`, whose handling
    /// undoes the saga's completed steps, or straight on when there is nothing to undo.
    fn failed(
        workflow: &Workflow,
        state: &mut RunState,
        index: usize,
        error: String,
    ) -> Transition {
        let step = workflow.steps.get(index);
        let id = step.map(|s| s.id.clone()).unwrap_or_default();
        let on_error = step.and_then(|s| s.on_error.clone());
        state.failure = Some(super::run::Failure {
            step: id.clone(),
            error: error.clone(),
            then: on_error.clone(),
        });
        if state.to_undo.is_empty() {
            state.failure = None;
            return match on_error {
                Some(next) => Transition {
                    kind: "step_failed",
                    step: id,
                    detail: json!({ "error": error }),
                    next: Some(next),
                },
                None => Transition {
                    kind: "failed",
                    step: id,
                    detail: json!({ "error": error }),
                    next: None,
                },
            };
        }
        Transition {
            kind: "step_failed",
            step: id.clone(),
            detail: json!({ "error": error, "undoing": state.to_undo }),
            // The failed step again: its event's handling is the undoing (`state.failure`).
            next: Some(id),
        }
    }

    /// Undoes the run's completed saga steps in reverse order, then goes on as the failure
    /// said.
    async fn undo(
        &self,
        workflow: &Workflow,
        state: &mut RunState,
        trace_id: &str,
        out: &mut Emitter,
    ) -> Result<Transition, ProcessError> {
        let Some(failure) = state.failure.take() else {
            return Err(ProcessError::Poison("nothing to undo".into()));
        };
        let mut undone = Vec::new();
        let mut records = Records::default();
        for id in std::mem::take(&mut state.to_undo).iter().rev() {
            let Some((
                _,
                Step {
                    kind:
                        StepKind::Tool {
                            compensate: Some(compensation),
                            ..
                        },
                    ..
                },
            )) = workflow.step(id)
            else {
                continue;
            };
            let arguments = state.arguments(&compensation.arguments);
            let invocation = invocation(state, id, &compensation.tool, &arguments, true, trace_id);
            self.announce(&invocation, out).await?;
            let result = self
                .call_tool(state, &invocation, &arguments, &mut records)
                .await;
            undone.push(match result {
                Ok(_) => json!({ "step": id, "tool": compensation.tool, "ok": true }),
                Err(error) => {
                    tracing::error!(run = %state.run_id, step = %id, tool = %compensation.tool, %error, "a saga's compensation failed");
                    json!({ "step": id, "tool": compensation.tool, "ok": false, "error": error })
                }
            });
        }
        self.emit_records(state, records, out).await?;
        let all_undone = undone.iter().all(|u| u["ok"] == json!(true));
        let detail =
            json!({ "error": failure.error, "compensated": undone, "all_undone": all_undone });
        Ok(match failure.then {
            Some(next) => Transition {
                kind: "compensated",
                step: failure.step,
                detail,
                next: Some(next),
            },
            None => Transition {
                kind: "failed",
                step: failure.step,
                detail,
                next: None,
            },
        })
    }

    /// Puts a tool call's record on `sluice.tool-calls`, before the call.
    async fn announce(
        &self,
        invocation: &ToolInvocation,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        out.emit_batched(
            &self.topics.tool_calls,
            None,
            invocation.run_id.as_bytes(),
            invocation,
        )
        .await
    }

    async fn emit_records(
        &self,
        state: &RunState,
        records: Records,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        for outcome in &records.outcomes {
            out.emit_batched(
                &self.topics.tool_results,
                None,
                state.run_id.as_bytes(),
                outcome,
            )
            .await?;
        }
        for usage in &records.usage {
            out.emit_batched(&self.topics.usage, None, usage.tenant_id.as_bytes(), usage)
                .await?;
        }
        Ok(())
    }

    /// Runs step `index` of `workflow` on `state`.
    async fn run_step(
        &self,
        workflow: &Workflow,
        index: usize,
        state: &mut RunState,
        trace_id: &str,
        out: &mut Emitter,
    ) -> Result<Transition, ProcessError> {
        let Some(step) = workflow.steps.get(index) else {
            return Err(ProcessError::Poison(format!("no step {index}")));
        };
        let completed = |next: Option<String>, detail: Value| Transition {
            kind: "step_completed",
            step: step.id.clone(),
            detail,
            next,
        };
        match &step.kind {
            StepKind::Tool { .. } | StepKind::Model { .. } => {
                if let StepKind::Tool {
                    tool, arguments, ..
                } = &step.kind
                {
                    let arguments = state.arguments(arguments);
                    let invocation = invocation(state, &step.id, tool, &arguments, false, trace_id);
                    self.announce(&invocation, out).await?;
                }
                let mut records = Records::default();
                let acted = self.act(state, step, trace_id, &mut records).await;
                self.emit_records(state, records, out).await?;
                Ok(match acted {
                    Ok(answer) => {
                        let detail = summary(step, &answer);
                        Self::keep(state, step, answer);
                        let transition = completed(None, detail);
                        self.after(workflow, index, state, transition, trace_id, out)
                            .await?
                    }
                    Err(error) => Self::failed(workflow, state, index, error),
                })
            }
            StepKind::Branch { cases } => {
                let chosen = cases
                    .iter()
                    .find(|c| c.condition.as_ref().is_none_or(|c| state.holds(c)))
                    .map(|c| c.next.clone());
                Ok(Transition {
                    kind: "branched",
                    step: step.id.clone(),
                    detail: json!({ "to": chosen }),
                    next: chosen,
                })
            }
            StepKind::Parallel { steps } => {
                let members: Vec<&Step> = steps
                    .iter()
                    .filter_map(|id| workflow.step(id).map(|(_, s)| s))
                    .collect();
                for member in &members {
                    if let StepKind::Tool {
                        tool, arguments, ..
                    } = &member.kind
                    {
                        let arguments = state.arguments(arguments);
                        let invocation =
                            invocation(state, &member.id, tool, &arguments, false, trace_id);
                        self.announce(&invocation, out).await?;
                    }
                }
                let snapshot = state.clone();
                let results = futures::future::join_all(members.iter().map(|member| {
                    let snapshot = &snapshot;
                    async move {
                        let mut records = Records::default();
                        let acted = self.act(snapshot, member, trace_id, &mut records).await;
                        (*member, acted, records)
                    }
                }))
                .await;
                let mut errors = Vec::new();
                let mut answers = Map::new();
                for (member, acted, records) in results {
                    self.emit_records(state, records, out).await?;
                    match acted {
                        Ok(answer) => {
                            answers.insert(member.id.clone(), summary(member, &answer));
                            Self::keep(state, member, answer);
                        }
                        Err(error) => errors.push(format!("{}: {error}", member.id)),
                    }
                }
                if errors.is_empty() {
                    Ok(completed(step.next.clone(), Value::Object(answers)))
                } else {
                    Ok(Self::failed(workflow, state, index, errors.join("; ")))
                }
            }
            StepKind::Handoff {
                queue,
                priority,
                summary,
            } => {
                let arguments = json!({
                    "subject": format!("Hand-off to {queue}"),
                    "body": state.render_text(summary),
                    "priority": priority,
                });
                let invocation = invocation(
                    state,
                    &step.id,
                    "create_ticket",
                    &arguments,
                    false,
                    trace_id,
                );
                self.announce(&invocation, out).await?;
                let mut records = Records::default();
                let acted = self
                    .call_tool(state, &invocation, &arguments, &mut records)
                    .await;
                self.emit_records(state, records, out).await?;
                match acted {
                    Ok(answer) => {
                        let ticket = answer
                            .pointer("/ticket/id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        state.answers.insert(step.id.clone(), answer.clone());
                        let reply = format!(
                            "I have passed this to a colleague ({queue}, {priority} priority); your ticket is {ticket}."
                        );
                        self.finish(state, Ok(reply), trace_id, out).await?;
                        Ok(Transition {
                            kind: "handed_off",
                            step: step.id.clone(),
                            detail: answer,
                            next: None,
                        })
                    }
                    Err(error) => Ok(Self::failed(workflow, state, index, error)),
                }
            }
            StepKind::End { reply } => {
                let reply = reply
                    .as_deref()
                    .map(|r| state.render_text(r))
                    .or_else(|| state.last_text.clone())
                    .unwrap_or_default();
                self.finish(state, Ok(reply.clone()), trace_id, out).await?;
                Ok(Transition {
                    kind: "ended",
                    step: step.id.clone(),
                    detail: json!({ "reply": reply }),
                    next: None,
                })
            }
            StepKind::Wait {
                event, timeout_s, ..
            } => {
                let timeout_ms = i64::try_from(timeout_s.saturating_mul(1000)).unwrap_or(i64::MAX);
                let deadline_ms = now_ms().saturating_add(timeout_ms);
                // The caller is told once the run's status row exists ([`Self::advance`]).
                let reply = format!(
                    "Run {} is waiting for the event {event} (at most {timeout_s} s); its outcome will be at /v1/workflows/runs/{}.",
                    state.run_id, state.run_id
                );
                Ok(Transition {
                    kind: "waiting",
                    step: step.id.clone(),
                    detail: json!({ "event": event, "timeout_s": timeout_s,
                                    "deadline_ms": deadline_ms, "reply": reply }),
                    next: None,
                })
            }
        }
    }

    /// The transition after step `index` answered: on to the step after it, or — after the
    /// last step — the run ends, replying with the latest model text.
    async fn after(
        &self,
        workflow: &Workflow,
        index: usize,
        state: &mut RunState,
        mut transition: Transition,
        trace_id: &str,
        out: &mut Emitter,
    ) -> Result<Transition, ProcessError> {
        match workflow.after(index) {
            Some(next) => transition.next = Some(next),
            None => {
                let reply = state.last_text.clone().unwrap_or_default();
                self.finish(state, Ok(reply), trace_id, out).await?;
                transition.kind = "ended";
            }
        }
        Ok(transition)
    }

    /// Ends the run towards its caller: the reply (or the error), and the run's usage event
    /// (billed when the run ended or was handed off; recorded unbilled when it failed).
    async fn finish(
        &self,
        state: &mut RunState,
        reply: Result<String, String>,
        trace_id: &str,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let mut usage = usage_of(
            state,
            &format!("{}:run", state.run_id),
            &format!("workflow:{}", state.workflow),
            PROVIDER,
        );
        usage.trace_id = Some(trace_id.to_owned());
        if reply.is_err() {
            usage.billable = false;
            usage.outcome = Some("workflow_failed".into());
        }
        out.emit_batched(&self.topics.usage, None, usage.tenant_id.as_bytes(), &usage)
            .await?;
        state.reply = Some(match &reply {
            Ok(text) | Err(text) => text.clone(),
        });
        self.reply(state, reply, out).await
    }

    /// Tells the run's caller `reply` (or the error): one chunk that ends its request.
    async fn reply(
        &self,
        state: &RunState,
        reply: Result<String, String>,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let chunk = reply_chunk(state, reply);
        out.emit(
            &state.caller.reply_topic,
            Some(state.caller.reply_partition),
            state.run_id.as_bytes(),
            &chunk,
        )
        .await
    }
}

/// The chunk that ends a run's request: its reply, or its error.
fn reply_chunk(state: &RunState, reply: Result<String, String>) -> ReplyChunk {
    let model = format!("{MODEL_PREFIX}{}", state.workflow);
    let addressed = ChatRequest {
        request_id: state.run_id.clone(),
        tenant_id: state.tenant_id.clone(),
        ..ChatRequest::default()
    };
    let mut chunk = match reply {
        Ok(text) => {
            let mut done = ReplyChunk::new(&addressed, &model, 0, ReplyKind::Done);
            done.delta = text;
            done.finish_reason = Some("stop".into());
            done
        }
        Err(message) => ReplyChunk::error(&addressed, &model, 0, 502, "workflow_failed", message),
    };
    chunk.input_tokens = state.input_tokens;
    chunk.output_tokens = state.output_tokens;
    chunk
}

/// The tool call record of `tool` for `step` (a compensation when `compensation`).
fn invocation(
    state: &RunState,
    step: &str,
    tool: &str,
    arguments: &Value,
    compensation: bool,
    trace_id: &str,
) -> ToolInvocation {
    let key = if compensation {
        format!("{}:{step}:undo", state.run_id)
    } else {
        format!("{}:{step}", state.run_id)
    };
    ToolInvocation {
        run_id: state.run_id.clone(),
        step: step.to_owned(),
        tenant_id: state.tenant_id.clone(),
        tool: tool.to_owned(),
        idempotency_key: key,
        compensation,
        arguments_json: arguments.to_string(),
        occurred_at_ms: now_ms(),
        trace_id: (!trace_id.is_empty()).then(|| trace_id.to_owned()),
    }
}

/// A usage event of the run, billable, with no tokens: `event_id` and what it is for.
fn usage_of(state: &RunState, event_id: &str, model: &str, provider: &str) -> UsageEvent {
    UsageEvent {
        event_id: event_id.to_owned(),
        request_id: state.run_id.clone(),
        tenant_id: state.tenant_id.clone(),
        model: model.to_owned(),
        provider: provider.to_owned(),
        input_tokens: 0,
        output_tokens: 0,
        // When it happened: a step after a wait happens long after the request came.
        occurred_at_ms: now_ms(),
        latency_ms: None,
        key_id: state.caller.key_id.clone(),
        user_id: state.caller.user_id.clone(),
        cached_input_tokens: None,
        trace_id: None,
        outcome: None,
        billable: true,
    }
}

fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// What an event says of a step's answer (the answer itself is in the run's state): a tool's
/// name, a model's name and tokens.
fn summary(step: &Step, answer: &Value) -> Value {
    match &step.kind {
        StepKind::Tool { tool, .. } => json!({ "tool": tool }),
        StepKind::Model { .. } => json!({
            "model": answer.get("model"),
            "input_tokens": answer.get("input_tokens"),
            "output_tokens": answer.get("output_tokens"),
        }),
        _ => json!({}),
    }
}

/// The JSON object a model answered: the whole text, or the first `{` to the last `}` (a
/// model may wrap it in prose or a code fence).
fn json_object_in(text: &str) -> Option<Value> {
    let parsed = |t: &str| {
        serde_json::from_str::<Value>(t)
            .ok()
            .filter(Value::is_object)
    };
    parsed(text.trim()).or_else(|| {
        let (start, end) = (text.find('{')?, text.rfind('}')?);
        parsed(text.get(start..=end)?)
    })
}

/// Where a run is when an event of it is handled: its state, definition and the step next.
struct At {
    state: RunState,
    tenant: Uuid,
    workflow: Arc<Workflow>,
    index: usize,
    /// The sequence number of the event the run is at.
    seq: i32,
    trace_id: String,
}

impl WorkflowEngine {
    /// The definition a run follows.
    async fn definition(
        &self,
        tenant: Uuid,
        name: &str,
        version: i32,
    ) -> Result<Arc<Workflow>, ProcessError> {
        self.definitions
            .get(tenant, name, Some(version))
            .await?
            .ok_or_else(|| {
                ProcessError::Poison(format!("workflow {name} v{version} is not in the registry"))
            })
    }

    /// Writes the event that `transition` of the run `at` leads to (with the run's state after
    /// it), then the run's status in PostgreSQL (which marks the step done: an event read again
    /// runs nothing) and, for a wait, the reply that points the caller to that status.
    async fn advance(
        &self,
        mut at: At,
        mut transition: Transition,
        out: &mut Emitter,
        started: Instant,
    ) -> Result<(), ProcessError> {
        let poison = |e: serde_json::Error| {
            ProcessError::Poison(format!("the run's state cannot be written: {e}"))
        };
        let mut state_json = serde_json::to_string(&at.state).map_err(poison)?;
        if state_json.len() > MAX_STATE_BYTES && transition.next.is_some() {
            // The answer does not fit: the step fails instead (its answer is not kept).
            at.state.answers.remove(&transition.step);
            let error = format!(
                "the run's state would take more than {MAX_STATE_BYTES} bytes with step {}'s answer",
                transition.step
            );
            transition = Self::failed(&at.workflow, &mut at.state, at.index, error);
            state_json = serde_json::to_string(&at.state).map_err(poison)?;
        }
        if transition.kind == "failed" {
            let error = transition.detail["error"]
                .as_str()
                .unwrap_or("a step failed")
                .to_owned();
            let message = format!("Step {} failed: {error}", transition.step);
            self.finish(&mut at.state, Err(message), &at.trace_id, out)
                .await?;
            state_json = serde_json::to_string(&at.state).map_err(poison)?;
        }
        let workflow = at.workflow.name.clone();
        self.metrics
            .workflow_steps
            .with_label_values(&[&workflow, transition.kind])
            .inc();
        self.metrics
            .workflow_step_seconds
            .with_label_values(&[&workflow])
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(run = %at.state.run_id, step = %transition.step, kind = transition.kind, "workflow step");
        let seq = at.seq + 1;
        let waiting = transition.kind == "waiting";
        let following = WorkflowEvent {
            run_id: at.state.run_id.clone(),
            seq,
            tenant_id: at.state.tenant_id.clone(),
            workflow: workflow.clone(),
            version: at.state.version,
            kind: transition.kind.to_owned(),
            step: Some(transition.step.clone()),
            detail_json: Some(transition.detail.to_string()),
            next_step: transition.next.clone(),
            state_json,
            occurred_at_ms: now_ms(),
            trace_id: Some(at.trace_id.clone()),
        };
        out.emit(
            &self.topics.workflow_events,
            None,
            following.run_id.as_bytes(),
            &following,
        )
        .await?;
        let status = if following.ends_run() {
            transition.kind
        } else if waiting {
            "waiting"
        } else {
            "running"
        };
        let then = waiting.then(|| {
            let text = transition.detail["reply"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (
                at.state.caller.reply_topic.clone(),
                at.state.caller.reply_partition,
                reply_chunk(&at.state, Ok(text)),
            )
        });
        let write = StatusWrite {
            tenant: at.tenant,
            run_id: following.run_id.clone(),
            workflow,
            version: following.version,
            status,
            step: following.step.clone(),
            seq,
            reply: at.state.reply.clone(),
            wait: waiting.then(|| {
                (
                    transition.detail["event"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    transition.detail["deadline_ms"]
                        .as_i64()
                        .unwrap_or_default(),
                    following.state_json.clone(),
                )
            }),
            then,
        };
        // The status follows the event, once the event is on the broker; if it cannot be
        // written, a retry of the record writes only it.
        out.flush().await?;
        self.remember(&following.run_id, seq, Some(write.clone()));
        self.write_status(write, out).await
    }

    /// Resumes a waiting run: `event` is a `signal` (the event it waits for came, with its data)
    /// or a `timeout` (its deadline passed), each naming the waiting event it answers. Anything
    /// else — a run not waiting, or waiting at another step, another event, a deadline not
    /// reached — is left alone: a run resumes once.
    async fn resume(
        &self,
        event: &WorkflowEvent,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let tenant = Uuid::parse_str(&event.tenant_id)
            .map_err(|e| ProcessError::Poison(format!("tenant id {:?}: {e}", event.tenant_id)))?;
        let mut tx = tenant_transaction(&self.app, tenant).await?;
        let waiting = workflow_runs::waiting(&mut tx, tenant, &event.run_id).await?;
        tx.commit().await.map_err(sluice_stores::Error::from)?;
        let Some(waiting) = waiting else {
            return Ok(());
        };
        // Resumed already by this process (its status is written above, when it was pending).
        if self
            .latest(&event.run_id)
            .is_some_and(|(seq, _)| seq > waiting.seq)
        {
            return Ok(());
        }
        let detail: Value = event
            .detail_json
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(Value::Null);
        let signal = event.kind == "signal";
        let answers_this_wait = detail["seq"].as_i64() == Some(i64::from(waiting.seq));
        if !answers_this_wait
            || (signal && detail["event"].as_str() != Some(waiting.event.as_str()))
            || (!signal && !waiting.due)
        {
            return Ok(());
        }
        let (waiting_workflow, waiting_version, waiting_step, waiting_seq) = (
            waiting.workflow.clone(),
            waiting.version,
            waiting.step.clone(),
            waiting.seq,
        );
        let resumed = self
            .resume_waiting(tenant, event, ctx, waiting, &detail, out)
            .await;
        if let Err(ProcessError::Poison(why)) = &resumed {
            // It can never go on: say so where its caller looks, instead of asking again.
            let status = workflow_runs::Status {
                run_id: &event.run_id,
                workflow: &waiting_workflow,
                version: waiting_version,
                status: "failed",
                step: Some(&waiting_step),
                seq: waiting_seq + 1,
                reply: Some(why),
            };
            let mut tx = tenant_transaction(&self.app, tenant).await?;
            workflow_runs::fail(&mut tx, tenant, &status).await?;
            tx.commit().await.map_err(sluice_stores::Error::from)?;
        }
        resumed
    }

    async fn resume_waiting(
        &self,
        tenant: Uuid,
        event: &WorkflowEvent,
        ctx: &RecordContext,
        waiting: workflow_runs::Waiting,
        detail: &Value,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let started = Instant::now();
        let mut state: RunState = serde_json::from_str(&waiting.state_json)
            .map_err(|e| ProcessError::Poison(format!("the run's state does not read: {e}")))?;
        let workflow = self
            .definition(tenant, &waiting.workflow, waiting.version)
            .await?;
        let Some((
            index,
            Step {
                kind: StepKind::Wait { on_timeout, .. },
                ..
            },
        )) = workflow.step(&waiting.step)
        else {
            return Err(ProcessError::Poison(format!(
                "run {} waits at {}, which is not a wait step",
                event.run_id, waiting.step
            )));
        };
        let trace_id = event
            .trace_id
            .clone()
            .unwrap_or_else(|| ctx.trace.trace_id_hex());
        let transition = if event.kind == "signal" {
            let data = detail.get("data").cloned().unwrap_or(Value::Null);
            state.answers.insert(waiting.step.clone(), data);
            let transition = Transition {
                kind: "event_received",
                step: waiting.step.clone(),
                detail: json!({ "event": waiting.event }),
                next: None,
            };
            self.after(&workflow, index, &mut state, transition, &trace_id, out)
                .await?
        } else {
            Transition {
                kind: "timed_out",
                step: waiting.step.clone(),
                detail: json!({ "event": waiting.event, "deadline_ms": waiting.deadline_ms }),
                next: Some(on_timeout.clone()),
            }
        };
        let at = At {
            state,
            tenant,
            workflow: workflow.clone(),
            index,
            seq: waiting.seq,
            trace_id,
        };
        self.advance(at, transition, out, started).await
    }

    /// Ends a run that cannot go on (its event does not read, its definition no longer
    /// loads): the caller hears why, the run's status says so, and a `failed` event records it.
    /// Best effort: what cannot be done is logged.
    async fn fail_run(&self, event: &WorkflowEvent, why: &str, out: &mut Emitter) {
        tracing::error!(run = %event.run_id, workflow = %event.workflow, error = %why, "a workflow run cannot go on");
        let message = format!("The run cannot go on: {why}");
        if let Ok(mut state) = serde_json::from_str::<RunState>(&event.state_json) {
            state.reply = Some(message.clone());
            let _ = self.reply(&state, Err(message.clone()), out).await;
            let failed = WorkflowEvent {
                seq: event.seq + 1,
                kind: "failed".into(),
                detail_json: Some(json!({ "error": why }).to_string()),
                next_step: None,
                state_json: serde_json::to_string(&state).unwrap_or_default(),
                occurred_at_ms: now_ms(),
                ..event.clone()
            };
            let _ = out
                .emit(
                    &self.topics.workflow_events,
                    None,
                    event.run_id.as_bytes(),
                    &failed,
                )
                .await;
        }
        if let Ok(tenant) = Uuid::parse_str(&event.tenant_id) {
            let status = workflow_runs::Status {
                run_id: &event.run_id,
                workflow: &event.workflow,
                version: event.version,
                status: "failed",
                step: event.next_step.as_deref(),
                seq: event.seq + 1,
                reply: Some(&message),
            };
            let failed = async {
                let mut tx = tenant_transaction(&self.app, tenant).await?;
                workflow_runs::fail(&mut tx, tenant, &status).await?;
                tx.commit().await.map_err(sluice_stores::Error::from)
            };
            if let Err(e) = failed.await {
                tracing::error!(run = %event.run_id, error = %e, "cannot record that the run failed");
            }
        }
    }

    /// Runs the step `event` leads to, unless it ran already.
    async fn handle(
        &self,
        event: &WorkflowEvent,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        // A waiting run goes on from its status row, when a signal or its timeout comes; an
        // ended one goes nowhere.
        let Some(next) = event.next_step.as_deref() else {
            return Ok(());
        };
        let tenant = Uuid::parse_str(&event.tenant_id)
            .map_err(|e| ProcessError::Poison(format!("tenant id {:?}: {e}", event.tenant_id)))?;
        if self.ran_already(event, tenant, out).await? {
            return Ok(());
        }
        let started = Instant::now();
        let mut state: RunState = serde_json::from_str(&event.state_json)
            .map_err(|e| ProcessError::Poison(format!("the run's state does not read: {e}")))?;
        let workflow = self
            .definition(tenant, &event.workflow, event.version)
            .await?;
        let Some((index, _)) = workflow.step(next) else {
            return Err(ProcessError::Poison(format!(
                "workflow {} v{} has no step {next}",
                event.workflow, event.version
            )));
        };
        let trace_id = event
            .trace_id
            .clone()
            .unwrap_or_else(|| ctx.trace.trace_id_hex());
        let transition = if state.failure.is_some() {
            self.undo(&workflow, &mut state, &trace_id, out).await?
        } else {
            self.run_step(&workflow, index, &mut state, &trace_id, out)
                .await?
        };
        let at = At {
            state,
            tenant,
            workflow,
            index,
            seq: event.seq,
            trace_id,
        };
        self.advance(at, transition, out, started).await
    }
}

/// How long a due wait's timeout is not asked for again while the stage resumes it.
const TIMEOUT_AGAIN_S: i32 = 30;

/// Puts a `timeout` record on `topic` for each waiting run whose deadline has passed, looking
/// every second until `cancel` fires. Each run is claimed in PostgreSQL, so it is asked for at
/// most once every [`TIMEOUT_AGAIN_S`] seconds, by one sweep of all the stage's instances; the
/// stage resumes it once.
pub async fn sweep_due_waits(
    app: PgPool,
    (producer, codec): (
        sluice_pipelines::kafka::Producer,
        Arc<sluice_schemas::Codec>,
    ),
    topic: String,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut registered = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !registered {
            match codec.register::<WorkflowEvent>().await {
                Ok(_) => registered = true,
                Err(e) => {
                    tracing::warn!(error = %e, "the timeout sweep cannot register its schema yet");
                    continue;
                }
            }
        }
        let due = match workflow_runs::due(&app, 100, TIMEOUT_AGAIN_S, &topic).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "the timeout sweep cannot read the waiting runs");
                continue;
            }
        };
        if due.is_empty() {
            continue;
        }
        let mut out = Emitter::new(
            producer.clone(),
            codec.clone(),
            sluice_pipelines::trace::TraceContext::new_root(),
        );
        for (tenant, run, seq) in &due {
            let timeout = WorkflowEvent {
                run_id: run.clone(),
                seq: 0,
                tenant_id: tenant.to_string(),
                workflow: String::new(),
                version: 0,
                kind: "timeout".into(),
                step: None,
                detail_json: Some(json!({ "seq": seq }).to_string()),
                next_step: None,
                state_json: "{}".into(),
                occurred_at_ms: now_ms(),
                trace_id: None,
            };
            if let Err(e) = out.emit(&topic, None, run.as_bytes(), &timeout).await {
                tracing::warn!(error = %e, "the timeout sweep cannot write");
            }
        }
        if let Err(e) = out.flush().await {
            tracing::warn!(error = %e, "the timeout sweep's records were not acknowledged");
        }
    }
}

#[async_trait]
impl RecordOperator for WorkflowEngine {
    type Input = WorkflowEvent;

    async fn process(
        &self,
        event: WorkflowEvent,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        // A status this process could not write (its record gave up) is written with the
        // next record of the run: a wait's or an end's event leads to no step that would.
        if let Some((_, Some(write))) = self.latest(&event.run_id) {
            let resuming = matches!(event.kind.as_str(), "signal" | "timeout");
            if resuming || write.seq <= event.seq {
                self.write_status(write, out).await?;
            }
        }
        if matches!(event.kind.as_str(), "signal" | "timeout") {
            return self.resume(&event, ctx, out).await;
        }
        if event.ends_run() {
            return Ok(());
        }
        let handled = self.handle(&event, ctx, out).await;
        if let Err(ProcessError::Poison(why)) = &handled {
            // Unless the step's event is out already (then the run goes on from it).
            let ran = self
                .latest(&event.run_id)
                .is_some_and(|(seq, _)| seq > event.seq);
            if !ran {
                self.fail_run(&event, why, out).await;
            }
        }
        handled
    }
}
