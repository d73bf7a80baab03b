-- Per-tenant quota overrides (see docs/quotas.md). Defaults come from INGEST_QUOTA_DEFAULT_*; a row here
-- overrides them for one tenant, on every stream (stream = '') or on one stream. A NULL field inherits
-- (stream row -> tenant row -> default); 0 means unlimited. Usage lives in Redis, never here.
CREATE TABLE quota_overrides (
    tenant_id   text             NOT NULL,
    stream      text             NOT NULL DEFAULT '',
    per_second  double precision CHECK (per_second >= 0 AND per_second < 'Infinity'),
    burst       integer          CHECK (burst >= 0),
    per_day     bigint           CHECK (per_day >= 0),
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, stream)
);

-- One row whose version moves with every change to quota_overrides: consumers poll it (one tiny query per
-- refresh interval) and re-read the overrides only when it moved. The row lock orders concurrent writers, so
-- a reader never sees a new version without the change that produced it.
CREATE TABLE quota_overrides_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL DEFAULT 0
);
INSERT INTO quota_overrides_version DEFAULT VALUES;

CREATE FUNCTION quota_overrides_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE quota_overrides_version SET version = version + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER quota_overrides_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota_overrides
    FOR EACH STATEMENT EXECUTE FUNCTION quota_overrides_bump();
