-- Billing: the price book (versioned, never re-pricing the past), invoices that are final once
-- written, and their gapless numbering.
--
-- Money is never a float. Prices are integers in micro-units of the currency (a millionth of
-- a dollar): per million tokens for models, per call or run for tools and workflows, per month
-- for a plan's base fee and its included usage. Invoice amounts are integers in the currency's
-- minor unit (cents), each line rounded once from its exact amount.

-- The one currency every price and invoice is in. It can change only while no invoice exists.
CREATE TABLE billing_settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    currency    text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$')
);
INSERT INTO billing_settings DEFAULT VALUES;

-- The price book: versions of each billable item's price. The version in force at an instant
-- is the one with the latest `valid_from` at or before it, so versions never overlap and
-- usage is priced by when it happened. Versions are never changed or removed, and a version
-- may not start before the moment it is added: a price change never re-prices usage that has
-- already happened. Usage of an item with no version in force is unpriced (billed at zero, and
-- an invoice run says so).
CREATE TABLE price_versions (
    id                    bigserial PRIMARY KEY,
    -- 'model:<name>', 'tool:<name>', 'workflow:<name>' ('tool:*' and 'workflow:*' price every
    -- tool or workflow without its own price) or 'plan:<name>'.
    item                  text NOT NULL CHECK (item ~ '^(model|tool|workflow|plan):.+$'),
    input_per_mtok        bigint NOT NULL DEFAULT 0 CHECK (input_per_mtok >= 0),
    output_per_mtok       bigint NOT NULL DEFAULT 0 CHECK (output_per_mtok >= 0),
    cached_input_per_mtok bigint NOT NULL DEFAULT 0 CHECK (cached_input_per_mtok >= 0),
    -- A tool call's or a workflow run's price; a plan's monthly base fee.
    per_unit              bigint NOT NULL DEFAULT 0 CHECK (per_unit >= 0),
    -- A plan's usage included in its base fee each month; usage beyond it is overage.
    included              bigint NOT NULL DEFAULT 0 CHECK (included >= 0),
    valid_from            timestamptz NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (item, valid_from)
);

-- Today's catalogue prices become the first versions, in force since always (the only
-- versions ever to start in the past).
INSERT INTO price_versions (item, input_per_mtok, output_per_mtok, valid_from)
SELECT 'model:' || name, input_price_micros, output_price_micros, timestamptz '1970-01-01 00:00:00+00'
  FROM models;

CREATE FUNCTION sluice_price_versions_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'price versions are never changed or removed; add a new version';
    END IF;
    IF NEW.valid_from < now() THEN
        RAISE EXCEPTION 'a new price for % cannot start before now (it would re-price usage that already happened)', NEW.item;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER price_versions_append_only BEFORE INSERT OR UPDATE OR DELETE ON price_versions
    FOR EACH ROW EXECUTE FUNCTION sluice_price_versions_append_only();

-- Who issues invoices, and the next number of each: taken and increased in the transaction
-- that writes the invoice, so a failed invoice leaves no gap.
CREATE TABLE invoice_issuers (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9_-]{1,40}$'),
    prefix      text NOT NULL CHECK (length(prefix) <= 20),
    next_number bigint NOT NULL DEFAULT 1 CHECK (next_number > 0)
);
INSERT INTO invoice_issuers (id, prefix) VALUES ('default', 'INV-');

-- The periods an invoice run has closed: usage of a closed period that arrives later goes on
-- the next invoice as an adjustment.
CREATE TABLE invoice_runs (
    period      date PRIMARY KEY CHECK (extract(day FROM period) = 1),
    issuer_id   text NOT NULL REFERENCES invoice_issuers (id),
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

-- Invoices outlive their tenants (no foreign key: a purged tenant's invoices stay, with the
-- name it had). Final when written: never changed, never removed.
CREATE TABLE invoices (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    tenant_name     text NOT NULL,
    issuer_id       text NOT NULL REFERENCES invoice_issuers (id),
    sequence        bigint NOT NULL,
    number          text NOT NULL UNIQUE,
    -- The first day of the calendar month (UTC) it bills.
    period          date NOT NULL CHECK (extract(day FROM period) = 1),
    currency        text NOT NULL,
    plan_name       text,
    plan_version_id bigint REFERENCES price_versions (id),
    total_minor     bigint NOT NULL,
    -- Usage facts written up to this moment were read.
    usage_read_at   timestamptz NOT NULL,
    finalized_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, period),
    UNIQUE (issuer_id, sequence)
);
CREATE INDEX invoices_period ON invoices (period);

CREATE TABLE invoice_lines (
    invoice_id          uuid NOT NULL REFERENCES invoices (id),
    position            integer NOT NULL,
    tenant_id           uuid NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('base_fee', 'usage', 'tool_calls', 'workflow_runs', 'included_usage')),
    -- The period whose usage or fee the line bills; before the invoice's own period, the line
    -- is an adjustment: what that period's invoice would have said with usage that came late.
    for_period          date NOT NULL,
    adjustment          boolean NOT NULL,
    description         text NOT NULL,
    -- The model, tool, workflow or plan.
    item                text,
    price_version_id    bigint REFERENCES price_versions (id),
    requests            bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    -- The exact amount before rounding, and the amount billed (rounded once, half away from zero).
    exact_amount        numeric NOT NULL,
    amount_minor        bigint NOT NULL,
    PRIMARY KEY (invoice_id, position)
);
CREATE INDEX invoice_lines_tenant ON invoice_lines (tenant_id, for_period);

CREATE FUNCTION sluice_invoices_are_final() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'invoices are final: % is refused (late usage goes on the next invoice)', lower(TG_OP);
END
$$;
CREATE TRIGGER invoices_are_final BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION sluice_invoices_are_final();
CREATE TRIGGER invoice_lines_are_final BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION sluice_invoices_are_final();

CREATE FUNCTION sluice_currency_is_settled() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.currency <> OLD.currency AND EXISTS (SELECT 1 FROM invoices) THEN
        RAISE EXCEPTION 'the billing currency cannot change once invoices exist';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER billing_currency_settled BEFORE UPDATE ON billing_settings
    FOR EACH ROW EXECUTE FUNCTION sluice_currency_is_settled();

ALTER TABLE invoices ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON invoices
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);
ALTER TABLE invoice_lines ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON invoice_lines
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- A period's invoice lines of every tenant, for a platform admin's export through the edge
-- (the runtime role sees one tenant's rows at a time).
CREATE FUNCTION sluice_period_invoice_lines(p_period date) RETURNS SETOF invoice_lines
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT l.* FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
     WHERE i.period = p_period
$$;
CREATE FUNCTION sluice_period_invoices(p_period date) RETURNS SETOF invoices
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT * FROM invoices WHERE period = p_period
$$;
REVOKE ALL ON FUNCTION sluice_period_invoice_lines(date) FROM PUBLIC;
REVOKE ALL ON FUNCTION sluice_period_invoices(date) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT ON billing_settings, price_versions, invoice_runs, invoice_issuers,
            invoices, invoice_lines TO sluice_app;
        GRANT EXECUTE ON FUNCTION sluice_period_invoice_lines(date), sluice_period_invoices(date)
            TO sluice_app;
    END IF;
END
$$;
