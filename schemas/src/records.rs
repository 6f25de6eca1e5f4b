//! Rust types for the records in `schemas/avro/`. Field names and order follow the `.avsc`
//! files exactly; a unit test encodes each type against its schema.

use std::sync::OnceLock;

use apache_avro::{reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter, Schema};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Error, Result};

/// A record type with a schema in `schemas/avro/`.
///
/// Its subject in the registry is its full Avro name (Confluent's RecordNameStrategy), so the
/// same record can flow through topics whose names carry a deployment prefix.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Full Avro name, e.g. `sluice.v1.ChatRequest`; also the registry subject.
    const NAME: &'static str;
    /// The `.avsc` text compiled into the binary.
    const AVSC: &'static str;
    /// The parsed schema (parsed once per process).
    fn schema() -> Result<&'static Schema>;
    /// The schema's Parsing Canonical Form (computed once per process).
    fn canonical() -> Result<&'static str>;
    /// A writer for the schema, built once per process (building resolves every named type).
    fn writer() -> Result<&'static GenericDatumWriter<'static>>;
    /// A reader for data written with exactly this schema, built once per process.
    fn reader() -> Result<&'static GenericDatumReader<'static>>;
}

/// Parses an embedded schema once and keeps it for the life of the process.
fn parse_once(cell: &'static OnceLock<Schema>, avsc: &str) -> Result<&'static Schema> {
    if let Some(schema) = cell.get() {
        return Ok(schema);
    }
    let parsed =
        Schema::parse_str(avsc).map_err(|e| Error::Bug(format!("embedded schema: {e}")))?;
    Ok(cell.get_or_init(|| parsed))
}

macro_rules! record {
    ($ty:ident, $name:literal, $file:literal) => {
        impl Record for $ty {
            const NAME: &'static str = $name;
            const AVSC: &'static str = include_str!(concat!("../avro/", $file));
            fn schema() -> Result<&'static Schema> {
                static CELL: OnceLock<Schema> = OnceLock::new();
                parse_once(&CELL, Self::AVSC)
            }
            fn canonical() -> Result<&'static str> {
                static CELL: OnceLock<String> = OnceLock::new();
                if let Some(found) = CELL.get() {
                    return Ok(found);
                }
                let canonical = Self::schema()?.canonical_form();
                Ok(CELL.get_or_init(|| canonical))
            }
            fn writer() -> Result<&'static GenericDatumWriter<'static>> {
                static CELL: OnceLock<GenericDatumWriter<'static>> = OnceLock::new();
                if let Some(found) = CELL.get() {
                    return Ok(found);
                }
                let writer = GenericDatumWriter::builder(Self::schema()?)
                    .human_readable(false)
                    .build()
                    .map_err(|e| Error::Bug(format!("writer for {}: {e}", Self::NAME)))?;
                Ok(CELL.get_or_init(|| writer))
            }
            fn reader() -> Result<&'static GenericDatumReader<'static>> {
                static CELL: OnceLock<GenericDatumReader<'static>> = OnceLock::new();
                if let Some(found) = CELL.get() {
                    return Ok(found);
                }
                let reader = GenericDatumReader::builder(Self::schema()?)
                    .human_readable(false)
                    .build()
                    .map_err(|e| Error::Bug(format!("reader for {}: {e}", Self::NAME)))?;
                Ok(CELL.get_or_init(|| reader))
            }
        }
    };
}

/// One message of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// The text; empty for an assistant message that only called tools.
    pub content: String,
    pub name: Option<String>,
    /// The functions an assistant message called.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text only.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function an assistant message called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as the model wrote them.
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments, as JSON text.
    pub parameters_json: Option<String>,
    pub strict: Option<bool>,
}

/// The form a reply must take (OpenAI's `response_format`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `json_schema`: OpenAI's `json_schema` object, as JSON text.
    #[serde(default)]
    pub json_schema_json: Option<String>,
}

/// Where a reply must be written: the replies partition of the edge instance holding the caller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplyAddress {
    pub topic: String,
    pub partition: i32,
}

