"""kill -9 of a real ``ingest consume`` process during batches: nothing missing, nothing doubled."""

from __future__ import annotations

import asyncio
import os
import random

import asyncpg

from consumers.cli import sample
from ingest.config import Config
from tests.integration.helpers import (
    drain,
    kill9,
    offsets_total,
    publish,
    spawn_consumer,
    stored_keys,
    unique_keys,
)


async def wait_progress(db: asyncpg.Connection, config: Config, above: int, timeout: float = 60) -> int:
    """Wait until the stored webhook+audit offsets pass ``above``; return the new total."""
    async with asyncio.timeout(timeout):
        while True:
            total = await offsets_total(db, config, "webhook") + await offsets_total(db, config, "audit")
            if total > above:
                return total
            await asyncio.sleep(0.05)


async def test_kill9_during_batches_then_restart(config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    webhooks = list(sample.generate("webhook", 12000, n_tenants=50, dup_rate=0.15, seed=21))
    audits = list(sample.generate("audit", 6000, n_tenants=50, dup_rate=0.15, seed=22))
    await publish(config, "webhook", webhooks)
    await publish(config, "audit", audits)

    # Small batches so that each kill lands while batches are being written.
    crash_env = {**env, "INGEST_BATCH_MAX_ROWS": "500"}
    rng = random.Random(5)
    progress = 0
    kills = 0
    for _ in range(3):
        proc = spawn_consumer(crash_env)
        try:
            progress = await wait_progress(db, config, progress)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        finally:
            kill9(proc)
            kills += 1
        assert proc.returncode == -9
    assert 0 < progress < len(webhooks) + len(audits), "the kills should interrupt the stream part-way"

    await drain(config, timeout=120)
    stored_w, stored_a = await stored_keys(db, "webhook"), await stored_keys(db, "audit")
    assert set(stored_w) == unique_keys(webhooks) and max(stored_w.values()) == 1
    assert set(stored_a) == unique_keys(audits) and max(stored_a.values()) == 1
    assert await offsets_total(db, config, "webhook") == len(webhooks)
    assert await offsets_total(db, config, "audit") == len(audits)
    assert kills == 3


async def test_sigterm_mid_backlog_stops_cleanly_within_30s(config: Config, env: dict[str, str],
                                                            db: asyncpg.Connection) -> None:
    import signal
    import time

    events = list(sample.generate("webhook", 15000, n_tenants=20, dup_rate=0.1, seed=23))
    await publish(config, "webhook", events)
    proc = spawn_consumer({**env, "INGEST_BATCH_MAX_ROWS": "500"}, "webhook")
    try:
        await wait_progress(db, config, 0)
    except BaseException:
        kill9(proc)
        raise
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    assert time.monotonic() - started < 30
    assert 0 < await offsets_total(db, config, "webhook") <= len(events)

    await drain(config, "webhook")
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(events) and max(stored.values()) == 1
