"""1 vs N ``ingest consume`` processes on one stream, measured from the offsets committed in Postgres.

For each process count: a fresh database, fresh topics (12 partitions) and a fresh Redis prefix; publish the
same N events (``consumers.cli.bench`` generator and producer: 5% re-deliveries, 0.1% hostile records); then start
the consumer processes together (``python -m consumers.cli consume --stream S --drain``, same env = same group)
and poll ``sum(next_offset)`` in ``consumer_offsets`` every 0.25 s until every published record is behind a
committed offset. Reports the aggregate events/s from the first commit to the last (steady) and from process
start (wall), plus the whole machine's CPU use during the run (from /proc/stat).

    .venv/bin/python scripts/perf_two_consumers.py --events 400000 --processes 1 2 --json processes-1-vs-2.json

``--keep`` leaves the database of the last run in place (for size measurements) and prints its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from consumers import run, settings, streams
from consumers.cli.bench import BenchOptions, _cleanup, _produce
from ingest.sql import ident

ROOT = Path(__file__).resolve().parent.parent


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


async def one_run(processes: int, events: int, stream_name: str, keep: bool) -> dict[str, Any]:
    base = settings.from_env()
    uid = uuid.uuid4().hex[:8]
    db = f"ingest_perf_{uid}"
    config = dataclasses.replace(
        base, database_url=base.database_url.rsplit("/", 1)[0] + f"/{db}", topic_prefix=f"perf_{uid}.",
        group_prefix=f"perf_{uid}", redis_prefix=f"perf_{uid}", topic_partitions=12, metrics_port=0,
        maintenance_database_url="")
    stream = streams.STREAMS[stream_name]
    topic = stream.topic_for(config)
    env = {**os.environ,
           "INGEST_KAFKA_BOOTSTRAP": config.kafka_bootstrap, "INGEST_DATABASE_URL": config.database_url,
           "INGEST_MAINTENANCE_DATABASE_URL": "",
           "INGEST_TOPIC_PREFIX": config.topic_prefix, "INGEST_GROUP_PREFIX": config.group_prefix,
           "INGEST_REDIS_PREFIX": config.redis_prefix, "INGEST_METRICS_PORT": "0",
           "INGEST_SESSION_TIMEOUT_MS": "6000", "INGEST_REBALANCE_TIMEOUT_MS": "1000",
           "INGEST_HEARTBEAT_INTERVAL_MS": "500", "INGEST_LOG_LEVEL": "WARNING"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await run.run_migrations(config)
        await run.ensure_all_topics(config)
        t0 = time.perf_counter()
        published = await _produce(config, topic, BenchOptions(events=events, stream=stream_name), progress=False)
        produce_s = time.perf_counter() - t0
        conn = await asyncpg.connect(config.database_url)
        try:
            busy0, total0 = _cpu_ticks()
            started = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "consumers.cli", "consume", "--stream", stream_name,  # noqa: ASYNC220 - spawning returns at once
                                       "--drain"], env=env, cwd=ROOT) for _ in range(processes)]
            first = None
            samples: list[tuple[float, int]] = []
            done = 0
            while True:
                done = int(await conn.fetchval(
                    f"SELECT coalesce(sum(greatest(next_offset, 0)), 0) FROM {ident(stream.tables().offsets)} "
                    "WHERE topic = $1", topic))
                now = time.perf_counter()
                samples.append((round(now - started, 2), done))
                if done and first is None:
                    first = (now, done)
                if done >= published:
                    break
                if all(p.poll() is not None for p in procs):
                    raise RuntimeError(f"consumers exited with {done}/{published} committed")
                await asyncio.sleep(0.25)
            end = time.perf_counter()
            busy1, total1 = _cpu_ticks()
            rows = await conn.fetchval(f"SELECT count(*) FROM {ident(stream.table)}")
        finally:
            await conn.close()
        for p in procs:
            p.wait(timeout=60)
        assert first is not None
        steady = (done - first[1]) / (end - first[0]) if end > first[0] else float("nan")
        return {
            "processes": processes, "stream": stream_name, "events_published": published,
            "rows_stored": rows, "produce_seconds": round(produce_s, 2),
            "seconds_to_first_commit": round(first[0] - started, 2),
            "wall_seconds": round(end - started, 2),
            "steady_events_per_s": round(steady),
            "wall_events_per_s": round(done / (end - started)),
            "machine_cpu_busy_share": round((busy1 - busy0) / max(1, total1 - total0), 3),
            "samples": samples[::4],
            "database_kept": config.database_url if keep else None,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        if keep:
            from ingest.broker import delete_topics
            await delete_topics(config, [s.topic_for(config) for s in streams.STREAMS.values()])
        else:
            await _cleanup(config, base, db)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stream", choices=list(streams.STREAMS), default=streams.WEBHOOK.name)
    ap.add_argument("--keep", action="store_true", help="keep the last run's database (Redis keys too)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    for i, n in enumerate(args.processes):
        r = await one_run(n, args.events, args.stream, args.keep and i == len(args.processes) - 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