/// A tenant's chat request (`sluice.requests`, keyed by `session_id`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub request_id: String,
    pub tenant_id: String,
    pub session_id: String,
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i32>,
    pub temperature: Option<f64>,
    pub stream: bool,
    pub reply_to: ReplyAddress,
    pub received_at_ms: i64,
    /// The models the caller's key and plan allow (`None`: every enabled model).
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// The API key that made the request (`None` for a user's session).
    #[serde(default)]
    pub key_id: Option<String>,
    /// The user whose session made the request (`None` for an API key).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Functions the model may call.
    #[serde(default)]
    pub tools: Vec<ToolDefinition>,
    /// `none`, `auto`, `required` or `function` (`None`: the provider's default).
    #[serde(default)]
    pub tool_choice: Option<String>,
    /// The function the model must call when `tool_choice` is `function`.
    #[serde(default)]
    pub tool_choice_function: Option<String>,
    /// Whether the model may call several tools in one reply (`None`: the provider's default).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// The form the reply must take (`None`: text).
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Further sampling parameters as a JSON object, for an OpenAI-compatible upstream.
    #[serde(default)]
    pub options_json: Option<String>,
    /// Whether the turn this request makes is recorded in its session's memory.
    #[serde(default)]
    pub memory: bool,
    /// How many messages after the leading system and developer ones came from the session's
    /// memory.
    #[serde(default)]
    pub remembered: i32,
    /// For a workflow run: its inputs, as a JSON object.
    #[serde(default)]
    pub workflow_inputs_json: Option<String>,
}
record!(ChatRequest, "sluice.v1.ChatRequest", "chat_request.avsc");

impl ChatRequest {
    /// What the prompt costs in Sluice's [tokens](crate::tokens::count_prompt): its messages,
    /// the tool calls in them and the tools offered.
    pub fn prompt_tokens(&self) -> i64 {
        let count = crate::tokens::count_prompt(&self.messages, &self.tools);
        i64::try_from(count).unwrap_or(i64::MAX)
    }
}

/// The router's choice for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingDecision {
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub reason: String,
    pub decided_at_ms: i64,
}

/// A request with its routing decision (`sluice.routed`, keyed by `session_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedRequest {
    pub request: ChatRequest,
    pub decision: RoutingDecision,
}
record!(
    RoutedRequest,
    "sluice.v1.RoutedRequest",
    "routed_request.avsc"
);

/// A piece of one of a reply's tool calls: the first piece of a call names its id and
/// function, every piece may append to its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which of the reply's calls (0, 1, ...).
    pub index: i32,
    pub id: Option<String>,
    pub name: Option<String>,
    /// JSON text appended to the call's arguments.
    pub arguments: String,
}

impl ToolCallDelta {
    /// The highest `index` a reply's tool calls may have: a reply makes at most 128 calls
    /// (as many as a request may offer tools). A piece beyond it is an upstream's error.
    pub const MAX_INDEX: i32 = 127;
}

/// Joins a reply's tool-call pieces, in the order they came, into whole calls.
#[derive(Debug, Default)]
pub struct ToolCallAssembler {
    calls: Vec<ToolCall>,
}

