-- Dead-letter retention (`ingest dlq purge`, the maintenance task) deletes by creation time across every stream
-- and reason: without this index each chunk of the deletion would scan the whole table.
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters (created_at);
