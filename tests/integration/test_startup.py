"""Start-up: the group join overlaps the process's own checks, and nothing is read before they pass."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from consumers import run, streams
from consumers.cli import sample
from ingest.config import Config
from ingest.services import ServiceUnavailable
from tests.integration.helpers import offsets_total, publish


async def test_nothing_is_positioned_or_read_before_ready(config: Config, db: asyncpg.Connection) -> None:
    sent = await publish(config, "webhook", sample.generate("webhook", 200, n_tenants=3, dup_rate=0.0))
    rt = await run.open_runtime(config)
    consumer = run.build_consumer(config, streams.WEBHOOK, rt)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(consumer.run(stop, ready=ready))
    try:
        async with asyncio.timeout(30):
            while not consumer.state.assigned:  # the join went ahead without ``ready``
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert not consumer.positioned()
        assert await offsets_total(db, config, "webhook") == 0
        assert await db.fetchval("SELECT count(*) FROM webhook_events") == 0
        ready.set()
        async with asyncio.timeout(30):
            while await offsets_total(db, config, "webhook") < sent:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await rt.aclose()
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == sent


async def test_a_missing_schema_stops_start_up_and_leaves_no_consumer_running(config: Config) -> None:
    bare = dataclasses.replace(config, database_url=config.database_url.rsplit("/", 1)[0] + "/postgres",
                               maintenance_database_url="")
    before = asyncio.all_tasks()
    with pytest.raises(ServiceUnavailable, match="schema missing"):
        await asyncio.wait_for(run.consume(bare, [streams.WEBHOOK], asyncio.Event()), 30)
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if not t.done() and "run" in repr(t.get_coro())]
    assert left == []
