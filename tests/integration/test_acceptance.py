"""The pipeline issue's acceptance scenario, through the real CLI.

40,000 events (15% duplicates, 50 tenants, both streams) are published while ``ingest consume`` is killed with -9
four times, Redis is flushed once and restarted once; then ``ingest consume --stream all --drain`` must exit 0
with every unique event stored exactly once and the stored offsets at the end of every partition.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import asyncpg
from redis.asyncio import Redis

from consumers.cli import sample
from ingest.config import Config
from tests.integration.helpers import (
    kill9,
    offsets_total,
    publish,
    spawn_consumer,
    start_redis,
    stop_redis,
    stored_keys,
    unique_keys,
)


async def test_kill9_x4_flush_and_restart_redis_then_drain(config: Config, env: dict[str, str],
                                                           db: asyncpg.Connection, redis_back: None) -> None:
    webhooks = list(sample.generate("webhook", 26000, n_tenants=50, dup_rate=0.15, seed=101))
    audits = list(sample.generate("audit", 14000, n_tenants=50, dup_rate=0.15, seed=102))
    rng = random.Random(7)

    progress = 0
    kills = 0
    events_log = []
    crash_env = {**env, "INGEST_BATCH_MAX_ROWS": "1000"}
    for round_ in range(4):
        # Each round publishes a quarter of the events, then a consumer is killed while working through them.
        await publish(config, "webhook", webhooks[round_ * 6500:(round_ + 1) * 6500])
        await publish(config, "audit", audits[round_ * 3500:(round_ + 1) * 3500])
        proc = spawn_consumer(crash_env)
        try:
            try:
                async with asyncio.timeout(90):
                    while await offsets_total(db, config, "webhook") + await offsets_total(db, config, "audit") <= progress:
                        await asyncio.sleep(0.02)
            except TimeoutError:
                raise AssertionError(f"round {round_}: no progress") from None
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            if round_ == 1:
                redis = Redis.from_url(config.redis_url)
                await redis.flushall()
                await redis.aclose()
                events_log.append("redis flushed")
                await asyncio.sleep(0.3)
            if round_ == 2:
                stop_redis()
                events_log.append("redis stopped")
                await asyncio.sleep(0.5)
                start_redis()
                events_log.append("redis restarted (empty)")
        finally:
            kill9(proc)  # always: a test must never leave a consumer behind
        kills += 1
        progress = await offsets_total(db, config, "webhook") + await offsets_total(db, config, "audit")
        events_log.append(f"kill -9 #{kills} with {progress}/{(round_ + 1) * 10000} published records committed")

    drain = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "consumers.cli", "consume", "--stream", "all", "--drain"],
        env={**os.environ, **env}, capture_output=True, timeout=300)
    assert drain.returncode == 0, drain.stderr.decode()[-2000:]
    totals = json.loads(drain.stdout.decode().strip().splitlines()[-1])

    stored_w, stored_a = await stored_keys(db, "webhook"), await stored_keys(db, "audit")
    unique_w, unique_a = unique_keys(webhooks), unique_keys(audits)
    missing = (len(unique_w - set(stored_w)), len(unique_a - set(stored_a)))
    doubled = (sum(n > 1 for n in stored_w.values()), sum(n > 1 for n in stored_a.values()))
    print("\nacceptance:", "; ".join(events_log))
    print(f"acceptance: published {len(webhooks) + len(audits)} events, unique {len(unique_w) + len(unique_a)}, "
          f"stored {sum(stored_w.values()) + sum(stored_a.values())}, missing {sum(missing)}, "
          f"doubled {sum(doubled)}; final drain: {totals}")
    assert kills == 4
    assert progress < len(webhooks) + len(audits), "the last kill should interrupt the stream"
    assert missing == (0, 0) and doubled == (0, 0)
    assert set(stored_w) == unique_w and set(stored_a) == unique_a
    assert await offsets_total(db, config, "webhook") == len(webhooks)
    assert await offsets_total(db, config, "audit") == len(audits)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
