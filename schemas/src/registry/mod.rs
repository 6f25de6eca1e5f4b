//! The Confluent-compatible schema registry, as far as records need it: the client Sluice uses
//! to talk to its own registry or any other Confluent-compatible one ([`client`]), and the
//! compatibility rules a new schema must pass ([`compatibility`]). The registry's storage is
//! in `sluice-stores` and its REST service in `sluice-edge`.

pub mod client;
pub mod compatibility;

pub use client::RegistryClient;
pub use compatibility::CompatibilityLevel;
