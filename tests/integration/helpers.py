"""Publishing, draining and counting helpers shared by integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from consumers import run, streams
from ingest import ledger
from ingest.broker import listening
from ingest.config import Config
from ingest.consumer import Totals
from ingest.publisher import Publisher
from ingest.sql import ident


async def publish(config: Config, stream: str, events: Iterable[Mapping[str, Any]]) -> int:
    """Publish valid events keyed by tenant_id; return how many."""
    s = streams.STREAMS[stream]
    n = 0
    async with Publisher(config, topic=s.topic_for(config), contract=s.contract(config)) as pub:
        for e in events:
            await pub.send(e)
            n += 1
    return n


async def publish_raw(config: Config, stream: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Publish ``(key, value)`` pairs as they are (no validation)."""
    s = streams.STREAMS[stream]
    n = 0
    async with Publisher(config, topic=s.topic_for(config), contract=s.contract(config)) as pub:
        for key, value in records:
            await pub.send_raw(key, value)
            n += 1
    return n


async def drain(config: Config, stream: str = "all", timeout: float = 90) -> dict[str, Totals]:
    """Run the in-process consumers with ``--drain`` semantics."""
    return await asyncio.wait_for(
        run.consume(config, streams.select(stream), asyncio.Event(), drain=True), timeout)


def unique_keys(events: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    return {(e["tenant_id"], e["idempotency_key"]) for e in events}


async def stored_keys(conn: asyncpg.Connection, stream: str) -> Counter[tuple[str, str]]:
    """How many times each (tenant_id, idempotency_key) is stored in the stream's table."""
    rows = await conn.fetch(f"SELECT tenant_id, idempotency_key FROM {ident(streams.STREAMS[stream].table)}")
    return Counter((r[0], r[1]) for r in rows)


async def expire_ledger(conn: asyncpg.Connection, table: str, days: int) -> None:
    """Age the ledger by ``days``: each epoch was opened that much earlier, and a new, empty epoch opened ``days``
    ago is the open one (as if nothing had been claimed since)."""
    epochs = ident(ledger.epochs_table(table))
    await conn.execute(f"UPDATE {epochs} SET opened_at = opened_at - $1::interval WHERE opened_at IS NOT NULL",
                       timedelta(days=days))
    epoch = await conn.fetchval(f"SELECT max(epoch) + 1 FROM {epochs}")
    await conn.execute(f"CREATE TABLE {ident(ledger.partition_name(table, epoch))} PARTITION OF {ident(table)} "
                       f"FOR VALUES IN ({epoch})")
    await conn.execute(f"INSERT INTO {epochs} VALUES ($1, now() - $2::interval)", epoch, timedelta(days=days))


async def offsets_total(conn: asyncpg.Connection, config: Config, stream: str) -> int:
    s = streams.STREAMS[stream]
    return int(await conn.fetchval(
        "SELECT coalesce(sum(greatest(next_offset, 0)), 0) FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
        s.group_for(config), s.topic_for(config)))


def spawn_consumer(env: Mapping[str, str], stream: str = "all", *extra: str) -> subprocess.Popen[bytes]:
    """``ingest consume`` as a child process (for kill -9 and signal tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "consume", "--stream", stream, *extra],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (no-op if it already exited) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
               "--save", "", "--appendonly", "no"]


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=10)
    for _ in range(100):
        if not listening("127.0.0.1", 6379):
            return
        subprocess.run(["sleep", "0.05"])
    raise AssertionError("redis did not stop")


def start_redis() -> None:
    if not listening("127.0.0.1", 6379):
        subprocess.run(REDIS_START, check=True, capture_output=True, timeout=10)
    for _ in range(100):
        if listening("127.0.0.1", 6379):
            return
        subprocess.run(["sleep", "0.05"])
    raise AssertionError("redis did not start")