impl ToolCallAssembler {
    /// Adds pieces: a piece for a call not seen before starts it; an id or name that is empty
    /// does not replace one already known, and a piece beyond the last possible call is
    /// dropped (an upstream that sends one is refused by the orchestrator).
    pub fn push(&mut self, pieces: &[ToolCallDelta]) {
        for piece in pieces {
            if piece.index > ToolCallDelta::MAX_INDEX {
                continue;
            }
            let Ok(index) = usize::try_from(piece.index) else {
                continue;
            };
            while self.calls.len() <= index {
                self.calls.push(ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
            }
            let call = &mut self.calls[index];
            if let Some(id) = piece.id.as_ref().filter(|id| !id.is_empty()) {
                call.id.clone_from(id);
            }
            if let Some(name) = piece.name.as_ref().filter(|name| !name.is_empty()) {
                call.name.clone_from(name);
            }
            call.arguments.push_str(&piece.arguments);
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// The calls, whole.
    pub fn into_calls(self) -> Vec<ToolCall> {
        self.calls
    }
}

/// What a reply chunk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyKind {
    #[serde(rename = "DELTA")]
    Delta,
    #[serde(rename = "DONE")]
    Done,
    #[serde(rename = "ERROR")]
    Error,
}

/// One piece of a reply (`sluice.replies`, partition from the request's `reply_to`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyChunk {
    pub request_id: String,
    pub tenant_id: String,
    pub seq: i32,
    pub kind: ReplyKind,
    pub model: String,
    /// Text this chunk appends: a DELTA's, and on DONE the reply's last text, if any (text
    /// that arrives together travels as one chunk).
    pub delta: String,
    pub finish_reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub error_status: i32,
    /// Of `input_tokens`, those served from the provider's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: i64,
    /// Pieces of the tool calls the model makes, in order.
    #[serde(default)]
    pub tool_calls: Vec<ToolCallDelta>,
}
record!(ReplyChunk, "sluice.v1.ReplyChunk", "reply_chunk.avsc");

impl ReplyChunk {
    /// A chunk of the given kind with every optional part empty.
    pub fn new(request: &ChatRequest, model: &str, seq: i32, kind: ReplyKind) -> Self {
        Self {
            request_id: request.request_id.clone(),
            tenant_id: request.tenant_id.clone(),
            seq,
            kind,
            model: model.to_owned(),
            delta: String::new(),
            finish_reason: None,
            input_tokens: 0,
            output_tokens: 0,
            error_code: None,
            error_message: None,
            error_status: 0,
            cached_input_tokens: 0,
            tool_calls: Vec::new(),
        }
    }

    /// An ERROR chunk telling the edge to answer with `status`.
    pub fn error(
        request: &ChatRequest,
        model: &str,
        seq: i32,
        status: u16,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        let mut chunk = Self::new(request, model, seq, ReplyKind::Error);
        chunk.error_status = i32::from(status);
        chunk.error_code = Some(code.to_owned());
        chunk.error_message = Some(message.into());
        chunk
    }
}

/// One billable model call (`sluice.usage`, keyed by `tenant_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub event_id: String,
    pub request_id: String,
    pub tenant_id: String,
    pub model: String,
    pub provider: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub occurred_at_ms: i64,
    #[serde(default)]
    pub latency_ms: Option<i64>,
    /// The API key that made the request.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The user whose session made the request.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Input tokens served from the provider's prompt cache (a part of `input_tokens`).
    #[serde(default)]
    pub cached_input_tokens: Option<i64>,
    /// The request's W3C trace id (hex).
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Why the call failed (its error code), if it did.
    #[serde(default)]
    pub outcome: Option<String>,
    /// Whether it is billed: false only for a call that failed before producing anything.
    #[serde(default = "billable_by_default")]
    pub billable: bool,
}

fn billable_by_default() -> bool {
    true
}
record!(UsageEvent, "sluice.v1.UsageEvent", "usage_event.avsc");

impl UsageEvent {
    /// The deterministic event id of the `call_index`-th model call of a request, so a
    /// re-executed call produces the same id and is counted once.
    pub fn event_id_for(request_id: &str, call_index: u32) -> String {
        format!("{request_id}:{call_index}")
    }
}

/// A record a stage gave up on (`sluice.dlq`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    pub failed_at_ms: i64,
}
record!(DeadLetter, "sluice.v1.DeadLetter", "dead_letter.avsc");

/// Something a tenant is told about through its webhooks (`sluice.notifications`, keyed by
/// tenant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub event_id: String,
    pub tenant_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub occurred_at_ms: i64,
    /// The event's data object, as JSON.
    pub data_json: String,
}
record!(Notification, "sluice.v1.Notification", "notification.avsc");

/// One result row of a streaming SQL pipeline for one window of one source partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowResult {
    pub pipeline: String,
    pub source_partition: i32,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub records: i64,
    pub row_json: String,
}
record!(WindowResult, "sluice.v1.WindowResult", "window_result.avsc");

