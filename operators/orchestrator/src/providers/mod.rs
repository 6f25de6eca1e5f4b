//! Model providers: how the orchestrator calls a model and gets its reply as a stream.
//!
//! Two kinds (`sluice_stores::ProviderKind`, a closed set), dispatched in one `match` on the
//! routing decision's `provider`:
//! - [`openai`]: any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, LiteLLM, another
//!   Sluice...) by base URL and key, streaming.
//! - [`sim`]: a built-in simulator with deterministic text, configurable latency and speed, and
//!   honest token counts, for demos, tests and benchmarks where no upstream exists.

pub mod openai;
pub mod sim;

use futures::stream::BoxStream;
use serde_json::{Map, Value};
use sluice_schemas::{ChatMessage, ChatRequest, ResponseFormat, ToolCallDelta, ToolDefinition};

/// One model call.
#[derive(Debug, Clone)]
pub struct ModelCall {
    /// Model name the provider knows.
    pub upstream_model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i32>,
    pub temperature: Option<f64>,
    /// Base URL of an OpenAI-compatible upstream.
    pub base_url: Option<String>,
    /// The upstream API key (read from the environment variable the catalogue names).
    pub api_key: Option<String>,
    /// Functions the model may call.
    pub tools: Vec<ToolDefinition>,
    /// `none`, `auto`, `required` or `function` (then `tool_choice_function` names it).
    pub tool_choice: Option<String>,
    pub tool_choice_function: Option<String>,
    pub parallel_tool_calls: Option<bool>,
    /// The form the reply must take.
    pub response_format: Option<ResponseFormat>,
    /// Further sampling parameters, for an OpenAI-compatible upstream.
    pub options: Map<String, Value>,
}

impl ModelCall {
    /// The call of `request` to `upstream_model`, with no upstream address or key.
    pub fn for_request(request: &ChatRequest, upstream_model: &str) -> Self {
        // The edge wrote the options as a JSON object; anything else carries none.
        let options = request
            .options_json
            .as_deref()
            .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
            .unwrap_or_default();
        Self {
            upstream_model: upstream_model.to_owned(),
            messages: request.messages.clone(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            base_url: None,
            api_key: None,
            tools: request.tools.clone(),
            tool_choice: request.tool_choice.clone(),
            tool_choice_function: request.tool_choice_function.clone(),
            parallel_tool_calls: request.parallel_tool_calls,
            response_format: request.response_format.clone(),
            options,
        }
    }
}

/// What a provider streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// More reply text.
    Delta(String),
    /// A piece of a tool call the model makes.
    ToolCall(ToolCallDelta),
    /// The reply is complete. Token counts are the provider's own when it reports them.
    Done {
        finish_reason: String,
        input_tokens: Option<i64>,
        output_tokens: Option<i64>,
        /// Input tokens the provider served from its prompt cache (a part of `input_tokens`).
        cached_input_tokens: Option<i64>,
    },
}

/// A failed model call, with what the caller should be told.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    /// HTTP status for the caller.
    pub status: u16,
    /// OpenAI-style error code.
    pub code: String,
    pub message: String,
}

impl ProviderError {
    /// An upstream failure (502 to the caller).
    pub fn upstream(message: impl Into<String>) -> Self {
        Self {
            status: 502,
            code: "upstream_error".into(),
            message: message.into(),
        }
    }
}

/// A stream of provider events.
pub type EventStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;
