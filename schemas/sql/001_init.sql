-- ingest schema v1. Applied once by `ingest migrate` (recorded in ingest_schema_migrations).
-- Event tables are range-partitioned by occurred_at; partitions are created ahead by `ingest migrate`
-- and by the consumers' maintenance (see docs/partitions.md). Indexes lead with tenant_id.

CREATE TABLE webhook_events (
    tenant_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    event_type       text        NOT NULL,
    source           text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    payload          jsonb       NOT NULL,
    headers          jsonb,
    kafka_timestamp  timestamptz NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);
CREATE INDEX webhook_events_tenant_time ON webhook_events (tenant_id, occurred_at DESC);
CREATE INDEX webhook_events_tenant_type ON webhook_events (tenant_id, event_type, occurred_at DESC);

CREATE TABLE audit_events (
    tenant_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    action           text        NOT NULL,
    actor_id         text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    resource         text,
    ip               text,
    metadata         jsonb,
    kafka_timestamp  timestamptz NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);
CREATE INDEX audit_events_tenant_time ON audit_events (tenant_id, occurred_at DESC);
CREATE INDEX audit_events_tenant_action ON audit_events (tenant_id, action, occurred_at DESC);
CREATE INDEX audit_events_tenant_resource ON audit_events (tenant_id, resource, occurred_at DESC)
    WHERE resource IS NOT NULL;
CREATE INDEX audit_events_tenant_actor ON audit_events (tenant_id, actor_id, occurred_at DESC);

-- Durable dedupe truth: one row per (stream, tenant, idempotency key) seen within the dedupe window.
-- Event tables cannot carry this unique key (a unique index on a partitioned table must include occurred_at).
CREATE TABLE dedupe_keys (
    stream          text        NOT NULL,
    tenant_id       text        NOT NULL,
    idempotency_key text        NOT NULL,
    seen_at         timestamptz NOT NULL,
    PRIMARY KEY (stream, tenant_id, idempotency_key)
);
CREATE INDEX dedupe_keys_seen_at ON dedupe_keys (seen_at);

-- Everything that could not be stored, with the original bytes. Written in the same transaction that
-- advances the offset past it.
CREATE TABLE dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream           text        NOT NULL,
    reason           text        NOT NULL,
    detail           text        NOT NULL,
    raw              bytea,
    tenant_id        text,
    idempotency_key  text,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    kafka_key        bytea,
    kafka_timestamp  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz
);
CREATE INDEX dead_letters_stream_reason ON dead_letters (stream, reason, created_at DESC);
CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, created_at DESC) WHERE tenant_id IS NOT NULL;

-- Progress: the next offset to read per (group, topic, partition). Postgres, not Kafka, is the truth.
CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
