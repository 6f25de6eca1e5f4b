-- Tenant deletion: a deleted tenant's keys and sessions stop at once (authentication requires
-- an active tenant); its control-plane rows are purged after a grace period by
-- `sluice tenant purge`; its usage facts in ClickHouse are kept for invoicing.

ALTER TABLE tenants DROP CONSTRAINT tenants_status_check;
ALTER TABLE tenants ADD CONSTRAINT tenants_status_check
    CHECK (status IN ('active', 'suspended', 'deleted'));
ALTER TABLE tenants ADD COLUMN deleted_at timestamptz;

-- A tenant admin deletes its own tenant through the edge: the runtime role may change only
-- the tenant named in the transaction (row-level security), only its status and deletion
-- time (column grants), and the trigger below lets that change be nothing but a deletion.

CREATE FUNCTION sluice_tenant_update_is_deletion() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF current_user = 'sluice_app' AND (NEW.status <> 'deleted' OR NEW.name <> OLD.name OR NEW.id <> OLD.id) THEN
        RAISE EXCEPTION 'the runtime role may only mark its tenant deleted';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tenants_update_is_deletion BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION sluice_tenant_update_is_deletion();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice_app') THEN
        GRANT UPDATE (status, deleted_at) ON tenants TO sluice_app;
    END IF;
END
$$;

-- The audit log outlives the tenants it speaks of: a purged tenant's entries keep its id.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_tenant_id_fkey;