/// One step transition of a workflow run (`sluice.workflow-events`, keyed by run): the step,
/// what happened, where the run goes next, and the run's whole state after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowEvent {
    pub run_id: String,
    pub seq: i32,
    pub tenant_id: String,
    pub workflow: String,
    pub version: i32,
    pub kind: String,
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub detail_json: Option<String>,
    #[serde(default)]
    pub next_step: Option<String>,
    pub state_json: String,
    pub occurred_at_ms: i64,
    #[serde(default)]
    pub trace_id: Option<String>,
}
record!(
    WorkflowEvent,
    "sluice.v1.WorkflowEvent",
    "workflow_event.avsc"
);

impl WorkflowEvent {
    /// The kinds of event that end a run.
    pub const ENDS: [&'static str; 3] = ["ended", "handed_off", "failed"];

    /// Whether the event ends its run.
    pub fn ends_run(&self) -> bool {
        Self::ENDS.contains(&self.kind.as_str())
    }
}

/// A tool call a workflow run makes (`sluice.tool-calls`, keyed by run), written before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInvocation {
    pub run_id: String,
    pub step: String,
    pub tenant_id: String,
    pub tool: String,
    pub idempotency_key: String,
    #[serde(default)]
    pub compensation: bool,
    pub arguments_json: String,
    pub occurred_at_ms: i64,
    #[serde(default)]
    pub trace_id: Option<String>,
}
record!(
    ToolInvocation,
    "sluice.v1.ToolInvocation",
    "tool_invocation.avsc"
);

/// How a workflow run's tool call ended (`sluice.tool-results`, keyed by run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOutcome {
    pub run_id: String,
    pub step: String,
    pub tenant_id: String,
    pub tool: String,
    pub idempotency_key: String,
    #[serde(default)]
    pub compensation: bool,
    pub outcome: String,
    pub attempts: i32,
    pub latency_ms: i64,
    #[serde(default)]
    pub result_json: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub occurred_at_ms: i64,
    #[serde(default)]
    pub trace_id: Option<String>,
}
record!(ToolOutcome, "sluice.v1.ToolOutcome", "tool_outcome.avsc");

/// A tenant's document for its knowledge, in chunks, or its deletion (`sluice.documents`,
/// keyed by tenant and document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub tenant_id: String,
    pub document_id: String,
    pub title: String,
    pub format: String,
    pub version_ms: i64,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub chunks: Vec<DocumentChunk>,
    #[serde(default)]
    pub trace_id: Option<String>,
}
record!(Document, "sluice.v1.Document", "document.avsc");

