-- Plans, subscriptions and the key lifecycle.
--
-- A plan names a tenant's limits; a tenant is subscribed to one plan (or none: no limits).
-- Keys can carry their own, tighter limits, expire, be revoked, and be rotated (the old key
-- stays valid for a grace period, recorded as a revocation in the future).
-- Edges cache what a key may do; every change that affects it is announced on the channel
-- `sluice_auth` (payload: the key's hash, or '*' for every key), so edges forget it at once.

-- Plans are global (every tenant may be subscribed to any): no row-level security.
CREATE TABLE plans (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    -- NULL: no limit of that kind.
    requests_per_minute integer CHECK (requests_per_minute > 0),
    tokens_per_minute   integer CHECK (tokens_per_minute > 0),
    monthly_tokens      bigint CHECK (monthly_tokens > 0),
    max_concurrent      integer CHECK (max_concurrent > 0),
    -- NULL: every enabled model.
    allowed_models      text[],
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One plan per tenant. Periods are calendar months (UTC); changing the plan takes effect at
-- once and keeps the tokens already used this month.
CREATE TABLE subscriptions (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    plan_id     uuid NOT NULL REFERENCES plans (id),
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_plan ON subscriptions (plan_id);

ALTER TABLE subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON subscriptions
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- Per-key limits (NULL: only the plan's apply), expiry, and rotation's link to the new key.
ALTER TABLE api_keys
    ADD COLUMN expires_at          timestamptz,
    ADD COLUMN requests_per_minute integer CHECK (requests_per_minute > 0),
    ADD COLUMN tokens_per_minute   integer CHECK (tokens_per_minute > 0),
    ADD COLUMN max_concurrent      integer CHECK (max_concurrent > 0),
    ADD COLUMN allowed_models      text[],
    ADD COLUMN replaced_by         uuid REFERENCES api_keys (id);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

-- A key is valid until its revocation (which rotation sets in the future: the grace period)
-- and its expiry. Replaces the first version, which knew neither.
CREATE OR REPLACE FUNCTION sluice_authenticate(p_key_hash text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT k.tenant_id
      FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
     WHERE k.key_hash = p_key_hash
       AND (k.revoked_at IS NULL OR k.revoked_at > now())
       AND (k.expires_at IS NULL OR k.expires_at > now())
       AND t.status = 'active'
$$;

-- What a valid key may do: its tenant, its own limits and its tenant's plan's, and until when
-- the answer holds (the earlier of revocation and expiry). The one door through row-level
-- security before the tenant is known, as `sluice_authenticate` is.
CREATE FUNCTION sluice_authorize(p_key_hash text) RETURNS TABLE (
    tenant_id                uuid,
    key_id                   uuid,
    valid_until              timestamptz,
    key_requests_per_minute  integer,
    key_tokens_per_minute    integer,
    key_max_concurrent       integer,
    key_allowed_models       text[],
    plan_name                text,
    plan_requests_per_minute integer,
    plan_tokens_per_minute   integer,
    plan_monthly_tokens      bigint,
    plan_max_concurrent      integer,
    plan_allowed_models      text[]
)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT k.tenant_id, k.id, least(k.revoked_at, k.expires_at),
           k.requests_per_minute, k.tokens_per_minute, k.max_concurrent, k.allowed_models,
           p.name, p.requests_per_minute, p.tokens_per_minute, p.monthly_tokens,
           p.max_concurrent, p.allowed_models
      FROM api_keys k
      JOIN tenants t ON t.id = k.tenant_id
      LEFT JOIN subscriptions s ON s.tenant_id = k.tenant_id
      LEFT JOIN plans p ON p.id = s.plan_id
     WHERE k.key_hash = p_key_hash
       AND (k.revoked_at IS NULL OR k.revoked_at > now())
       AND (k.expires_at IS NULL OR k.expires_at > now())
       AND t.status = 'active'
$$;
REVOKE ALL ON FUNCTION sluice_authorize(text) FROM PUBLIC;

-- Announcements to the edges' caches.
CREATE FUNCTION sluice_announce_key_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_auth', OLD.key_hash);
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_announce AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION sluice_announce_key_change();

CREATE FUNCTION sluice_announce_all_keys() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_auth', '*');
    RETURN NULL;
END
$$;
CREATE TRIGGER plans_announce AFTER UPDATE OR DELETE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_all_keys();
CREATE TRIGGER subscriptions_announce AFTER INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_all_keys();
CREATE TRIGGER tenants_announce AFTER UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_all_keys();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT ON plans, subscriptions TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_authorize(text) TO sluice_app;
    END IF;
END
$$;
