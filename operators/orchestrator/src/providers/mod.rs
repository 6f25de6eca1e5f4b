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
use sluice_schemas::ChatMessage;

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
}

/// What a provider streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// More reply text.
    Delta(String),
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