/// A part of a document: a few paragraphs under one heading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentChunk {
    #[serde(default)]
    pub heading: Option<String>,
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_body, encode_body};

    pub(crate) fn sample_request() -> ChatRequest {
        ChatRequest {
            request_id: "req-1".into(),
            tenant_id: "t-1".into(),
            session_id: "s-1".into(),
            model: "auto".into(),
            messages: vec![ChatMessage::text("user", "hello")],
            max_tokens: Some(16),
            temperature: None,
            stream: true,
            reply_to: ReplyAddress {
                topic: "sluice.replies".into(),
                partition: 3,
            },
            received_at_ms: 1_700_000_000_000,
            allowed_models: None,
            key_id: None,
            user_id: None,
            tools: Vec::new(),
            tool_choice: None,
            tool_choice_function: None,
            parallel_tool_calls: None,
            response_format: None,
            options_json: None,
            memory: false,
            remembered: 0,
            workflow_inputs_json: None,
        }
    }

    fn round_trip<T: Record + PartialEq + std::fmt::Debug>(value: T) {
        let body = encode_body(&value).unwrap();
        let back: T = decode_body(T::schema().unwrap(), &body).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn every_record_round_trips_through_its_schema() {
        let request = sample_request();
        round_trip(request.clone());
        let mut with_tools = request.clone();
        let mut called = ChatMessage::text("assistant", "");
        called.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "lookup_order".into(),
            arguments: r#"{"order_id":"A-1"}"#.into(),
        });
        let mut answer = ChatMessage::text("tool", r#"{"status":"shipped"}"#);
        answer.tool_call_id = Some("call_1".into());
        with_tools.messages.extend([called, answer]);
        with_tools.tools.push(ToolDefinition {
            name: "lookup_order".into(),
            description: Some("Find an order".into()),
            parameters_json: Some(r#"{"type":"object"}"#.into()),
            strict: Some(true),
        });
        with_tools.tool_choice = Some("function".into());
        with_tools.tool_choice_function = Some("lookup_order".into());
        with_tools.parallel_tool_calls = Some(false);
        with_tools.response_format = Some(ResponseFormat {
            kind: "json_object".into(),
            json_schema_json: None,
        });
        with_tools.options_json = Some(r#"{"top_p":0.5}"#.into());
        with_tools.memory = true;
        with_tools.remembered = 2;
        round_trip(with_tools.clone());
        round_trip(RoutedRequest {
            request: with_tools,
            decision: RoutingDecision {
                model: "sim-small".into(),
                provider: "sim".into(),
                upstream_model: "sim-small".into(),
                base_url: Some("http://127.0.0.1:1/v1".into()),
                api_key_env: None,
                reason: "cheapest".into(),
                decided_at_ms: 1,
            },
        });
        let mut chunk = ReplyChunk::new(&request, "sim-small", 2, ReplyKind::Done);
        chunk.finish_reason = Some("tool_calls".into());
        chunk.tool_calls.push(ToolCallDelta {
            index: 0,
            id: Some("call_1".into()),
            name: Some("lookup_order".into()),
            arguments: "{".into(),
        });
        round_trip(chunk);
        round_trip(ReplyChunk::error(
            &request,
            "m",
            0,
            404,
            "model_not_found",
            "no",
        ));
        round_trip(UsageEvent {
            event_id: UsageEvent::event_id_for("req-1", 0),
            request_id: "req-1".into(),
            tenant_id: "t-1".into(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 5,
            output_tokens: 7,
            occurred_at_ms: 3,
            latency_ms: Some(12),
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
        });
        round_trip(DeadLetter {
            source_topic: "sluice.requests".into(),
            source_partition: 1,
            source_offset: 42,
            stage: "router".into(),
            reason: "bad".into(),
            key: Some(b"k".to_vec()),
            payload: None,
            failed_at_ms: 9,
        });
        round_trip(WorkflowEvent {
            run_id: "req-1".into(),
            seq: 2,
            tenant_id: "t-1".into(),
            workflow: "track_order".into(),
            version: 1,
            kind: "step_completed".into(),
            step: Some("lookup".into()),
            detail_json: Some(r#"{"found":true}"#.into()),
            next_step: Some("answer".into()),
            state_json: "{}".into(),
            occurred_at_ms: 4,
            trace_id: Some("ab".into()),
        });
        round_trip(ToolInvocation {
            run_id: "req-1".into(),
            step: "lookup".into(),
            tenant_id: "t-1".into(),
            tool: "lookup_order".into(),
            idempotency_key: "req-1:lookup".into(),
            compensation: false,
            arguments_json: r#"{"order_id":"A-1"}"#.into(),
            occurred_at_ms: 5,
            trace_id: None,
        });
        round_trip(Document {
            tenant_id: "t-1".into(),
            document_id: "descaling".into(),
            title: "Descaling".into(),
            format: "markdown".into(),
            version_ms: 7,
            deleted: false,
            chunks: vec![DocumentChunk {
                heading: Some("Kettles".into()),
                text: "Use citric acid.".into(),
            }],
            trace_id: None,
        });
        round_trip(ToolOutcome {
            run_id: "req-1".into(),
            step: "lookup".into(),
            tenant_id: "t-1".into(),
            tool: "lookup_order".into(),
            idempotency_key: "req-1:lookup".into(),
            compensation: true,
            outcome: "ok".into(),
            attempts: 1,
            latency_ms: 3,
            result_json: Some("{}".into()),
            error: None,
            occurred_at_ms: 6,
            trace_id: None,
        });
    }

    #[test]
    fn routed_request_embeds_exactly_the_chat_request_schema() {
        let routed: serde_json::Value = serde_json::from_str(RoutedRequest::AVSC).unwrap();
        let embedded = &routed["fields"][0]["type"];
        let standalone: serde_json::Value = serde_json::from_str(ChatRequest::AVSC).unwrap();
        let embedded = Schema::parse(embedded).unwrap();
        let standalone = Schema::parse(&standalone).unwrap();
        assert_eq!(embedded.canonical_form(), standalone.canonical_form());
    }
}
