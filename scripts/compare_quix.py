"""Backlog throughput of ingest against a Quix Streams Postgres sink with primary-key dedupe, in one run.

Publishes the events of ``ingest bench`` once (``consumers.cli.bench``: realistic webhook events, 5 %
re-deliveries of an earlier key, 0.1 % hostile records) to one topic of ``--partitions`` partitions, then drains
that topic ``--rounds`` times with each consumer, alternating (quix, ingest, quix, ingest, ...). Every drain runs
in a process of its own, from the earliest offset, with a consumer group and a database of its own:

- **quix**: a Quix Streams ``Application`` (JSON values, string keys, ``auto_offset_reset="earliest"``, its
  default 5 s commit interval unless ``--quix-commit-interval`` / ``--quix-commit-every`` say otherwise; the
  6 s session timeout and 0.5 s heartbeat that ``ingest bench`` gives ingest, which only shorten the group join)
  whose dataframe keeps JSON objects that have the six required webhook fields and sinks them with
  ``PostgreSQLSink(..., primary_key_columns=["tenant_id", "idempotency_key"], on_conflict_do_nothing=True)``
  into a table with the webhook columns, the two indexes of ``webhook_events`` and that primary key (created
  beforehand, so ``schema_auto_update=False``). Undecodable records are skipped by its ``on_consumer_error``.
- **ingest**: ``ingest consume --drain``'s code path (``run.build_consumer`` + ``StreamConsumer.run(drain=True)``,
  as ``ingest bench`` runs it) with a Redis prefix of its own.

Measured the same way for both, from the commits that stored rows in Postgres (ingest: ``Pipeline.on_commit``,
after each transaction; quix: after each ``PostgreSQLSink.flush``, i.e. after a checkpoint's writes) and the
first records handed to the processing code (ingest: the first ``Pipeline.stage`` call; quix: the first
record reaching the dataframe). Records consumed = every record read from the topic (quix: those that reached
the dataframe plus the undecodable ones).

- **from first record**: all records consumed ÷ time from the first record received to the end of the last
  commit. Excludes the group join, includes everything after it.
- **steady**: records consumed after the first commit ÷ time from the end of the first to the end of the last
  commit (``ingest bench``'s definition). A Quix checkpoint holds every record consumed in its commit interval,
  so with the default 5 s the first commit comes after most of a 200k backlog has been read and this figure
  covers only the last checkpoints; ``--quix-commit-every 5000`` (ingest's batch size) makes it comparable.
- **wall**: start of the consume loop (``app.run`` / ``consumer.run``) to the last commit, group join included.
- **CPU-s/M**: the consumer process's CPU (all threads) ÷ records x 10⁶; **machine busy**: the whole
  machine's CPU busy share during the drain (``/proc/stat``), and the 1-minute load average before and after.

After each ingest drain the raw binary COPY ceiling of the same rows is measured in its database (as ``ingest
bench`` does).

Needs Quix Streams in the same environment (not a dependency of ingest)::

    .venv/bin/pip install -e '.[compare]'     # quixstreams[postgresql]
    INGEST_LOG_LEVEL=ERROR .venv/bin/python scripts/compare_quix.py --events 200000 --rounds 2

Postgres, Redis and the broker come from the usual ``INGEST_*`` settings; everything created (databases, topics,
Redis keys) is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from consumers import run, settings, streams
from consumers.cli import bench
from ingest import logs
from ingest.config import Config
from ingest.services import with_database
from ingest.sql import ident

QUIX_TABLE = "quix_webhook_events"
REQUIRED = frozenset({"tenant_id", "idempotency_key", "event_type", "source", "occurred_at", "payload"})
QUIX_DDL = f"""
CREATE TABLE {QUIX_TABLE} (
    tenant_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    event_type       text        NOT NULL,
    source           text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    payload          jsonb       NOT NULL,
    headers          jsonb,
    "timestamp"      timestamp   NOT NULL,  -- the Kafka timestamp (the sink's include_metadata)
    "__key"          text,                  -- the Kafka key (the sink's include_metadata)
    PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX {QUIX_TABLE}_tenant_time ON {QUIX_TABLE} (tenant_id, occurred_at DESC);
CREATE INDEX {QUIX_TABLE}_tenant_type ON {QUIX_TABLE} (tenant_id, event_type, occurred_at DESC);
"""


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _steady(commits: list[tuple[float, int]]) -> tuple[float, int]:
    """(events/s, commits) from (time after the commit, records consumed so far) of every commit that stored
    records: records consumed after the first commit ÷ time from the first to the last."""
    if len(commits) < 2:
        return float("nan"), len(commits)
    (t0, n0), (t1, n1) = commits[0], commits[-1]
    return (n1 - n0) / (t1 - t0), len(commits)


def _timeline(wall0: float, commits: list[tuple[float, int]], first_record: list[float]) -> dict[str, float]:
    """Seconds from the start of the consume loop to the first record handed to the processing code, to the
    first and to the last commit (wall); and records ÷ time from the first record to the last commit."""
    nan = float("nan")
    if not commits or not first_record:
        return {"first_record_seconds": nan, "first_commit_seconds": nan, "wall_seconds": nan,
                "from_first_record_events_per_s": nan}
    return {"first_record_seconds": first_record[0] - wall0, "first_commit_seconds": commits[0][0] - wall0,
            "wall_seconds": commits[-1][0] - wall0,
            "from_first_record_events_per_s": commits[-1][1] / (commits[-1][0] - first_record[0])}


# --- quix (child process) -----------------------------------------------------------------------------------

def _pg_params(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 5432,
            "dbname": unquote(parts.path.lstrip("/")),
            "user": unquote(parts.username) if parts.username else getpass.getuser(),
            "password": unquote(parts.password) if parts.password else ""}


def _quix_child(bootstrap: str, topic_name: str, group: str, database_url: str, published: int,
                commit_interval: float, commit_every: int, out: Any) -> None:
    from quixstreams import Application
    from quixstreams.sinks.community.postgresql import PostgreSQLSink

    commits: list[tuple[float, int]] = []
    counts = {"seen": 0, "undecodable": 0}
    first_record: list[float] = []
    app: Any = None

    def consumed() -> int:
        return counts["seen"] + counts["undecodable"]

    def maybe_stop() -> None:
        if consumed() >= published:
            app.stop()  # the loop ends after this record; Quix then commits the last checkpoint

    class TimedSink(PostgreSQLSink):
        def flush(self) -> None:
            n = consumed()
            super().flush()  # type: ignore[no-untyped-call]
            if n and (not commits or commits[-1][1] != n):  # a checkpoint that stored records
                commits.append((time.perf_counter(), n))

    def on_consumer_error(exc: BaseException, message: Any, logger: Any) -> bool:
        if message is None:  # a Kafka error, not a record: not ours to hide
            return False
        counts["undecodable"] += 1
        maybe_stop()
        return True

    def keep(value: Any) -> bool:
        if not counts["seen"]:
            first_record.append(time.perf_counter())
        counts["seen"] += 1
        maybe_stop()
        return isinstance(value, dict) and REQUIRED.issubset(value)

    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                          commit_interval=commit_interval, commit_every=commit_every, state_dir=state_dir, loglevel="WARNING",
                          on_consumer_error=on_consumer_error, auto_create_topics=False,
                          consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        topic = app.topic(topic_name, key_deserializer="str", value_deserializer="json")
        sink = TimedSink(**_pg_params(database_url), table_name=QUIX_TABLE, schema_auto_update=False,
                         primary_key_columns=["tenant_id", "idempotency_key"], on_conflict_do_nothing=True)
        sdf = app.dataframe(topic)
        sdf = sdf.filter(keep)
        sdf.sink(sink)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        app.run()
        cpu = time.process_time() - cpu0
    steady, n_commits = _steady(commits)
    out.put({"consumed": consumed(), "undecodable": counts["undecodable"], "commits": n_commits,
             "steady_events_per_s": steady, **_timeline(wall0, commits, first_record),
             "cpu_seconds_per_million": cpu * 1e6 / max(consumed(), 1)})


# --- ingest (child process) ---------------------------------------------------------------------------------

def _ingest_child(config: Config, stream_name: str, out: Any) -> None:
    logs.setup(config.log_level, config.log_format)
    out.put(asyncio.run(_ingest_drain(config, stream_name)))


async def _ingest_drain(config: Config, stream_name: str) -> dict[str, Any]:
    stream = streams.STREAMS[stream_name]
    rt = await run.open_runtime(config)
    run.tune_gc()
    consumer = run.build_consumer(config, stream, rt)
    commits: list[tuple[float, int]] = []
    total = 0

    def on_commit(outcome: Any, latencies: list[float]) -> None:
        nonlocal total
        total += outcome.stored + outcome.duplicates + outcome.rejected + outcome.quota_exceeded
        commits.append((time.perf_counter(), total))

    consumer.pipeline.on_commit = on_commit
    first_record: list[float] = []
    stage = consumer.pipeline.stage

    async def timed_stage(records: Any) -> Any:  # the first call gets the first records read
        if not first_record:
            first_record.append(time.perf_counter())
        return await stage(records)

    consumer.pipeline.stage = timed_stage  # type: ignore[method-assign]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        totals = await consumer.run(asyncio.Event(), drain=True)
    finally:
        await rt.aclose()
    cpu = time.process_time() - cpu0
    steady, n_commits = _steady(commits)
    consumed = totals.stored + totals.duplicates + totals.rejected + totals.quota_exceeded
    return {"consumed": consumed, "duplicates": totals.duplicates, "rejected": totals.rejected,
            "quota_exceeded": totals.quota_exceeded, "commits": n_commits, "steady_events_per_s": steady,
            **_timeline(wall0, commits, first_record), "cpu_seconds_per_million": cpu * 1e6 / max(consumed, 1)}


# --- the run ------------------------------------------------------------------------------------------------

def _in_child(target: Any, *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__} exited with {proc.exitcode}")
    result: dict[str, Any] = out.get(timeout=10)
    return result


async def _admin(base: Config) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(base.database_url, "postgres"))


async def _one(kind: str, i: int, base: Config, config: Config, uid: str, stream: streams.Stream,
               opts: bench.BenchOptions, published: int, args: argparse.Namespace,
               databases: list[str]) -> dict[str, Any]:
    db = f"cmpq_{uid}_{kind}_{i}"
    databases.append(db)
    load0, (busy0, total0) = _load(), _cpu_ticks()
    if kind == "quix":
        url = with_database(base.database_url, db)
        admin = await _admin(base)
        try:
            await admin.execute(f"CREATE DATABASE {ident(db)}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(QUIX_DDL)
        finally:
            await conn.close()
        figures = await asyncio.to_thread(
            _in_child, _quix_child, config.kafka_bootstrap, stream.topic_for(config), f"cmpq_{uid}_quix_{i}",
            url, published, args.quix_commit_interval, args.quix_commit_every)
        table = QUIX_TABLE
    else:
        config = dataclasses.replace(config, database_url=with_database(base.database_url, db),
                                     group_prefix=f"cmpq_{uid}_ingest_{i}", redis_prefix=f"cmpq_{uid}_{i}")
        url = config.database_url
        await run.run_migrations(config)
        figures = await asyncio.to_thread(_in_child, _ingest_child, config, stream.name)
        table = stream.table
    busy1, total1 = _cpu_ticks()
    figures["machine_busy"] = (busy1 - busy0) / max(1, total1 - total0)
    figures["load_before"], figures["load_after"] = load0, _load()
    conn = await asyncpg.connect(url)
    try:
        figures["rows_stored"] = await conn.fetchval(f"SELECT count(*) FROM {ident(table)}")
    finally:
        await conn.close()
    if kind == "ingest":
        figures["copy_ceiling_rows_per_s"] = await bench._ceiling(config, stream, opts, min(opts.events, 200_000))
    return {"consumer": kind, "run": i,
            **{k: (_round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}}


async def _cleanup(base: Config, config: Config, uid: str, databases: list[str]) -> None:
    from ingest.broker import delete_topics
    from ingest.services import redis_client

    await delete_topics(config, [s.topic_for(config) for s in streams.STREAMS.values()])
    admin = await _admin(base)
    try:
        for db in databases:
            await admin.execute(f"DROP DATABASE IF EXISTS {ident(db)} WITH (FORCE)")
    finally:
        await admin.close()
    redis = redis_client(config.redis_url, cluster=config.redis_cluster)
    try:
        keys = [k async for k in redis.scan_iter(match=f"cmpq_{uid}_*", count=5000)]
        for i in range(0, len(keys), 5000):
            await redis.delete(*keys[i:i + 5000])
    finally:
        await redis.aclose()


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    base = settings.from_env()
    uid = uuid.uuid4().hex[:8]
    config = dataclasses.replace(
        base, topic_prefix=f"cmpq_{uid}.", topic_partitions=args.partitions, metrics_port=0,
        maintenance_database_url="", session_timeout_ms=min(base.session_timeout_ms, 6000),
        rebalance_timeout_ms=min(base.rebalance_timeout_ms, 1000), heartbeat_interval_ms=500,
        producer_idempotence=False)  # as `ingest bench`: the load generator; dev brokers lack idempotence
    opts = dataclasses.replace(bench.BenchOptions(), events=args.events, tenants=args.tenants,
                               dup_rate=args.dup_rate, partitions=args.partitions, seed=args.seed)
    stream = streams.STREAMS[opts.stream]
    databases: list[str] = []
    results: list[dict[str, Any]] = []
    try:
        await run.ensure_all_topics(config)
        started = time.perf_counter()
        published = await bench._produce(config, stream.topic_for(config), opts, progress=False)
        print(f"published {published} records to {stream.topic_for(config)} ({args.partitions} partitions) "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        for i in range(1, args.rounds + 1):
            for kind in args.order:
                r = await _one(kind, i, base, config, uid, stream, opts, published, args, databases)
                results.append(r)
                print(_line(r), flush=True)
    finally:
        await _cleanup(base, config, uid, databases)

    def median(kind: str, key: str) -> float:
        values = [r[key] for r in results if r["consumer"] == kind and r[key] is not None]  # None: < 2 commits
        return statistics.median(values) if values else float("nan")

    summary: dict[str, Any] = {
        "events": published, "partitions": args.partitions, "tenants": args.tenants, "dup_rate": args.dup_rate,
        "quix_commit_interval_s": args.quix_commit_interval, "quix_commit_every": args.quix_commit_every}
    for key in ("from_first_record_events_per_s", "steady_events_per_s"):
        quix, ours = median("quix", key), median("ingest", key)
        summary[key] = {"quix_median": _round(quix), "ingest_median": _round(ours),
                        "ratio_ingest_to_quix": _round(ours / quix, 2)}
    summary["copy_ceiling_rows_per_s_median"] = _round(median("ingest", "copy_ceiling_rows_per_s"))
    return {"summary": summary, "runs": results}


def _round(x: float, digits: int = 0) -> float | None:
    if x != x:  # NaN: a drain with fewer than two commits
        return None
    return round(x, digits) if digits else round(x)


def _line(r: dict[str, Any]) -> str:
    def n(key: str, fmt: str = ",.0f") -> str:
        return "-" if r.get(key) is None else format(r[key], fmt)

    extra = f", COPY ceiling {n('copy_ceiling_rows_per_s')} rows/s" if r["consumer"] == "ingest" else ""
    return (f"{r['consumer']:<6} run {r['run']}: from first record {n('from_first_record_events_per_s')} events/s, "
            f"steady {n('steady_events_per_s')} events/s ({r['commits']} commits); first record "
            f"{n('first_record_seconds', '.1f')} s, first commit {n('first_commit_seconds', '.1f')} s, wall "
            f"{n('wall_seconds', '.1f')} s; consumed {r['consumed']:,}, rows {r['rows_stored']:,}, "
            f"{n('cpu_seconds_per_million', '.1f')} CPU-s/M, machine busy {n('machine_busy', '.0%')}, "
            f"load {r['load_before']:.2f} -> {r['load_after']:.2f}{extra}")


def main() -> int:
    defaults = bench.BenchOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events to publish (default 200000)")
    ap.add_argument("--tenants", type=int, default=defaults.tenants,
                    help=f"tenants (default {defaults.tenants}, as ingest bench)")
    ap.add_argument("--dup-rate", type=float, default=defaults.dup_rate,
                    help=f"re-delivery share (default {defaults.dup_rate})")
    ap.add_argument("--partitions", type=int, default=defaults.partitions,
                    help=f"partitions of the topic (default {defaults.partitions})")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--rounds", type=int, default=2, help="drains of each consumer (default 2)")
    ap.add_argument("--order", nargs="+", choices=["quix", "ingest"], default=["quix", "ingest"],
                    help="consumers in each round, in this order (default: quix ingest)")
    ap.add_argument("--quix-commit-interval", type=float, default=5.0,
                    help="Quix Application commit_interval in seconds (default 5.0, Quix's default)")
    ap.add_argument("--quix-commit-every", type=int, default=0, metavar="N",
                    help="Quix Application commit_every: also commit after N records (default 0 = off, Quix's default)")
    ap.add_argument("--json-file", type=Path, default=None, help="also write the figures as JSON to FILE")
    args = ap.parse_args()
    doc = asyncio.run(compare(args))
    print()
    s = doc["summary"]
    for key, label in (("from_first_record_events_per_s", "from the first record to the last commit"),
                       ("steady_events_per_s", "steady (first to last commit)")):
        m = s[key]
        print(f"{label}, median of {args.rounds}: quix {m['quix_median']} events/s, "
              f"ingest {m['ingest_median']} events/s, ratio {m['ratio_ingest_to_quix']} (target >= 3)")
    print(f"raw COPY ceiling, median: {s['copy_ceiling_rows_per_s_median']} rows/s")
    if args.json_file:
        args.json_file.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("INGEST_LOG_LEVEL", "ERROR")
    sys.exit(main())
