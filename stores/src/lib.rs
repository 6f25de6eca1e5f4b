//! Sluice's stores: everything that knows a table.
//!
//! - [`postgres`]: the control plane. Every migration (tenants, hashed API keys, plans and
//!   subscriptions, the model catalogue, the schema registry's tables), the row-level-security
//!   helper ([`postgres::tenant_transaction`]), and the queries over those tables:
//!   [`postgres::tenants`], [`postgres::keys`] (the key lifecycle and what a key may do),
//!   [`postgres::plans`], [`postgres::users`] (users, roles, login sessions),
//!   [`postgres::audit`] (the append-only audit log), [`postgres::flags`] (feature flags,
//!   followed live),
//!   [`postgres::models`] (with the in-memory [`ModelCatalog`]), [`postgres::registry`] (the
//!   schema registry's storage) and [`postgres::claims`] (advisory-lock claims, such as an edge
//!   instance's replies partition).
//! - [`clickhouse`]: the facts. Connection settings, the DDL of database `sluice`, the one
//!   writer every ClickHouse write goes through, and the read queries ([`clickhouse::usage`]).
//! - [`billing`]: the price book, exact money, invoices (runs, previews, reading back) and
//!   finance's CSV exports, from both stores.
//! - [`export`]: a tenant's data export, from both stores.
//! - [`limits`]: the Redis counters behind rate limits and quotas, shared by every edge.
//! - [`Error`]: one error type, which says whose fault a failure is and whether a retry can
//!   help, so the runtime knows what to do with it.
//!
//! This crate depends only on `schemas`: the runtime, the operators, the sinks and the edge
//! read and write the stores through it.

pub mod billing;
pub mod clickhouse;
pub mod export;
pub mod limits;
pub mod postgres;

mod error;

pub use crate::clickhouse::{ClickHouse, ClickHouseConfig};
pub use error::{Error, Fault, Result};
pub use postgres::models::{ModelCatalog, ModelSpec, ProviderKind, AUTO_MODEL};
