//! The orchestrator: for each routed request on `sluice.routed`, call the chosen model through
//! its provider, stream the reply as [`ReplyChunk`]s to the edge instance that holds the caller
//! (the request's `reply_to` partition of `sluice.replies`), and emit one [`UsageEvent`] per
//! model call to `sluice.usage`.
//!
//! # Exactly-once billing
//! The usage event id is `request_id:call_index`, so if the orchestrator crashes and the
//! routed record is redelivered, the repeated call produces the same event id and the metering
//! sink counts it once. Reply chunks carry a `seq`; the edge drops chunks it has seen.
//!
//! # Records per reply
//! Text that arrives together travels together: a streamed reply sends its first text at once
//! (time to first token), then whatever has arrived each time it would otherwise wait; a whole
//! (not streamed) reply is one DONE chunk carrying the text. Tool calls travel the same way, as
//! pieces in the chunks' `tool_calls` (pieces of one call that arrive together are joined). So a fast upstream costs two reply
//! records per streamed request and one per whole one, not one per token.

pub mod providers;
pub mod tools;
pub mod workflow;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use sluice_pipelines::{Emitter, ProcessError, RecordContext, RecordOperator, Topics};
use sluice_schemas::{
    tokens, ChatMessage, ReplyChunk, ReplyKind, RoutedRequest, ToolCallAssembler, ToolCallDelta,
    UsageEvent,
};
use sluice_stores::ProviderKind;

use providers::{
    openai::{OpenAiConfig, OpenAiProvider},
    sim::{self, SimConfig},
    EventStream, ModelCall, ProviderError, ProviderEvent,
};

/// The longest the end of a reply waits for its turn to be recorded in the session's memory.
const MEMORY_WRITE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a whole (not streamed) reply's text is held before it is sent on, so the edge
/// keeps hearing from a long generation.
const WHOLE_REPLY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// What a reply holds that the edge has not been sent yet: text, and pieces of tool calls.
#[derive(Default)]
struct Pending {
    text: String,
    tool_calls: Vec<ToolCallDelta>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.tool_calls.is_empty()
    }

    /// Adds a piece of a tool call; one that only continues the arguments of the piece before
    /// it joins that piece.
    fn push_tool_call(&mut self, piece: ToolCallDelta) {
        if let Some(last) = self.tool_calls.last_mut() {
            if last.index == piece.index && piece.id.is_none() && piece.name.is_none() {
                last.arguments.push_str(&piece.arguments);
                return;
            }
        }
        self.tool_calls.push(piece);
    }

    /// Moves what is held into `chunk`.
    fn fill(&mut self, chunk: &mut ReplyChunk) {
        chunk.delta = std::mem::take(&mut self.text);
        chunk.tool_calls = std::mem::take(&mut self.tool_calls);
    }
}

/// The tool calls a reply has made so far, whole: what Sluice's token counter bills when the
/// provider reports no usage, and what a session's memory records.
#[derive(Default)]
struct CallsMade(ToolCallAssembler);

impl CallsMade {
    fn push(&mut self, piece: &ToolCallDelta) {
        self.0.push(std::slice::from_ref(piece));
    }

    /// Their tokens: each function's name and arguments.
    fn tokens(&self) -> usize {
        self.0
            .calls()
            .iter()
            .map(|c| tokens::count(&c.name) + tokens::count(&c.arguments))
            .sum()
    }
}

/// Sends what `pending` holds (if anything) as DELTA chunk `seq` of `routed`'s reply, to the
/// edge waiting for it; empties `pending` and moves `seq` on.
async fn send_pending(
    out: &mut Emitter,
    routed: &RoutedRequest,
    seq: &mut i32,
    pending: &mut Pending,
) -> Result<(), ProcessError> {
    if pending.is_empty() {
        return Ok(());
    }
    let request = &routed.request;
    let mut chunk = ReplyChunk::new(request, &routed.decision.model, *seq, ReplyKind::Delta);
    pending.fill(&mut chunk);
    out.emit(
        &request.reply_to.topic,
        Some(request.reply_to.partition),
        request.request_id.as_bytes(),
        &chunk,
    )
    .await?;
    *seq += 1;
    Ok(())
}

