"""Two consumers in one group split the partitions; one leaving mid-stream loses and doubles nothing."""

from __future__ import annotations

import asyncio

import asyncpg

from consumers import run, streams
from consumers.cli import sample
from ingest.config import Config
from ingest.consumer import consumer_partitions
from tests.integration.helpers import drain, offsets_total, publish, stored_keys, unique_keys


async def test_two_consumers_split_and_one_leaves(config: Config, db: asyncpg.Connection) -> None:
    rt_a, rt_b = await run.open_runtime(config), await run.open_runtime(config)
    a, b = run.build_consumer(config, streams.AUDIT, rt_a), run.build_consumer(config, streams.AUDIT, rt_b)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    task_b = asyncio.create_task(b.run(stop_b))
    events = list(sample.generate("audit", 8000, n_tenants=40, dup_rate=0.1, seed=41))
    try:
        async with asyncio.timeout(60):
            while True:
                pa = consumer_partitions(a.consumer, a.topic) if a.consumer else set()
                pb = consumer_partitions(b.consumer, b.topic) if b.consumer else set()
                if pa and pb and not (pa & pb) and len(pa | pb) == config.topic_partitions:
                    break
                await asyncio.sleep(0.1)
        await publish(config, "audit", events[:4000])
        async with asyncio.timeout(60):
            while await offsets_total(db, config, "audit") < 2000:
                await asyncio.sleep(0.02)
        # B leaves mid-stream (graceful stop); A must take over B's partitions from Postgres offsets.
        stop_b.set()
        await asyncio.wait_for(task_b, 30)
        await publish(config, "audit", events[4000:])
        async with asyncio.timeout(90):
            while await offsets_total(db, config, "audit") < len(events):
                await asyncio.sleep(0.1)
        assert consumer_partitions(a.consumer, a.topic) == set(range(config.topic_partitions))
        assert a.totals.stored > 0 and b.totals.stored > 0
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(task_a, task_b, return_exceptions=True)
        await rt_a.aclose()
        await rt_b.aclose()

    stored = await stored_keys(db, "audit")
    assert set(stored) == unique_keys(events) and max(stored.values()) == 1
    assert a.totals.stored + b.totals.stored == len(stored)
    await drain(config, "audit")
    assert sum((await stored_keys(db, "audit")).values()) == len(stored)
