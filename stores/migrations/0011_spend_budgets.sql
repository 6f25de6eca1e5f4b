-- Monthly spend budgets, enforced at the edge: a tenant's own (key_id NULL) and any of its
-- keys'. Amounts are micro-units of the billing currency; spend is usage priced by the price
-- book (a plan's base fee is not spend). `alert_percent`: the share of the budget at which the
-- budget counts as alerting (NULL: never).
CREATE TABLE spend_budgets (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id          uuid REFERENCES api_keys (id) ON DELETE CASCADE,
    monthly_micros  bigint NOT NULL CHECK (monthly_micros > 0),
    alert_percent   smallint CHECK (alert_percent BETWEEN 1 AND 100),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX spend_budgets_holder
    ON spend_budgets (tenant_id, coalesce(key_id, '00000000-0000-0000-0000-000000000000'::uuid));
ALTER TABLE spend_budgets ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON spend_budgets
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- A budget changes what every key of its tenant may do: the edges drop their cached grants.
CREATE TRIGGER spend_budgets_announce AFTER INSERT OR UPDATE OR DELETE ON spend_budgets
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_all_keys();

-- The price book's changes, announced to the processes that keep it in memory.
CREATE FUNCTION sluice_announce_prices() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_prices', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER price_versions_announce AFTER INSERT ON price_versions
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_prices();
CREATE TRIGGER billing_settings_announce AFTER UPDATE ON billing_settings
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_announce_prices();

-- What a valid key may do (migration 2), now with the spend budgets of its tenant and its own.
DROP FUNCTION sluice_authorize(text);
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
    plan_allowed_models      text[],
    tenant_spend_micros      bigint,
    tenant_spend_alert       smallint,
    key_spend_micros         bigint,
    key_spend_alert          smallint
)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT k.tenant_id, k.id, least(k.revoked_at, k.expires_at),
           k.requests_per_minute, k.tokens_per_minute, k.max_concurrent, k.allowed_models,
           p.name, p.requests_per_minute, p.tokens_per_minute, p.monthly_tokens,
           p.max_concurrent, p.allowed_models,
           tb.monthly_micros, tb.alert_percent, kb.monthly_micros, kb.alert_percent
      FROM api_keys k
      JOIN tenants t ON t.id = k.tenant_id
      LEFT JOIN subscriptions s ON s.tenant_id = k.tenant_id
      LEFT JOIN plans p ON p.id = s.plan_id
      LEFT JOIN spend_budgets tb ON tb.tenant_id = k.tenant_id AND tb.key_id IS NULL
      LEFT JOIN spend_budgets kb ON kb.tenant_id = k.tenant_id AND kb.key_id = k.id
     WHERE k.key_hash = p_key_hash
       AND (k.revoked_at IS NULL OR k.revoked_at > now())
       AND (k.expires_at IS NULL OR k.expires_at > now())
       AND t.status = 'active'
$$;
REVOKE ALL ON FUNCTION sluice_authorize(text) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON spend_budgets TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_authorize(text) TO sluice_app;
    END IF;
END
$$;
