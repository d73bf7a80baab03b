-- The dedupe ledger keeps a 16-byte digest per key in epoch partitions (ingest/ledger.py, docs/design.md):
-- expiry drops a partition instead of deleting rows. The text ledger is migrated in place: its keys go into
-- one first epoch, opened now and starting at its oldest key, so each key is remembered at least as long as
-- before. The digest expression is ingest.ledger.DIGEST; the partition name is ingest.ledger.partition_name.
CREATE TABLE dedupe_ledger (
    digest bytea  NOT NULL,
    epoch  bigint NOT NULL,
    PRIMARY KEY (digest, epoch)
) PARTITION BY LIST (epoch);

CREATE TABLE dedupe_ledger_epochs (
    epoch     bigint PRIMARY KEY,  -- start of the epoch, Unix seconds; also the partition's LIST value
    opened_at timestamptz          -- when new keys started going into it (NULL: created ahead, not open yet)
);

DO $$
DECLARE
    first bigint := floor(extract(epoch FROM coalesce((SELECT min(seen_at) FROM dedupe_keys), now())));
    part  text   := 'dedupe_ledger_e' || to_char(to_timestamp(first) AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS');
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF dedupe_ledger FOR VALUES IN (%s)', part, first);
    INSERT INTO dedupe_ledger_epochs (epoch, opened_at) VALUES (first, now());
    INSERT INTO dedupe_ledger (digest, epoch)
        SELECT DISTINCT substring(sha256(convert_to(length(stream)::text || ':' || stream
                                                    || length(tenant_id)::text || ':' || tenant_id
                                                    || idempotency_key, 'UTF8')) FOR 16), first
        FROM dedupe_keys;
END $$;

DROP TABLE dedupe_keys;

-- Stored-event rates for `ingest status` (the text ledger's seen_at served this before): a BRIN index on
-- ingested_at is a few pages per partition and costs the COPY next to nothing, since rows arrive in that order.
CREATE INDEX webhook_events_ingested ON webhook_events USING brin (ingested_at);
CREATE INDEX audit_events_ingested ON audit_events USING brin (ingested_at);
