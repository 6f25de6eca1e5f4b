-- Workflow runs as their callers and the timeout sweep see them: each run's status (running,
-- waiting, ended, handed_off, failed), its last step and, once it has ended, its reply. A run
-- waiting for an external event keeps the event it waits for, its deadline and its state (the
-- waiting event's snapshot), from which a signal or the timeout resumes it. The events
-- themselves are on `sluice.workflow-events`; this is the index of them a caller can query.

CREATE TABLE workflow_runs (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    run_id          text NOT NULL CHECK (length(run_id) BETWEEN 1 AND 200),
    workflow        text NOT NULL,
    version         integer NOT NULL,
    status          text NOT NULL CHECK (status IN ('running', 'waiting', 'ended', 'handed_off', 'failed')),
    step            text,
    -- The sequence number of the run's latest event this row reflects.
    seq             integer NOT NULL,
    reply           text,
    -- While waiting: the event, the deadline, and the state to resume from.
    waiting_event   text,
    wait_deadline   timestamptz,
    state_json      text,
    -- When the timeout sweep last asked the stage to resume it (it asks again only after a
    -- while, so a lagging stage is not flooded).
    timeout_sent_at timestamptz,
    -- The events topic of the deployment running it (deployments that share this database
    -- under other topic prefixes leave its timeout alone).
    events_topic    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, run_id)
);
CREATE INDEX workflow_runs_due ON workflow_runs (wait_deadline) WHERE status = 'waiting';
ALTER TABLE workflow_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON workflow_runs
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- Claims the waits past their deadline, across tenants, for the timeout sweep: each at most
-- once every `p_again_s` seconds (the stage resumes it in its tenant's own transaction; a
-- sweep of another instance skips the rows this one holds).
CREATE FUNCTION sluice_due_waits(p_limit integer, p_again_s integer, p_topic text)
    RETURNS TABLE (tenant_id uuid, run_id text, seq integer)
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public AS $$
    UPDATE workflow_runs r SET timeout_sent_at = now()
      FROM (SELECT w.tenant_id, w.run_id FROM workflow_runs w
             WHERE w.status = 'waiting' AND w.wait_deadline <= now() AND w.events_topic = p_topic
               AND (w.timeout_sent_at IS NULL
                    OR w.timeout_sent_at < now() - make_interval(secs => p_again_s))
             ORDER BY w.wait_deadline LIMIT p_limit
             FOR UPDATE SKIP LOCKED) due
     WHERE r.tenant_id = due.tenant_id AND r.run_id = due.run_id
    RETURNING r.tenant_id, r.run_id, r.seq
$$;
REVOKE ALL ON FUNCTION sluice_due_waits(integer, integer, text) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE ON workflow_runs TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_due_waits(integer, integer, text) TO sluice_app;
    END IF;
END
$$;
