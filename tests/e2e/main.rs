//! End-to-end suite: every test starts a real `sluice up` against the local stack (tansu,
//! ClickHouse, PostgreSQL, Redis) with its own topics, ports and tenants.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

mod accounts;
mod analytics;
mod backpressure;
mod bad_input;
mod bench;
mod billing;
mod chaos;
mod chat;
mod conformance;
mod dlq;
mod failover;
mod invoices;
mod isolation;
mod knowledge;
mod limits;
mod ordering;
mod registry;
mod replay;
mod scaling;
mod sql;
mod tool_adapters;
mod webhooks;
mod websocket;
mod workflow_runs;
mod workflows;
