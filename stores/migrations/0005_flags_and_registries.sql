-- Feature flags, and the registries of tools and workflows.
--
-- A flag is global (tenant_id NULL) or a tenant's own setting, which overrides the global one.
-- Every change is announced on `sluice_flags`, so edges and operators apply it without a
-- restart.

CREATE TABLE feature_flags (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    enabled     boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX feature_flags_global ON feature_flags (name) WHERE tenant_id IS NULL;
CREATE UNIQUE INDEX feature_flags_tenant ON feature_flags (name, tenant_id) WHERE tenant_id IS NOT NULL;

-- Global flags are everyone's to read; a tenant's own settings are its alone.
ALTER TABLE feature_flags ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feature_flags
    USING (tenant_id IS NULL OR tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE FUNCTION sluice_announce_flags() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_flags', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER feature_flags_announce AFTER INSERT OR UPDATE OR DELETE ON feature_flags
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_flags();

-- Every flag setting, for the processes that apply them to all tenants (they cannot read
-- tenants' rows through row-level security).
CREATE FUNCTION sluice_feature_flags()
    RETURNS TABLE (name text, tenant_id uuid, enabled boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT name, tenant_id, enabled FROM feature_flags
$$;
REVOKE ALL ON FUNCTION sluice_feature_flags() FROM PUBLIC;

-- Tools a workflow may call: built-in ones (tenant_id NULL) and a tenant's own.
CREATE TABLE tools (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    kind        text NOT NULL CHECK (kind IN ('builtin', 'http')),
    config      jsonb NOT NULL DEFAULT '{}',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tools_name ON tools (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name);
ALTER TABLE tools ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tools
    USING (tenant_id IS NULL OR tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- Workflow definitions, versioned: a run names the version it follows.
CREATE TABLE workflows (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    version     integer NOT NULL CHECK (version > 0),
    definition  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX workflows_version ON workflows (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name, version);
ALTER TABLE workflows ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON workflows
    USING (tenant_id IS NULL OR tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT ON feature_flags, tools, workflows TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_feature_flags() TO sluice_app;
    END IF;
END
$$;
