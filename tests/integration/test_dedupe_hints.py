"""The Redis fast path: keys are hinted only after COMMIT, and a re-delivered batch is recognised by Redis alone."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from consumers import run, streams
from consumers.cli import sample
from ingest import offsets
from ingest.config import Config
from ingest.rows import SimpleRecord
from tests.integration.helpers import dumps


def records(events: list[dict[str, object]], first_offset: int) -> list[SimpleRecord]:
    now_ms = int(time.time() * 1000)
    return [SimpleRecord("t", 0, first_offset + i, None, dumps(e), now_ms) for i, e in enumerate(events)]


async def test_redelivered_batch_is_hinted_by_redis_and_hints_expire(config: Config) -> None:
    events = list(sample.generate("webhook", 300, n_tenants=7, dup_rate=0.0, seed=5))
    rt = await run.open_runtime(config)
    try:
        consumer = run.build_consumer(config, streams.WEBHOOK, rt)
        pipeline = consumer.pipeline
        redis = Redis.from_url(config.redis_url)
        async with rt.pool.acquire() as conn:
            start = await offsets.load(conn, consumer.offsets_table, consumer.group, consumer.topic, [0])
            first = await pipeline.stage(records(events, 0))
            assert first.hint_duplicates == 0
            assert pipeline.hints is not None
            hint_keys = [pipeline.hints.redis_key(k) for k in first.digests]
            assert len(hint_keys) == len(events)
            assert await redis.exists(*hint_keys) == 0  # staging hints nothing: only a COMMIT does
            outcome = await pipeline.commit(conn, first, start)
            await pipeline.aclose()
            assert outcome.stored == len(events)
            assert await redis.exists(*hint_keys) == len(events)
            ttl = await redis.ttl(hint_keys[0])
            assert 0 < ttl <= int(config.dedupe.hint_ttl.total_seconds())

            # The same events again (a replay at later offsets): Redis alone drops them, before any Postgres work.
            again = await pipeline.stage(records(events[:120], len(events)))
            assert again.hint_duplicates == 120
            assert again.candidates == []
            outcome = await pipeline.commit(conn, again, {0: len(events)})
            assert (outcome.stored, outcome.duplicates) == (0, 120)

            # A mix: only the new keys reach Postgres.
            fresh = [{**e, "idempotency_key": f"fresh-{i}"}
                     for i, e in enumerate(sample.generate("webhook", 50, n_tenants=3, dup_rate=0.0, seed=99))]
            mixed = await pipeline.stage(records(events[:10] + fresh, len(events) + 120))
            assert mixed.hint_duplicates == 10
            assert {c.key for c in mixed.candidates} == {(e["tenant_id"], e["idempotency_key"]) for e in fresh}
        await redis.aclose()
    finally:
        await rt.aclose()
