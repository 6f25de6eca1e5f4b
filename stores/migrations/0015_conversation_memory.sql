-- Conversation memory: the turns of a session whose caller asked Sluice to remember it, written
-- by the stage that answered them (once per request), read by the edge to put a session's
-- history before a new turn. A session belongs to the key or user that made it: another key of
-- the same tenant naming the same session id has a session of its own.

CREATE TABLE conversation_turns (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    session_id   text NOT NULL CHECK (length(session_id) BETWEEN 1 AND 200),
    -- `key:<id>` or `user:<id>`: whose session it is.
    caller       text NOT NULL,
    -- The request that made the turn: a request answered twice (a redelivery) is one turn.
    request_id   text NOT NULL,
    -- [ChatMessage, …]: the turn's own messages (the caller's, then the assistant's reply).
    messages     jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, request_id)
);
CREATE INDEX conversation_turns_session ON conversation_turns (tenant_id, caller, session_id, created_at DESC);
ALTER TABLE conversation_turns ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON conversation_turns
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, DELETE ON conversation_turns TO sluice_app;
    END IF;
END
$$;
