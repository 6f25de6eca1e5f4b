-- The platform admin's API, served by the edge as the runtime role to users whose session
-- says `platform_admin`: plans (global, no row-level security) are written by the runtime
-- role; a tenant is created and subscribed inside its own row-level-security transaction; the
-- platform's actions go to the audit log with no tenant; every tenant, and how many tenants
-- each plan has, are read through narrow functions (the runtime role sees no tenant's row
-- otherwise).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT INSERT, UPDATE, DELETE ON plans TO sluice_app;
        GRANT INSERT, UPDATE, DELETE ON subscriptions TO sluice_app;
        GRANT INSERT (id, name) ON tenants TO sluice_app;
    END IF;
END
$$;

-- Platform-level entries (no tenant) may be added; they are read by operators only.
CREATE POLICY platform_entries ON audit_log FOR INSERT WITH CHECK (tenant_id IS NULL);

CREATE FUNCTION sluice_platform_tenants()
    RETURNS TABLE (id uuid, name text, status text, plan text, created_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT t.id, t.name, t.status, p.name, t.created_at
      FROM tenants t
      LEFT JOIN subscriptions s ON s.tenant_id = t.id
      LEFT JOIN plans p ON p.id = s.plan_id
     ORDER BY t.name
$$;
REVOKE ALL ON FUNCTION sluice_platform_tenants() FROM PUBLIC;

CREATE FUNCTION sluice_plan_subscribers()
    RETURNS TABLE (plan_id uuid, tenants bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT plan_id, count(*) FROM subscriptions GROUP BY plan_id
$$;
REVOKE ALL ON FUNCTION sluice_plan_subscribers() FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT EXECUTE ON FUNCTION sluice_platform_tenants(), sluice_plan_subscribers() TO sluice_app;
    END IF;
END
$$;
