-- Users and roles, login sessions, the access tokens' signing key, and the audit log.
--
-- Roles: a platform admin (no tenant) runs Sluice; a tenant admin manages its tenant's keys,
-- members and plan-bound settings; a member uses the API. Passwords are stored as argon2id
-- hashes (PHC strings). Sessions are refresh tokens, stored as their SHA-256, rotated on every
-- use; a token used twice revokes its whole family (someone else has a copy).
-- The runtime role reaches users before their tenant is known, and sessions at all, only
-- through the SECURITY DEFINER functions below, each doing one narrow thing.

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- NULL only for platform admins.
    tenant_id     uuid REFERENCES tenants (id) ON DELETE CASCADE,
    email         text NOT NULL UNIQUE CHECK (email = lower(email) AND position('@' IN email) > 1 AND length(email) <= 254),
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('platform_admin', 'tenant_admin', 'member')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz,
    CHECK ((role = 'platform_admin') = (tenant_id IS NULL))
);
CREATE INDEX users_tenant ON users (tenant_id);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE TABLE sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the refresh token, hex.
    token_hash  text NOT NULL UNIQUE,
    -- Every rotation of one login shares its family.
    family      uuid NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_family ON sessions (family);
-- Only the functions below touch sessions; RLS with no policy shows the runtime role nothing.
ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;

-- The key access tokens are signed with (HMAC-SHA256), shared by every edge. `sluice migrate`
-- creates one when there is none.
CREATE TABLE token_signing_keys (
    kid         text PRIMARY KEY,
    secret      bytea NOT NULL CHECK (length(secret) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE token_signing_keys ENABLE ROW LEVEL SECURITY;

-- Append-only: the runtime role may add and (through RLS) read its tenant's entries, never
-- change them; nobody may update one.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    -- NULL: a platform-level action (a plan changed).
    tenant_id   uuid REFERENCES tenants (id) ON DELETE SET NULL,
    -- Who: `user:<email>`, `key:<prefix>`, `cli:<operator>`.
    actor       text NOT NULL,
    -- What: `key.create`, `key.revoke`, `member.add`, `plan.update`, ...
    action      text NOT NULL,
    target      text,
    detail      jsonb NOT NULL DEFAULT '{}',
    -- From where: the caller's address, or the operator's host.
    source      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE FUNCTION sluice_audit_is_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION sluice_audit_is_append_only();

-- Login: a user by email, before the tenant is known. Disabled users and disabled tenants are
-- not found.
CREATE FUNCTION sluice_user_for_login(p_email text)
    RETURNS TABLE (user_id uuid, tenant_id uuid, role text, password_hash text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT u.id, u.tenant_id, u.role, u.password_hash
      FROM users u LEFT JOIN tenants t ON t.id = u.tenant_id
     WHERE u.email = lower(p_email) AND u.disabled_at IS NULL
       AND (u.tenant_id IS NULL OR t.status = 'active')
$$;

-- Self-registration: a new tenant and its first admin, in one step. The tenant's name and the
-- email must both be free (unique violations are raised to the caller).
CREATE FUNCTION sluice_register(p_tenant text, p_email text, p_password_hash text)
    RETURNS TABLE (tenant_id uuid, user_id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    v_tenant uuid;
    v_user uuid;
BEGIN
    INSERT INTO tenants (name) VALUES (p_tenant) RETURNING id INTO v_tenant;
    INSERT INTO users (tenant_id, email, password_hash, role)
        VALUES (v_tenant, lower(p_email), p_password_hash, 'tenant_admin') RETURNING id INTO v_user;
    RETURN QUERY SELECT v_tenant, v_user;
END
$$;

-- A new session (login) for a user.
CREATE FUNCTION sluice_session_start(p_user uuid, p_token_hash text, p_expires_at timestamptz)
    RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = public AS $$
    INSERT INTO sessions (user_id, token_hash, family, expires_at)
    VALUES (p_user, p_token_hash, gen_random_uuid(), p_expires_at)
$$;

-- Rotation: the session of `p_old_hash` is used up and `p_new_hash` continues its family.
-- Outcome: 'ok' (with the user), 'invalid' (unknown, expired, revoked, or the user or tenant
-- is disabled), or 'reused' (the token was already used: its whole family is revoked).
CREATE FUNCTION sluice_session_rotate(p_old_hash text, p_new_hash text, p_expires_at timestamptz)
    RETURNS TABLE (outcome text, user_id uuid, tenant_id uuid, role text, email text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    s sessions%ROWTYPE;
    u users%ROWTYPE;
BEGIN
    SELECT * INTO s FROM sessions WHERE token_hash = p_old_hash FOR UPDATE;
    IF NOT FOUND OR s.revoked_at IS NOT NULL OR s.expires_at <= now() THEN
        RETURN QUERY SELECT 'invalid'::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF s.used_at IS NOT NULL THEN
        UPDATE sessions SET revoked_at = now() WHERE family = s.family AND revoked_at IS NULL;
        RETURN QUERY SELECT 'reused'::text, s.user_id, NULL::uuid, NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO u FROM users WHERE id = s.user_id;
    IF u.disabled_at IS NOT NULL OR (u.tenant_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM tenants t WHERE t.id = u.tenant_id AND t.status = 'active')) THEN
        RETURN QUERY SELECT 'invalid'::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text;
        RETURN;
    END IF;
    UPDATE sessions SET used_at = now() WHERE id = s.id;
    INSERT INTO sessions (user_id, token_hash, family, expires_at)
        VALUES (s.user_id, p_new_hash, s.family, p_expires_at);
    RETURN QUERY SELECT 'ok'::text, u.id, u.tenant_id, u.role, u.email;
END
$$;

-- Logout: the session's whole family ends. Returns whether the token was known.
CREATE FUNCTION sluice_session_end(p_token_hash text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    v_family uuid;
BEGIN
    SELECT family INTO v_family FROM sessions WHERE token_hash = p_token_hash;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE sessions SET revoked_at = now() WHERE family = v_family AND revoked_at IS NULL;
    RETURN true;
END
$$;

-- The keys access tokens are signed and checked with.
CREATE FUNCTION sluice_token_signing_keys()
    RETURNS TABLE (kid text, secret bytea)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT kid, secret FROM token_signing_keys ORDER BY created_at DESC, kid
$$;

REVOKE ALL ON FUNCTION sluice_user_for_login(text), sluice_register(text, text, text),
    sluice_session_start(uuid, text, timestamptz), sluice_session_rotate(text, text, timestamptz),
    sluice_session_end(text), sluice_token_signing_keys() FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        -- Tenant admins manage their tenant's keys and members through the edge; RLS keeps
        -- every write to the tenant named in the transaction.
        GRANT INSERT, UPDATE ON api_keys TO sluice_app;
        GRANT SELECT, INSERT, UPDATE ON users TO sluice_app;
        GRANT SELECT, INSERT ON audit_log TO sluice_app;
        GRANT USAGE ON SEQUENCE audit_log_id_seq TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_user_for_login(text), sluice_register(text, text, text),
            sluice_session_start(uuid, text, timestamptz),
            sluice_session_rotate(text, text, timestamptz), sluice_session_end(text),
            sluice_token_signing_keys() TO sluice_app;
    END IF;
END
$$;
