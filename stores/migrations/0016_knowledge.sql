-- A tenant's knowledge: documents uploaded through the API (by way of `sluice.documents`), cut
-- into chunks and indexed for full-text search with PostgreSQL's text search (a tsvector per
-- chunk, its title and heading weighted above its text, under a GIN index). The built-in tool
-- `search_knowledge` reads them in the tenant's own transaction, under row-level security.

CREATE TABLE documents (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL CHECK (length(id) BETWEEN 1 AND 200),
    title       text NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
    format      text NOT NULL CHECK (format IN ('text', 'markdown', 'html')),
    -- When the edge accepted the version indexed: an older one read again never replaces it.
    version_ms  bigint NOT NULL,
    chunks      integer NOT NULL CHECK (chunks >= 0),
    -- Deleted: the row stays (with no chunks) so that an older upload read again does not
    -- bring the document back.
    deleted     boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON documents
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE TABLE document_chunks (
    tenant_id    uuid NOT NULL,
    document_id  text NOT NULL,
    chunk        integer NOT NULL,
    heading      text,
    body         text NOT NULL,
    search       tsvector NOT NULL,
    PRIMARY KEY (tenant_id, document_id, chunk),
    FOREIGN KEY (tenant_id, document_id) REFERENCES documents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX document_chunks_search ON document_chunks USING gin (search);
ALTER TABLE document_chunks ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON document_chunks
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON documents, document_chunks TO sluice_app;
    END IF;
END
$$;
