-- Sluice control plane: tenants, hashed API keys, the model catalogue and the schema registry.
-- Run by `sluice migrate` as the owning role. The runtime role (`sluice_app`) is subject to
-- row-level security on every tenant-owned table: a query that forgets its tenant filter still
-- sees only the tenant named in the transaction setting `sluice.tenant_id`.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- SHA-256 of the whole key, hex. The key itself is shown once, at creation, and never stored.
    key_hash    text NOT NULL UNIQUE,
    -- The first characters of the key, so people can tell their keys apart.
    prefix      text NOT NULL,
    name        text NOT NULL DEFAULT 'default',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- The model catalogue is global (not tenant-owned): every tenant may call every enabled model.
CREATE TABLE models (
    name                text PRIMARY KEY,
    provider            text NOT NULL CHECK (provider IN ('sim', 'openai')),
    upstream_model      text NOT NULL,
    -- OpenAI-compatible base URL (provider openai), e.g. https://api.openai.com/v1
    base_url            text,
    -- Name of the environment variable holding the upstream API key; the key is never stored here.
    api_key_env         text,
    context_window      integer NOT NULL CHECK (context_window > 0),
    -- Prices in micro-dollars per million tokens.
    input_price_micros  bigint NOT NULL DEFAULT 0 CHECK (input_price_micros >= 0),
    output_price_micros bigint NOT NULL DEFAULT 0 CHECK (output_price_micros >= 0),
    enabled             boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now()
);

INSERT INTO models (name, provider, upstream_model, context_window, input_price_micros, output_price_micros)
VALUES ('sim-small', 'sim', 'sim-small', 8192, 100000, 400000),
       ('sim-large', 'sim', 'sim-large', 65536, 1000000, 4000000);

-- Schema registry (Confluent-compatible REST API served by `sluice registry`).
CREATE TABLE registry_schemas (
    id          serial PRIMARY KEY,
    schema_text text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry_subject_versions (
    subject     text NOT NULL,
    version     integer NOT NULL,
    schema_id   integer NOT NULL REFERENCES registry_schemas (id),
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, version)
);

-- subject '' holds the global level.
CREATE TABLE registry_config (
    subject       text PRIMARY KEY,
    compatibility text NOT NULL
);

-- Row-level security on tenant-owned tables.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- Authentication runs before the tenant is known, so it is the one door through RLS: given a
-- key hash it answers with the tenant id and nothing else.
CREATE FUNCTION sluice_authenticate(p_key_hash text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT k.tenant_id
      FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
     WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL AND t.status = 'active'
$$;
REVOKE ALL ON FUNCTION sluice_authenticate(text) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT ON tenants, api_keys, models TO sluice_app;
        GRANT SELECT, INSERT, UPDATE ON registry_schemas, registry_subject_versions, registry_config TO sluice_app;
        GRANT USAGE ON SEQUENCE registry_schemas_id_seq TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_authenticate(text) TO sluice_app;
    END IF;
END
$$;
