//! The knowledge stage: `sluice.documents` → the tenant's searchable documents in PostgreSQL
//! (`documents`, `document_chunks`), keyed by tenant and document: one document's versions in
//! order, different documents concurrently.

use std::sync::Arc;

use sluice_orchestrator::tools::knowledge::KnowledgeIndexer;
use sluice_pipelines::{runtime::StageSpec, Runnable};

use crate::config::Config;

pub fn build(config: &Config) -> anyhow::Result<Runnable> {
    let topics = config.kafka.topics();
    let app = sluice_stores::postgres::connect_lazy(
        &config.postgres.url,
        config.postgres.max_connections,
        std::time::Duration::from_millis(500),
    )?;
    let spec = StageSpec::new(config.kafka.wiring("knowledge", &topics.documents));
    Ok(Runnable::record_operator(
        Arc::new(KnowledgeIndexer::new(app)),
        spec,
    ))
}
