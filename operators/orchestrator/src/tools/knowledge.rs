//! The knowledge tool's index: the stage that keeps a tenant's documents searchable. It reads
//! `sluice.documents` (each upload cut into chunks by the edge, or a deletion) and replaces the
//! document's indexed chunks in PostgreSQL in one transaction, unless a newer version is there
//! already — so a record read again after a crash, or out of date, changes nothing. The search
//! itself is the built-in tool `search_knowledge` ([`super::builtin`]).

use async_trait::async_trait;
use sluice_pipelines::{Emitter, ProcessError, RecordContext, RecordOperator};
use sluice_schemas::Document;
use sluice_stores::postgres::{knowledge, tenant_transaction};
use sqlx::{types::Uuid, PgPool};

/// The knowledge stage's operator: `sluice.documents` → `documents`, `document_chunks`.
pub struct KnowledgeIndexer {
    app: PgPool,
}

impl KnowledgeIndexer {
    pub fn new(app: PgPool) -> Self {
        Self { app }
    }
}

#[async_trait]
impl RecordOperator for KnowledgeIndexer {
    type Input = Document;

    async fn process(
        &self,
        document: Document,
        _ctx: &RecordContext,
        _out: &mut Emitter,
    ) -> Result<(), ProcessError> {
        let tenant = Uuid::parse_str(&document.tenant_id).map_err(|e| {
            ProcessError::Poison(format!("tenant id {:?}: {e}", document.tenant_id))
        })?;
        let version = knowledge::Version {
            id: &document.document_id,
            title: &document.title,
            format: &document.format,
            version_ms: document.version_ms,
            deleted: document.deleted,
            chunks: document
                .chunks
                .iter()
                .map(|c| (c.heading.as_deref(), c.text.as_str()))
                .collect(),
        };
        let mut tx = tenant_transaction(&self.app, tenant).await?;
        let applied = knowledge::apply(&mut tx, tenant, &version).await?;
        tx.commit().await.map_err(sluice_stores::Error::from)?;
        tracing::debug!(tenant = %tenant, document = %document.document_id, applied, chunks = document.chunks.len(), "document indexed");
        Ok(())
    }
}
