//! Tool adapters: how a workflow's tool calls reach the systems they act on, and what guards
//! each call ([`resilience`]: bulkhead, circuit breaker per tool and tenant, timeout, retries
//! with backoff and jitter for retriable failures only, idempotency keys kept across attempts).
//!
//! - [`builtin`]: lookups and writes of a tenant's customers, orders and tickets in PostgreSQL.
//! - [`http`]: an endpoint a tenant configures (URL template, method, bearer token from the
//!   environment, JSON arguments and result).
//! - [`knowledge`]: the index behind the built-in `search_knowledge`: a tenant's documents in
//!   chunks, kept by the knowledge stage from `sluice.documents`.

pub mod builtin;
pub mod http;
pub mod knowledge;
pub mod resilience;

pub use builtin::BuiltinTools;
pub use http::{HttpTool, HttpToolConfig, Reach};
pub use resilience::{BreakerState, Failure, Resilience, ResilienceConfig, ToolError};
