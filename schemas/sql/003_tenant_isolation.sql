-- Tenant isolation for readers (docs/security.md). A role that is neither the table owner nor BYPASSRLS sees
-- only the rows of the tenant named by the transaction-local setting app.tenant_id:
--   BEGIN; SELECT set_config('app.tenant_id', $1, true); SELECT ...; COMMIT;
-- No setting (or an empty one) means no rows. Only a SELECT policy exists, so such a role can never insert,
-- update or delete rows whatever it is granted. Policies live on the partitioned parents and apply to every
-- query through them (partitions and the DEFAULT partition included); partitions themselves carry no grants, so
-- they cannot be queried directly except by the owner. The writer COPYs with BYPASSRLS (COPY FROM refuses a
-- table with row-level security otherwise) and holds no SELECT on these tables. The owner bypasses the policy
-- (no FORCE) for maintenance: moving rows out of DEFAULT, exports.

ALTER TABLE webhook_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_events AS PERMISSIVE FOR SELECT TO PUBLIC
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));

ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_events AS PERMISSIVE FOR SELECT TO PUBLIC
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
