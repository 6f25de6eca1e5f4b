//! Sluice's record contracts.
//!
//! This crate owns everything about the bytes on Sluice's topics: the `.avsc` files in
//! `schemas/avro/` (the source of truth), the Rust [`records`], Avro encoding and decoding in the
//! Confluent wire format ([`codec`], [`wire`]), the schema registry's client and compatibility
//! rules ([`registry`]), and Sluice's token counter ([`tokens`]), the unit usage is measured in.

pub mod codec;
pub mod records;
pub mod registry;
pub mod tokens;
pub mod wire;

pub use codec::Codec;
pub use records::{
    ChatMessage, ChatRequest, DeadLetter, Document, DocumentChunk, Notification, Record,
    ReplyAddress, ReplyChunk, ReplyKind, ResponseFormat, RoutedRequest, RoutingDecision, ToolCall,
    ToolCallAssembler, ToolCallDelta, ToolDefinition, ToolInvocation, ToolOutcome, UsageEvent,
    WindowResult, WorkflowEvent,
};
pub use registry::RegistryClient;

/// What can go wrong with records and schemas.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not in the Confluent wire format (the producer's fault; not retriable).
    #[error("not a wire-format record: {0}")]
    Wire(String),
    /// The Avro body does not decode with the writer's schema (not retriable).
    #[error("cannot decode record: {0}")]
    Decode(String),
    /// A value does not fit its schema (a bug in the caller).
    #[error("cannot encode record: {0}")]
    Encode(String),
    /// The registry refused or could not be reached (`status` 0: unreachable).
    #[error("schema registry ({status}): {message}")]
    Registry { status: u16, message: String },
    /// Something that should not happen.
    #[error("bug: {0}")]
    Bug(String),
}

impl Error {
    /// Whether trying again later can help (registry unreachable or failing on its side).
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Registry { status, .. } if *status == 0 || *status >= 500)
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
