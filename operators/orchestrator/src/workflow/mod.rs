//! Workflows: multi-step runs of model calls, tool calls, branches, parallel fan-out, waits and
//! hand-offs, defined in YAML (`workflows/*.yaml`). [`definition`] reads and checks a
//! definition; the shipped ones are compiled in ([`SHIPPED`]); [`engine`] runs them one step per
//! event on `sluice.workflow-events`, with the run's state ([`run`]) in every event.

pub mod definition;
pub mod engine;
pub mod run;

pub use definition::{load, DefinitionError, Workflow};
pub use engine::{Definitions, WorkflowEngine};

/// The workflows Sluice ships, as `(file name, YAML)`.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "workflows/complaint_handling.yaml",
        include_str!("../../../../workflows/complaint_handling.yaml"),
    ),
    (
        "workflows/create_order.yaml",
        include_str!("../../../../workflows/create_order.yaml"),
    ),
    (
        "workflows/customer_support.yaml",
        include_str!("../../../../workflows/customer_support.yaml"),
    ),
    (
        "workflows/faq.yaml",
        include_str!("../../../../workflows/faq.yaml"),
    ),
    (
        "workflows/lead_capture.yaml",
        include_str!("../../../../workflows/lead_capture.yaml"),
    ),
    (
        "workflows/order_management.yaml",
        include_str!("../../../../workflows/order_management.yaml"),
    ),
    (
        "workflows/technical_support.yaml",
        include_str!("../../../../workflows/technical_support.yaml"),
    ),
    (
        "workflows/track_order.yaml",
        include_str!("../../../../workflows/track_order.yaml"),
    ),
];

#[cfg(test)]
mod tests;
