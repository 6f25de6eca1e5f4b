-- `sluice_authorize` (migration 2) answers for a key with its tenant and limits; the older
-- `sluice_authenticate`, which answered with the tenant alone, has no caller left.
DROP FUNCTION sluice_authenticate(text);
