-- Every move of a stored position that is not a batch: the consumer re-positioning a partition whose stored
-- offset the Kafka log no longer holds, and operator resets (`ingest offsets reset`). Written in the same
-- transaction that moves consumer_offsets, so a gap in what was read is never without its row.
--   kind        beyond_end   the stored offset was past the log end (topic recreated or truncated, cluster
--                            switched): reading restarts at the log start; the dedupe ledger keeps it effectively-once
--               below_start  the stored offset was below the log start (retention removed records before they were
--                            read): [from_offset, log_start) is lost; `skipped` counts it
--               reset        an operator moved the position; `skipped` counts records jumped over, `reread` those
--                            that will be read again
CREATE TABLE offset_changes (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    stream      text        NOT NULL,
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('beyond_end', 'below_start', 'reset')),
    from_offset bigint      NOT NULL,
    to_offset   bigint      NOT NULL,
    log_start   bigint,
    log_end     bigint,
    skipped     bigint      NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    reread      bigint      NOT NULL DEFAULT 0 CHECK (reread >= 0),
    detail      text        NOT NULL DEFAULT ''
);
CREATE INDEX offset_changes_topic_partition ON offset_changes (group_id, topic, partition, changed_at);
