//! The Confluent-compatible schema registry: a REST service stored in PostgreSQL
//! ([`service`]), the compatibility rules it enforces ([`compatibility`]) and the client Sluice
//! uses to talk to it or to any other Confluent-compatible registry ([`client`]).

pub mod client;
pub mod compatibility;
pub mod service;

pub use client::RegistryClient;
pub use compatibility::CompatibilityLevel;
