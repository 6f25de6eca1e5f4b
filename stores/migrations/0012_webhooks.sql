-- Tenants' webhook endpoints, and the log of every event delivered (or being retried) to each.
-- Events reach the delivery stage on a topic; a row here is written before the first attempt,
-- so a crash loses no delivery, and (endpoint, event) is unique, so an event read twice is
-- delivered once.

CREATE TABLE webhook_endpoints (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url          text NOT NULL CHECK (url ~ '^https?://[^\s]+$'),
    -- Signs every delivery (HMAC-SHA256); kept to sign with, shown once when made.
    secret       text NOT NULL,
    -- The event types sent to it; NULL: every type.
    events       text[],
    enabled      boolean NOT NULL DEFAULT true,
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);
ALTER TABLE webhook_endpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_endpoints
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE TABLE webhook_deliveries (
    -- The delivery id receivers deduplicate by: the same on every attempt.
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- The notifications topic the event came from: the stage reading it retries it.
    source_topic     text NOT NULL,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    -- The exact body sent on every attempt.
    body             text NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_status      integer,
    last_error       text,
    -- When the next attempt is due (a process attempting it holds it until a lease ends).
    next_attempt_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant_id, created_at);
ALTER TABLE webhook_deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_deliveries
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- Deliveries of every tenant from one notifications topic whose next attempt is due, for the
-- delivery stage's retries (it then works on each in its tenant's transaction).
CREATE FUNCTION sluice_due_webhook_deliveries(p_source_topic text, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT d.tenant_id, d.id FROM webhook_deliveries d
     WHERE d.state = 'pending' AND d.next_attempt_at <= now()
       AND d.source_topic = p_source_topic
     ORDER BY d.next_attempt_at LIMIT p_limit
$$;
REVOKE ALL ON FUNCTION sluice_due_webhook_deliveries(text, integer) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_endpoints TO sluice_app;
        GRANT SELECT, INSERT, UPDATE ON webhook_deliveries TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_due_webhook_deliveries(text, integer) TO sluice_app;
    END IF;
END
$$;
