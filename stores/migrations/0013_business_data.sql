-- The business data the built-in tools act on: a tenant's customers, their orders and support
-- tickets, and the record of every write a tool made, by its idempotency key, so a retried or
-- redelivered write happens once.

CREATE TABLE customers (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The tenant's own customer id.
    id          text NOT NULL CHECK (length(id) BETWEEN 1 AND 200),
    name        text NOT NULL,
    email       text,
    phone       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX customers_email ON customers (tenant_id, lower(email));
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON customers
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE TABLE orders (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           text NOT NULL CHECK (length(id) BETWEEN 1 AND 200),
    customer_id  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'reserved', 'paid', 'shipped',
                                                 'delivered', 'cancelled', 'refunded')),
    -- [{"sku": …, "quantity": …, "unit_price_minor": …}, …]
    items        jsonb NOT NULL DEFAULT '[]',
    total_minor  bigint NOT NULL DEFAULT 0 CHECK (total_minor >= 0),
    currency     text NOT NULL DEFAULT 'USD',
    tracking     text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX orders_customer ON orders (tenant_id, customer_id, created_at);
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON orders
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

CREATE TABLE tickets (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    customer_id  text,
    subject      text NOT NULL CHECK (length(subject) BETWEEN 1 AND 500),
    body         text NOT NULL,
    priority     text NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'urgent')),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'closed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX tickets_customer ON tickets (tenant_id, customer_id);
ALTER TABLE tickets ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tickets
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

-- One row per write a tool made, written in the same transaction as the write: a write whose
-- key is here already returns what it returned the first time instead of happening again.
CREATE TABLE tool_writes (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 300),
    tool             text NOT NULL,
    result           jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);
ALTER TABLE tool_writes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tool_writes
    USING (tenant_id = nullif(current_setting('sluice.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON customers, orders, tickets TO sluice_app;
        GRANT SELECT, INSERT, UPDATE ON tool_writes TO sluice_app;
    END IF;
END
$$;
