"""Stored positions the Kafka log no longer holds: never skipped silently (real Postgres, Redis and broker).

- A recreated topic (positions past the new log's end): every new event is stored exactly once (default policy),
  or the stream stops with exit 5 and moves nothing (``INGEST_LOG_MISMATCH=stop``).
- A retention gap (positions below the log start): the gap is recorded in ``offset_changes``, counted in a
  metric, and consumption goes on from the log start. The embedded broker cannot delete records, so the test
  consumer's log start is raised by ``head_expired`` (what ListOffsets(earliest) answers after retention ran).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import asyncpg

from consumers import run, streams
from consumers.cli import sample, status
from ingest import broker as broker_mod
from ingest import offsets
from ingest.config import Config
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from tests.integration.helpers import drain, offsets_total, publish, stored_keys, unique_keys


def fresh(events: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The same events under new idempotency keys (sample keys repeat between seeds)."""
    return [{**e, "idempotency_key": f"{tag}-{e['idempotency_key']}"} for e in events]


async def recreate_topic(config: Config, stream: str) -> None:
    topic = streams.STREAMS[stream].topic_for(config)
    await broker_mod.delete_topics(config, [topic])
    for _ in range(100):
        if not (await status.end_offsets(config, [topic]))[topic]:
            break
        await asyncio.sleep(0.1)
    await run.ensure_all_topics(config)


async def stored_positions(db: asyncpg.Connection, config: Config, stream: str) -> dict[int, int]:
    s = streams.STREAMS[stream]
    return await status.stored_offsets(db, s.tables().offsets, s.group_for(config), s.topic_for(config))


def cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``ingest ARGS`` as a child process with ``env`` added to this one's environment."""
    return subprocess.run([sys.executable, "-m", "consumers.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


async def test_recreated_topic_stores_every_new_event_exactly_once(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    old = list(sample.generate("webhook", 400, n_tenants=20, dup_rate=0, seed=21))
    await publish(config, "webhook", old)
    await drain(config, "webhook")
    before = await stored_positions(db, config, "webhook")
    assert sum(before.values()) == 400

    await recreate_topic(config, "webhook")
    new = fresh(list(sample.generate("webhook", 120, n_tenants=20, dup_rate=0, seed=22)), "new")
    await publish(config, "webhook", new)

    # Lag must not read 0 while the new records are unread, although every stored position is past the end.
    report = (await status.lag_report(config, [streams.WEBHOOK]))["webhook"]
    assert report["total_lag"] == 120
    assert {r["mismatch"] for r in report["partitions"] if r["lag"]} == {"beyond_end"}
    done = await asyncio.to_thread(cli, env, "lag", "--stream", "webhook")
    assert done.returncode == 1 and "POSITIONS OUTSIDE THE LOG" in done.stdout, done.stdout

    metrics = Metrics()
    totals = await asyncio.wait_for(
        run.consume(config, [streams.WEBHOOK], asyncio.Event(), drain=True, metrics=metrics), 90)

    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(old) | unique_keys(new) and max(stored.values()) == 1
    assert totals["webhook"].stored == 120 and totals["webhook"].duplicates == 0
    assert await offsets_total(db, config, "webhook") == 120
    rows = await db.fetch("SELECT partition, kind, from_offset, to_offset, log_end, skipped FROM offset_changes")
    moved = {r["partition"]: r for r in rows}
    assert {p for p, at in before.items() if at > 0} <= set(moved), "every partition past its new end is recorded"
    assert all(r["kind"] == "beyond_end" and r["to_offset"] == 0 and r["skipped"] == 0 for r in rows)
    assert all(moved[p]["from_offset"] == before[p] for p in moved)
    assert metrics.registry.get_sample_value(
        "ingest_log_mismatches_total", {"stream": "webhook", "kind": "beyond_end", "action": "reset"}) == len(rows)
    lag = (await status.lag_report(config, [streams.WEBHOOK]))["webhook"]
    assert lag["total_lag"] == 0 and not any(r["mismatch"] for r in lag["partitions"])


async def test_strict_policy_stops_with_exit_5_and_moves_nothing(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    old = list(sample.generate("webhook", 200, n_tenants=20, dup_rate=0, seed=23))
    await publish(config, "webhook", old)
    await drain(config, "webhook")
    before = await stored_positions(db, config, "webhook")
    await recreate_topic(config, "webhook")
    new = fresh(list(sample.generate("webhook", 60, n_tenants=20, dup_rate=0, seed=24)), "new")
    await publish(config, "webhook", new)

    done = await asyncio.to_thread(cli, {**env, "INGEST_LOG_MISMATCH": "stop"},
                                   "consume", "--stream", "webhook", "--drain")
    assert done.returncode == 5, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("ingest: ")]
    assert len(error) == 1 and "ingest offsets reset --stream webhook" in error[0], done.stderr
    assert await stored_positions(db, config, "webhook") == before
    assert set(await stored_keys(db, "webhook")) == unique_keys(old)
    assert await db.fetchval("SELECT count(*) FROM offset_changes") == 0

    # The operator's fix: replay the recreated topic from its start; then the stream goes on.
    fix = await asyncio.to_thread(cli, env, "offsets", "reset", "--stream", "webhook", "--to-earliest", "--execute",
                                "--force")
    assert fix.returncode == 0, fix.stderr
    done = await asyncio.to_thread(cli, {**env, "INGEST_LOG_MISMATCH": "stop"},
                                   "consume", "--stream", "webhook", "--drain")
    assert done.returncode == 0, done.stderr
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(old) | unique_keys(new) and max(stored.values()) == 1


def head_expired(sc: StreamConsumer, starts: Mapping[int, int]) -> None:
    """Make ``sc`` see the log of partition p start at ``starts[p]`` (retention removed what lies before)."""
    read_bounds = sc._log_bounds

    async def bounds(consumer: Any, parts: list[int]) -> dict[int, offsets.LogBounds]:
        real = await read_bounds(consumer, parts)
        return {p: dataclasses.replace(b, start=max(b.start, starts.get(p, 0))) for p, b in real.items()}

    sc._log_bounds = bounds  # type: ignore[method-assign]


async def test_retention_gap_is_recorded_counted_and_consumption_goes_on(
        config: Config, db: asyncpg.Connection) -> None:
    first = list(sample.generate("audit", 200, n_tenants=20, dup_rate=0, seed=25))
    await publish(config, "audit", first)
    await drain(config, "audit")
    consumed = await stored_positions(db, config, "audit")
    more = fresh(list(sample.generate("audit", 200, n_tenants=20, dup_rate=0, seed=26)), "more")
    await publish(config, "audit", more)
    ends = (await status.end_offsets(config, [streams.AUDIT.topic_for(config)]))[
        streams.AUDIT.topic_for(config)]
    expired = {p: min(10, ends[p].end - consumed.get(p, 0)) for p in ends}  # 10 unread records per partition
    gap_total = sum(expired.values())
    assert gap_total > 0

    metrics = Metrics()
    rt = await run.open_runtime(config, metrics)
    try:
        sc = run.build_consumer(config, streams.AUDIT, rt)
        start = {p: consumed.get(p, 0) + n for p, n in expired.items()}
        head_expired(sc, start)
        await asyncio.wait_for(sc.run(asyncio.Event(), drain=True), 90)
    finally:
        await rt.aclose()

    rows = await db.fetch("SELECT stream, topic, partition, kind, from_offset, to_offset, skipped FROM offset_changes")
    gaps = {r["partition"]: r for r in rows if r["skipped"]}
    assert set(gaps) == {p for p, n in expired.items() if n}
    for p, r in gaps.items():
        assert (r["stream"], r["topic"], r["kind"]) == ("audit", streams.AUDIT.topic_for(config), "below_start")
        assert (r["from_offset"], r["to_offset"], r["skipped"]) == (consumed.get(p, 0), start[p], expired[p])
    assert metrics.registry.get_sample_value("ingest_log_gap_records_total", {"stream": "audit"}) == gap_total
    # Everything after the gap is stored; positions reach the end of the log.
    assert await offsets_total(db, config, "audit") == sum(e.end for e in ends.values())
    assert len(await stored_keys(db, "audit")) == 400 - gap_total
