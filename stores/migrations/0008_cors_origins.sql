-- The browser origins a tenant's keys and tokens may be used from (CORS). A request that
-- carries an `Origin` header is served only if the caller's tenant lists that origin (or `*`);
-- requests without one (servers, SDKs) are not affected. A tenant's admins keep the list.

CREATE TABLE tenant_origins (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    origin      text NOT NULL CHECK (origin = '*' OR origin ~ '^https?://[a-z0-9.-]+(:[0-9]{1,5})?$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, origin)
);
ALTER TABLE tenant_origins ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_origins
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE FUNCTION sluice_announce_origins() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_origins', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_origins_announce AFTER INSERT OR UPDATE OR DELETE ON tenant_origins
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_origins();

-- Every active tenant's origins, for the edges (a preflight request carries no credentials,
-- so an edge answers it from all tenants' lists).
CREATE FUNCTION sluice_cors_origins()
    RETURNS TABLE (tenant_id uuid, origin text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT o.tenant_id, o.origin FROM tenant_origins o
      JOIN tenants t ON t.id = o.tenant_id
     WHERE t.status = 'active'
$$;
REVOKE ALL ON FUNCTION sluice_cors_origins() FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, DELETE ON tenant_origins TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_cors_origins() TO sluice_app;
    END IF;
END
$$;