/// Orchestrator settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// The simulator's pace and reply length.
    pub sim: SimConfig,
    /// Calls to OpenAI-compatible upstreams.
    pub openai: OpenAiConfig,
    /// How workflow runs call tools.
    pub tools: ToolsConfig,
}

/// How workflow runs call tools.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// The guard around every call: timeout, retries, circuit breaker, bulkhead.
    pub resilience: tools::ResilienceConfig,
    /// Whether tenants' HTTP tools may reach private and loopback addresses. Off (the default),
    /// an endpoint that resolves into the platform's own network is refused; turn it on only
    /// where tenants' tools live on a private network the platform trusts them with.
    pub private_network: bool,
}

impl ToolsConfig {
    /// Which addresses tenants' HTTP tools may reach.
    pub fn reach(&self) -> tools::Reach {
        if self.private_network {
            tools::Reach::Any
        } else {
            tools::Reach::Public
        }
    }
}

impl OrchestratorConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = self.sim.validate();
        problems.extend(self.tools.resilience.validate());
        problems
    }
}

/// The orchestrator as a stream operator.
pub struct Orchestrator {
    config: OrchestratorConfig,
    openai: OpenAiProvider,
    topics: Topics,
    /// Where sessions' memory is recorded (the runtime role's pool), if anywhere.
    memory: Option<sqlx::PgPool>,
    /// The workflow registry, for requests that start a run.
    workflows: Option<std::sync::Arc<workflow::Definitions>>,
}

impl Orchestrator {
    /// Builds the orchestrator and its provider clients.
    pub fn new(config: OrchestratorConfig, topics: Topics) -> Result<Self, ProviderError> {
        let openai = OpenAiProvider::new(&config.openai)?;
        Ok(Self {
            config,
            openai,
            topics,
            memory: None,
            workflows: None,
        })
    }

    /// Starts workflow runs (`model: "workflow/<name>"`) from `definitions`.
    pub fn with_workflows(mut self, definitions: std::sync::Arc<workflow::Definitions>) -> Self {
        self.workflows = Some(definitions);
        self
    }

    /// Starts the run `routed` asks for: its `started` event on `sluice.workflow-events`, or,
    /// when it cannot start, an ERROR reply saying why.
    async fn start_workflow(
        &self,
        routed: &RoutedRequest,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let request = &routed.request;
        let mut name = routed.decision.upstream_model.clone();
        if let (true, Some(definitions), Ok(tenant)) = (
            name == sluice_stores::AUTO_MODEL,
            &self.workflows,
            request.tenant_id.parse::<sqlx::types::Uuid>(),
        ) {
            // `workflow/auto`: the tenant's workflow for the triage intent.
            let intent = sluice_stores::postgres::workflows::AUTO_INTENT;
            if let Some(entry) = definitions.for_intent(tenant, intent).await? {
                name = entry;
            }
        }
        let name = name.as_str();
        let started = match (
            &self.workflows,
            request.tenant_id.parse::<sqlx::types::Uuid>(),
        ) {
            (None, _) => Err((
                503,
                "workflows_unavailable",
                "This server does not run workflows.".to_owned(),
            )),
            (_, Err(_)) => Err((
                400,
                "invalid_request_error",
                "The request's tenant is not valid.".to_owned(),
            )),
            (Some(definitions), Ok(tenant)) => match definitions.get(tenant, name, None).await {
                Err(e) if e.is_retriable() => return Err(ProcessError::from(e)),
                Err(e) => {
                    tracing::error!(workflow = name, error = %e, "a stored workflow does not load");
                    Err((
                        500,
                        "workflow_invalid",
                        format!("Workflow {name} cannot run: {e}"),
                    ))
                }
                Ok(None) => Err((
                    404,
                    "model_not_found",
                    format!(
                        "The model `{}` does not exist or you do not have access to it.",
                        request.model
                    ),
                )),
                Ok(Some(definition)) => {
                    workflow::engine::start(routed, &definition, ctx.trace.trace_id_hex())
                        .map_err(|r| (r.status, r.code, r.message))
                }
            },
        };
        match started {
            Ok(event) => {
                out.emit(
                    &self.topics.workflow_events,
                    None,
                    event.run_id.as_bytes(),
                    &event,
                )
                .await
            }
            Err((status, code, message)) => {
                let chunk = ReplyChunk::error(request, &request.model, 0, status, code, message);
                out.emit(
                    &request.reply_to.topic,
                    Some(request.reply_to.partition),
                    request.request_id.as_bytes(),
                    &chunk,
                )
                .await
            }
        }
    }

