-- The workflow registry: each published version keeps the intents it answers, its description
-- and the tenant tools its steps call (read from the definition when it is published), and a
-- tenant may turn any workflow it sees — a built-in one or its own — off or on again.

ALTER TABLE workflows ADD COLUMN description text NOT NULL DEFAULT '';
ALTER TABLE workflows ADD COLUMN intents text[] NOT NULL DEFAULT '{}';
ALTER TABLE workflows ADD COLUMN tools text[] NOT NULL DEFAULT '{}';

CREATE TABLE workflow_settings (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    enabled     boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);
ALTER TABLE workflow_settings ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON workflow_settings
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE ON workflow_settings TO sluice_app;
    END IF;
END
$$;
