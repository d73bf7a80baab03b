"""Redis flushed or down mid-run: Postgres still decides; no duplicate admitted, nothing lost."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.asyncio import Redis

from consumers import run, streams
from consumers.cli import sample
from ingest.config import Config
from tests.integration.helpers import (
    drain,
    offsets_total,
    publish,
    start_redis,
    stop_redis,
    stored_keys,
    unique_keys,
)


async def settle(db: asyncpg.Connection, config: Config, stream: str, expected: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while await offsets_total(db, config, stream) < expected:
            await asyncio.sleep(0.05)


async def test_flush_and_outage_never_admit_duplicates(config: Config, db: asyncpg.Connection,
                                                       redis_back: None) -> None:
    events = list(sample.generate("webhook", 4000, n_tenants=20, dup_rate=0.0, seed=31))
    parts = [events[:1000], events[1000:2000], events[2000:3000], events[3000:]]
    stop = asyncio.Event()
    task = asyncio.create_task(run.consume(config, [streams.WEBHOOK], stop))
    sent = 0
    try:
        sent += await publish(config, "webhook", parts[0])
        await settle(db, config, "webhook", sent)
        # Redis forgets everything: the re-sent first part must still be recognised (by Postgres).
        redis = Redis.from_url(config.redis_url)
        await redis.flushall()
        await redis.aclose()
        sent += await publish(config, "webhook", parts[0][:500] + parts[1])
        await settle(db, config, "webhook", sent)
        # Redis is down: the consumer keeps going on Postgres alone.
        stop_redis()
        sent += await publish(config, "webhook", parts[1][:500] + parts[2])
        await settle(db, config, "webhook", sent)
        start_redis()
        sent += await publish(config, "webhook", parts[2][:500] + parts[3] + parts[0][:100])
        await settle(db, config, "webhook", sent)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(events)
    assert max(stored.values()) == 1
    await drain(config, "webhook")  # nothing left behind
    assert sum((await stored_keys(db, "webhook")).values()) == len(events)