    /// Records the turns of requests that keep their session's memory in `app`'s
    /// `conversation_turns`.
    pub fn with_memory(mut self, app: sqlx::PgPool) -> Self {
        self.memory = Some(app);
        self
    }

    /// Records the turn `routed` made — the caller's new messages and the reply — in its
    /// session's memory, once per request. Tried a few times; a turn that cannot be recorded is
    /// logged and left out of the memory, not held against the reply.
    async fn remember(&self, routed: &RoutedRequest, reply: ChatMessage) {
        let request = &routed.request;
        let (Some(app), true) = (&self.memory, request.memory) else {
            return;
        };
        let Ok(tenant) = request.tenant_id.parse::<sqlx::types::Uuid>() else {
            return;
        };
        let leading = request
            .messages
            .iter()
            .take_while(|m| matches!(m.role.as_str(), "system" | "developer"))
            .count();
        let skip = leading + usize::try_from(request.remembered).unwrap_or(0);
        let mut turn: Vec<ChatMessage> = request.messages.iter().skip(skip).cloned().collect();
        turn.push(reply);
        let Ok(messages) = serde_json::to_value(&turn) else {
            return;
        };
        let owner = sluice_stores::postgres::memory::owner(
            request.key_id.as_deref(),
            request.user_id.as_deref(),
        );
        // At most a second: the reply's end waits for this.
        let recording = async {
            for attempt in 1..=3u32 {
                let recorded = async {
                    let mut tx = sluice_stores::postgres::tenant_transaction(app, tenant).await?;
                    sluice_stores::postgres::memory::record_turn(
                        &mut tx,
                        tenant,
                        &owner,
                        &request.session_id,
                        &request.request_id,
                        &messages,
                    )
                    .await?;
                    tx.commit().await.map_err(sluice_stores::Error::from)
                }
                .await;
                match recorded {
                    Ok(()) => return,
                    Err(e) if attempt < 3 && e.is_retriable() => {
                        tokio::time::sleep(std::time::Duration::from_millis(
                            100 * u64::from(attempt),
                        ))
                        .await;
                    }
                    Err(e) => {
                        tracing::error!(request_id = %request.request_id, session = %request.session_id, error = %e, "cannot record the turn in the session's memory");
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(MEMORY_WRITE_DEADLINE, recording)
            .await
            .is_err()
        {
            tracing::error!(request_id = %request.request_id, session = %request.session_id, "recording the turn in the session's memory took too long; left out");
        }
    }

    pub(crate) async fn start_call(
        &self,
        routed: &RoutedRequest,
    ) -> Result<EventStream, ProviderError> {
        let request = &routed.request;
        let decision = &routed.decision;
        let api_key = match decision.api_key_env.as_deref() {
            Some(var) => Some(std::env::var(var).map_err(|_| ProviderError {
                status: 503,
                code: "upstream_not_configured".into(),
                message: format!(
                    "the key for model {} is not configured on this server",
                    decision.model
                ),
            })?),
            None => None,
        };
        let mut call = ModelCall::for_request(request, &decision.upstream_model);
        call.base_url.clone_from(&decision.base_url);
        call.api_key = api_key;
        // A decision from a newer router may name a kind this build does not know.
        let kind: ProviderKind = decision.provider.parse().map_err(|e| ProviderError {
            status: 500,
            code: "provider_unavailable".into(),
            message: format!("model {}: {e}", decision.model),
        })?;
        match kind {
            ProviderKind::Sim => Ok(sim::complete(&call, &self.config.sim)),
            ProviderKind::Openai => self.openai.complete(&call).await,
        }
    }
}

/// The usage event of `routed`'s model call, begun at `started`: its (input, output, cached)
/// tokens, why it failed if it did, and whether it is billed.
fn call_event(
    routed: &RoutedRequest,
    ctx: &RecordContext,
    started: std::time::Instant,
    (input_tokens, output_tokens, cached_input_tokens): (i64, i64, Option<i64>),
    outcome: Option<String>,
    billable: bool,
) -> UsageEvent {
    let request = &routed.request;
    UsageEvent {
        event_id: UsageEvent::event_id_for(&request.request_id, 0),
        request_id: request.request_id.clone(),
        tenant_id: request.tenant_id.clone(),
        model: routed.decision.model.clone(),
        provider: routed.decision.provider.clone(),
        input_tokens,
        output_tokens,
        occurred_at_ms: request.received_at_ms,
        latency_ms: Some(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)),
        key_id: request.key_id.clone(),
        user_id: request.user_id.clone(),
        cached_input_tokens,
        trace_id: Some(ctx.trace.trace_id_hex()),
        outcome,
        billable,
    }
}

impl Orchestrator {
    /// Puts `usage` on `sluice.usage`, keyed by tenant. Nobody waits on usage: it leaves
    /// batched with other requests' usage.
    async fn emit_usage(&self, out: &mut Emitter, usage: &UsageEvent) -> Result<(), ProcessError> {
        out.emit_batched(&self.topics.usage, None, usage.tenant_id.as_bytes(), usage)
            .await
    }
}

#[async_trait]
impl RecordOperator for Orchestrator {
    type Input = RoutedRequest;

    async fn process(
        &self,
        routed: RoutedRequest,
        ctx: &RecordContext,
        out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        if routed.decision.provider == workflow::engine::PROVIDER {
            return self.start_workflow(&routed, ctx, out).await;
        }
        let request = &routed.request;
        let decision = &routed.decision;
        let reply_topic = request.reply_to.topic.as_str();
        let reply_partition = Some(request.reply_to.partition);
        let reply_key = request.request_id.as_bytes();
        let mut seq = 0i32;
        let call_started = std::time::Instant::now();

        let mut events = match self.start_call(&routed).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(request_id = %request.request_id, error = %e, "model call failed");
                // Recorded unbilled, for error rates.
                let usage = call_event(
                    &routed,
                    ctx,
                    call_started,
                    (0, 0, None),
                    Some(e.code.clone()),
                    false,
                );
                self.emit_usage(out, &usage).await?;
                let chunk =
                    ReplyChunk::error(request, &decision.model, seq, e.status, &e.code, e.message);
                return out
                    .emit(reply_topic, reply_partition, reply_key, &chunk)
                    .await;
            }
        };

        let mut text = String::new();
        let mut calls_made = CallsMade::default();
        // What was received but not yet sent to the edge.
        let mut pending = Pending::default();
        let mut last_sent = std::time::Instant::now();
        let mut finish: Option<(String, Option<i64>, Option<i64>)> = None;
        let mut cached: Option<i64> = None;
        let mut failure: Option<ProviderError> = None;
        loop {
            // What is already here is taken without waiting; before waiting for more, a
            // streamed reply sends what it holds, and a whole reply holds on (up to
            // WHOLE_REPLY_FLUSH, so the edge keeps hearing from a long generation).
            let event = match events.next().now_or_never() {
                Some(event) => event,
                None if request.stream => {
                    send_pending(out, &routed, &mut seq, &mut pending).await?;
                    events.next().await
                }
                None => {
                    let wait = WHOLE_REPLY_FLUSH.saturating_sub(last_sent.elapsed());
                    match tokio::time::timeout(wait, events.next()).await {
                        Ok(event) => event,
                        Err(_) => {
                            send_pending(out, &routed, &mut seq, &mut pending).await?;
                            last_sent = std::time::Instant::now();
                            continue;
                        }
                    }
                }
            };
            match event {
                Some(Ok(ProviderEvent::Delta(delta))) => {
                    text.push_str(&delta);
                    pending.text.push_str(&delta);
                    // The first text of a streamed reply leaves at once: time to first token.
                    if request.stream && seq == 0 {
                        send_pending(out, &routed, &mut seq, &mut pending).await?;
                    }
                }
                Some(Ok(ProviderEvent::ToolCall(piece))) => {
                    calls_made.push(&piece);
                    pending.push_tool_call(piece);
                    if request.stream && seq == 0 {
                        send_pending(out, &routed, &mut seq, &mut pending).await?;
                    }
                }
                Some(Ok(ProviderEvent::Done {
                    finish_reason,
                    input_tokens,
                    output_tokens,
                    cached_input_tokens,
                })) => {
                    finish = Some((finish_reason, input_tokens, output_tokens));
                    cached = cached_input_tokens;
                    break;
                }
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                None => break,
            }
        }
        if finish.is_none() && failure.is_none() {
            failure = Some(ProviderError::upstream(
                "upstream ended the stream without finishing",
            ));
        }

        let (finish_reason, reported_in, reported_out) = finish
            .clone()
            .unwrap_or_else(|| ("error".into(), None, None));
        let input_tokens = reported_in.unwrap_or_else(|| request.prompt_tokens());
        let output_tokens = reported_out.unwrap_or_else(|| {
            i64::try_from(tokens::count(&text) + calls_made.tokens()).unwrap_or(i64::MAX)
        });
        if finish.is_some() && (reported_in.is_none() || reported_out.is_none()) {
            tracing::info!(model = %decision.model, "upstream reported no usage; billed by Sluice's token counter");
        }

        // Bill what was generated, even when the stream broke part-way; a call that failed
        // before producing anything is recorded unbilled, for error rates.
        let cached_input_tokens = cached.filter(|c| *c > 0).map(|c| c.min(input_tokens));
        let billed = finish.is_some() || output_tokens > 0;
        {
            let tokens = if billed {
                (input_tokens, output_tokens, cached_input_tokens)
            } else {
                (0, 0, None)
            };
            let outcome = failure.as_ref().map(|e| e.code.clone());
            let usage = call_event(&routed, ctx, call_started, tokens, outcome, billed);
            self.emit_usage(out, &usage).await?;
        }

        let last = match failure {
            Some(e) => {
                send_pending(out, &routed, &mut seq, &mut pending).await?;
                tracing::warn!(request_id = %request.request_id, trace_id = %ctx.trace.trace_id_hex(), error = %e, "model stream failed");
                let mut error =
                    ReplyChunk::error(request, &decision.model, seq, e.status, &e.code, e.message);
                // What was billed, so the edge settles the caller's limits with it.
                if billed {
                    error.input_tokens = input_tokens;
                    error.output_tokens = output_tokens;
                    error.cached_input_tokens = cached_input_tokens.unwrap_or(0);
                }
                error
            }
            None => {
                // Before the reply's end reaches the caller, so its next turn finds this one.
                let mut reply = ChatMessage::text("assistant", text);
                reply.tool_calls = calls_made.0.into_calls();
                self.remember(&routed, reply).await;
                let mut done = ReplyChunk::new(request, &decision.model, seq, ReplyKind::Done);
                pending.fill(&mut done);
                done.finish_reason = Some(finish_reason);
                done.input_tokens = input_tokens;
                done.output_tokens = output_tokens;
                done.cached_input_tokens = cached_input_tokens.unwrap_or(0);
                done
            }
        };
        out.emit(reply_topic, reply_partition, reply_key, &last)
            .await
    }
}
