"""A bad deployment (every record invalid) stops the stream instead of burying it in dead letters."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

from consumers.cli import sample
from ingest.config import Config
from tests.integration.helpers import dumps, offsets_total, publish, publish_raw


def consume_drain(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "consumers.cli", "consume", "--stream", "webhook", "--drain"],
                          env={**os.environ, **env}, capture_output=True, timeout=120)


async def test_breaker_stops_a_stream_of_garbage(config: Config, env: dict[str, str],
                                                 db: asyncpg.Connection) -> None:
    good = list(sample.generate("webhook", 300, seed=3, dup_rate=0))
    await publish(config, "webhook", good)
    # A producer ships a broken schema: the rest of the stream has no idempotency_key.
    broken = [{k: v for k, v in e.items() if k != "idempotency_key"}
              for e in sample.generate("webhook", 3000, seed=4, dup_rate=0)]
    await publish_raw(config, "webhook", [(e["tenant_id"].encode(), dumps(e)) for e in broken])

    env = {**env, "INGEST_DLQ_MIN_RECORDS": "500", "INGEST_BATCH_MAX_ROWS": "400"}
    first = await asyncio.to_thread(consume_drain, env)
    assert first.returncode == 4, first.stderr.decode()[-1500:]
    assert b"circuit breaker" in first.stderr and b"missing_field" in first.stderr
    dead = await db.fetchval("SELECT count(*) FROM dead_letters")
    # Stopped within the breaker's stretch: far fewer dead letters than broken records.
    assert dead < 1000
    assert await offsets_total(db, config, "webhook") < len(good) + len(broken)

    # The operator decides these really are to be dead-lettered: ratio 1 disables the breaker.
    second = await asyncio.to_thread(consume_drain, {**env, "INGEST_DLQ_MAX_RATIO": "1"})
    assert second.returncode == 0, second.stderr.decode()[-1500:]
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE reason = 'missing_field'") == len(broken)
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == len(good)
