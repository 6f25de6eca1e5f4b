-- Hardening of migrations 3 and 4.

-- The runtime role is recognised by membership, not by name, so a login role that inherits
-- `sluice_app` is held to the same rule.
CREATE OR REPLACE FUNCTION sluice_tenant_update_is_deletion() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF pg_has_role(current_user, 'sluice_app', 'MEMBER')
       AND NOT pg_has_role(current_user, (SELECT tableowner FROM pg_tables WHERE tablename = 'tenants' AND schemaname = 'public'), 'MEMBER')
       AND (NEW.status <> 'deleted' OR NEW.name <> OLD.name OR NEW.id <> OLD.id) THEN
        RAISE EXCEPTION 'the runtime role may only mark its tenant deleted';
    END IF;
    RETURN NEW;
END
$$;

-- The audit log: no role deletes or truncates entries either.
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION sluice_audit_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_audit_is_append_only();

-- Self-registration onto a plan: a new tenant, its first admin, and its subscription to
-- `p_plan` (which must exist), so a self-registered tenant is never without limits.
CREATE FUNCTION sluice_register_on_plan(p_tenant text, p_email text, p_password_hash text, p_plan text)
    RETURNS TABLE (tenant_id uuid, user_id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    v_plan uuid;
    v_tenant uuid;
    v_user uuid;
BEGIN
    SELECT id INTO v_plan FROM plans WHERE name = p_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the registration plan % does not exist', p_plan USING ERRCODE = '23514';
    END IF;
    INSERT INTO tenants (name) VALUES (p_tenant) RETURNING id INTO v_tenant;
    INSERT INTO users (tenant_id, email, password_hash, role)
        VALUES (v_tenant, lower(p_email), p_password_hash, 'tenant_admin') RETURNING id INTO v_user;
    INSERT INTO subscriptions (tenant_id, plan_id) VALUES (v_tenant, v_plan);
    RETURN QUERY SELECT v_tenant, v_user;
END
$$;
REVOKE ALL ON FUNCTION sluice_register_on_plan(text, text, text, text) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT EXECUTE ON FUNCTION sluice_register_on_plan(text, text, text, text) TO sluice_app;
    END IF;
END
$$;
