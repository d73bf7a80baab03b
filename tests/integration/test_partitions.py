"""Partition maintenance against a real Postgres: create ahead, prune past retention, archive, export, the
advisory lock, lock_timeout (never queue ingestion), the DEFAULT partition, and the out-of-window policy."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from consumers import run, streams
from ingest import ledger, partitions
from ingest.config import Config
from ingest.maintenance import LedgerPolicy, Maintenance, TablePolicy
from ingest.metrics import Metrics
from ingest.services import create_pool
from tests.integration.helpers import drain, publish_raw

TABLE = streams.WEBHOOK.table
NOW = datetime.now(UTC)
TODAY = NOW.date()


def pname(day: date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def days(first: int, last: int) -> list[str]:
    """Partition names for TODAY+first .. TODAY+last (inclusive)."""
    return [pname(TODAY + timedelta(days=n)) for n in range(first, last + 1)]


def clock(offset: timedelta = timedelta(0)):  # type: ignore[no-untyped-def]
    return lambda: NOW + offset


@pytest.fixture
async def pool(config: Config) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(config.database_url, max_size=3)
    yield p
    await p.close()


async def attached(db: asyncpg.Connection, table: str = TABLE) -> list[partitions.Partition]:
    return await partitions.existing(db, table)


async def insert_rows(db: asyncpg.Connection, day: date, n: int, hour: int = 12) -> None:
    await db.execute(
        f"""INSERT INTO {TABLE} (tenant_id, idempotency_key, event_type, source, occurred_at, payload,
                                 kafka_timestamp, source_partition, source_offset)
            SELECT 'org-1', 'k-' || $1::text || '-' || g, 'invoice.paid', 'stripe',
                   $2::timestamptz + g * interval '1 second', jsonb_build_object('n', g), now(), 0, g
            FROM generate_series(1, $3) AS g""",
        day.isoformat(), datetime(day.year, day.month, day.day, hour, tzinfo=UTC), n)


def assert_no_overlap(have: list[partitions.Partition]) -> None:
    for a, b in itertools.pairwise(have):
        assert a.end <= b.start, (a, b)


async def test_creates_ahead_and_prunes_exactly_what_is_past_retention(pool: asyncpg.Pool,
                                                                        db: asyncpg.Connection) -> None:
    # 120 days of daily partitions (the fixture already made TODAY-3 .. TODAY+2)
    build = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=120), timedelta(days=2))], clock=clock())
    report = await build.run_once()
    assert report.created == days(-120, -4) and report.dropped == []
    assert [p.relname for p in await attached(db)] == days(-120, 2)

    metrics = Metrics()
    registry = metrics.registry
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=90), timedelta(days=2))], clock=clock(),
                    metrics=metrics)
    report = await m.run_once()
    assert report.created == []
    assert report.dropped == report.detached == days(-120, -91)  # END <= midnight(TODAY - 90)
    assert report.lock_timeouts == 0 and not report.errors and not report.skipped
    assert [p.relname for p in await attached(db)] == days(-90, 2)
    assert await db.fetchval("SELECT to_regclass($1)", pname(TODAY - timedelta(days=91))) is None

    # the clock moves 10 days ahead: 10 partitions created ahead, 10 more pruned
    m.clock = clock(timedelta(days=10))
    report = await m.run_once()
    assert report.created == days(3, 12)
    assert report.dropped == days(-90, -81)
    assert [p.relname for p in await attached(db)] == days(-80, 12)
    assert registry.get_sample_value("ingest_partition_changes_total",
                                     {"table": TABLE, "action": "dropped"}) == 40
    assert registry.get_sample_value("ingest_partition_maintenance_runs_total", {"result": "ok"}) == 2
    ahead = registry.get_sample_value("ingest_partition_coverage_ahead_seconds", {"table": TABLE})
    assert ahead is not None and timedelta(days=2) < timedelta(seconds=ahead) <= timedelta(days=3)

    # dry run: says what would go, changes nothing
    m.clock = clock(timedelta(days=11))
    plan = await m.run_once(dry_run=True)
    assert plan.dry_run and plan.dropped == days(-80, -80) and plan.created == days(13, 13)
    assert [p.relname for p in await attached(db)] == days(-80, 12)


async def test_granularity_change_keeps_old_partitions(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    before = await attached(db)
    m = Maintenance(pool, [TablePolicy(TABLE, "month", timedelta(days=3), timedelta(days=40))], clock=clock())
    report = await m.run_once()
    after = await attached(db)
    assert all(p in after for p in before)  # the day partitions are untouched
    assert_no_overlap(after)
    assert report.created and after[-1].end >= partitions.midnight(TODAY + timedelta(days=40))
    # the first new partition starts where the day partitions end, the next ones are whole months
    assert after[len(before)].start == before[-1].end
    for p in after[len(before) + 1:]:
        assert p.start.day == 1 and p.end.day == 1


async def test_archive_mode_moves_partitions_to_schema_archive(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    await Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=10), timedelta(days=2))],
                      clock=clock()).run_once()
    await insert_rows(db, TODAY - timedelta(days=9), 5)
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=7), timedelta(days=2))], clock=clock(),
                    archive=True)
    report = await m.run_once()
    assert report.archived == report.detached == days(-10, -8) and report.dropped == []
    assert [p.relname for p in await attached(db)] == days(-7, 2)
    archived = await db.fetch("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                              "WHERE n.nspname = 'archive' AND relkind = 'r' ORDER BY relname")
    assert [r[0] for r in archived] == days(-10, -8)
    assert await db.fetchval(f'SELECT count(*) FROM archive."{pname(TODAY - timedelta(days=9))}"') == 5
    assert await db.fetchval(f"SELECT count(*) FROM {TABLE}") == 0


async def test_export_writes_a_readable_gzip_before_dropping(pool: asyncpg.Pool, db: asyncpg.Connection,
                                                             tmp_path: Path) -> None:
    await Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=6), timedelta(days=2))],
                      clock=clock()).run_once()
    await insert_rows(db, TODAY - timedelta(days=5), 7)
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=4), timedelta(days=2))], clock=clock(),
                    export_dir=tmp_path / "exports")
    report = await m.run_once()
    assert report.dropped == days(-6, -5)
    files = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert files == [f"{n}.csv.gz" for n in days(-6, -5)]
    with gzip.open(tmp_path / "exports" / f"{pname(TODAY - timedelta(days=5))}.csv.gz", "rt") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    assert len(rows) == 7
    assert {r["tenant_id"] for r in rows} == {"org-1"}
    assert sorted(orjson.loads(r["payload"])["n"] for r in rows) == list(range(1, 8))
    with gzip.open(tmp_path / "exports" / f"{pname(TODAY - timedelta(days=6))}.csv.gz", "rt") as f:
        assert f.read().startswith("tenant_id,idempotency_key,")  # header only: that day was empty

    # an export that cannot be written keeps the partition (nothing is dropped unexported)
    (tmp_path / "blocked").write_text("a file where the directory should be")
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=3), timedelta(days=2))], clock=clock(),
                    export_dir=tmp_path / "blocked")
    report = await m.run_once()
    assert report.dropped == [] and report.errors and "kept" in report.errors[0]
    assert pname(TODAY - timedelta(days=4)) in [p.relname for p in await attached(db)]


async def test_racing_maintenance_never_fails_or_overlaps(config: Config, db: asyncpg.Connection) -> None:
    pools = [await create_pool(config.database_url, max_size=2) for _ in range(2)]
    try:
        # different granularities on purpose: without the advisory lock they would try to create overlapping
        # partitions; with it, one round runs and the other is skipped.
        a = Maintenance(pools[0], [TablePolicy(TABLE, "day", timedelta(days=30), timedelta(days=20))],
                        clock=clock(timedelta(days=3)))
        b = Maintenance(pools[1], [TablePolicy(TABLE, "week", timedelta(days=30), timedelta(days=20))],
                        clock=clock(timedelta(days=3)))
        for _ in range(3):
            reports = await asyncio.gather(a.run_once(), b.run_once())
            assert all(not r.errors and not r.lock_timeouts for r in reports)
            assert not all(r.skipped for r in reports)
        assert_no_overlap(await attached(db))

        # the library call itself (no advisory lock) tolerates a concurrent creator of the same ranges
        async with pools[0].acquire() as c1, pools[1].acquire() as c2:
            first, last = TODAY + timedelta(days=30), TODAY + timedelta(days=45)
            created = await asyncio.gather(
                partitions.ensure(c1, TABLE, first=first, last=last, granularity="day", lock_timeout_ms=2000),
                partitions.ensure(c2, TABLE, first=first, last=last, granularity="day", lock_timeout_ms=2000))
        assert sorted(created[0] + created[1]) == sorted(set(created[0] + created[1]))
        have = await attached(db)
        assert_no_overlap(have)
        assert partitions.plan(have, TODAY - timedelta(days=27), TODAY + timedelta(days=23), "day") == []
        assert partitions.plan(have, first, last, "day") == []
    finally:
        for p in pools:
            await p.close()


async def _copy_today(pool: asyncpg.Pool, n: int) -> float:
    """COPY ``n`` rows for today into the parent; return how long it took."""
    cols = ("tenant_id", "idempotency_key", "event_type", "source", "occurred_at", "payload",
            "kafka_timestamp", "source_partition", "source_offset")
    rows = [("org-2", f"c-{time.monotonic_ns()}-{i}", "e", "s", NOW, b"{}", NOW, 0, i) for i in range(n)]
    t = time.monotonic()
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(TABLE, records=rows, columns=cols)
    return time.monotonic() - t


@pytest.mark.parametrize("blocker", [
    "SELECT count(*) FROM webhook_events",  # a long reader on the parent (ACCESS SHARE)
    "LOCK TABLE {expired} IN ACCESS EXCLUSIVE MODE",  # DDL / a lock on the partition being detached
])
async def test_lock_timeout_gives_up_quickly_and_copy_keeps_flowing(pool: asyncpg.Pool, config: Config,
                                                                      db: asyncpg.Connection, blocker: str) -> None:
    expired = pname(TODAY - timedelta(days=3))
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=2), timedelta(days=2))], clock=clock(),
                    lock_timeout_ms=300)
    holder = await asyncpg.connect(config.database_url)
    holder_tx = holder.transaction()
    await holder_tx.start()
    try:
        await holder.execute(blocker.format(expired=f'"{expired}"'))
        started = time.monotonic()
        task = asyncio.create_task(m.run_once())
        await asyncio.sleep(0.05)  # maintenance is now waiting for its lock
        copy_s = await _copy_today(pool, 500)
        report = await task
        maint_s = time.monotonic() - started
        # (a) maintenance gave up after ~lock_timeout instead of queueing behind the holder...
        assert report.lock_timeouts == 1 and report.dropped == []
        assert maint_s < 2.0
        # (b) ...so the COPY (queued at most behind the DDL's lock request) completed while the holder still holds
        assert copy_s < 2.0
        assert holder.is_in_transaction()
    finally:
        await holder_tx.rollback()
        await holder.close()
    assert await db.fetchval(f"SELECT count(*) FROM {TABLE}") == 500
    assert expired in [p.relname for p in await attached(db)]
    # next round, nothing in the way: done
    report = await m.run_once()
    assert report.dropped == [expired] and report.lock_timeouts == 0


async def test_creating_partitions_does_not_wait_for_an_open_copy(pool: asyncpg.Pool, config: Config,
                                                                  db: asyncpg.Connection) -> None:
    """ATTACH PARTITION takes SHARE UPDATE EXCLUSIVE on the parent: no conflict with a COPY in flight."""
    writer = await asyncpg.connect(config.database_url)
    tx = writer.transaction()
    await tx.start()
    try:
        await writer.execute(
            f"""INSERT INTO {TABLE} (tenant_id, idempotency_key, event_type, source, occurred_at, payload,
                                     kafka_timestamp, source_partition, source_offset)
                VALUES ('org-3', 'open-tx', 'e', 's', now(), '{{}}', now(), 0, 0)""")
        m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=3), timedelta(days=2))],
                        clock=clock(timedelta(days=5)), lock_timeout_ms=300)
        report = await m.run_once(prune=False)
        assert report.created == days(3, 7) and report.lock_timeouts == 0
    finally:
        await tx.commit()
        await writer.close()


async def test_rows_in_default_are_reported_then_moved_into_their_new_partition(pool: asyncpg.Pool,
                                                                                 db: asyncpg.Connection) -> None:
    far = TODAY + timedelta(days=20)
    await insert_rows(db, far, 3)  # bypasses the validator: no partition yet, so DEFAULT takes them
    assert await db.fetchval(f"SELECT count(*) FROM {TABLE}_default") == 3
    metrics = Metrics()
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=3), timedelta(days=2))], clock=clock(),
                    metrics=metrics)
    report = await m.run_once()
    assert report.default_rows == {TABLE: 3}
    assert metrics.registry.get_sample_value("ingest_default_partition_rows", {"table": TABLE}) == 3

    # a plain CREATE TABLE ... PARTITION OF would fail (23514); maintenance moves the rows and attaches
    m.clock = clock(timedelta(days=19))
    report = await m.run_once()
    assert pname(far) in report.created
    assert report.moved_from_default == {pname(far): 3}
    assert report.default_rows == {TABLE: 0} and not report.errors
    where = await db.fetch(f"SELECT DISTINCT tableoid::regclass::text FROM {TABLE}")
    assert [r[0] for r in where] == [pname(far)]
    assert metrics.registry.get_sample_value("ingest_default_partition_rows", {"table": TABLE}) == 0
    # the moved partition carries the parent's indexes
    idx = await db.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = $1", pname(far))
    assert idx == await db.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = $1", TABLE) == 3


async def test_late_event_lands_in_its_partition_and_out_of_window_ones_are_dead_lettered(
        config: Config, db: asyncpg.Connection) -> None:
    # fixture settings: retention 3 days, accepted [now - 3 days, now + 1 day], partitions TODAY-3 .. TODAY+2
    def event(key: str, occurred: datetime) -> tuple[bytes, bytes]:
        return b"org-9", orjson.dumps({
            "tenant_id": "org-9", "idempotency_key": key, "event_type": "a", "source": "s",
            "occurred_at": occurred.isoformat().replace("+00:00", "Z"), "payload": {}})

    await publish_raw(config, "webhook", [
        event("late", NOW - timedelta(days=2, hours=20)),
        event("future", NOW + timedelta(days=30)),
        event("ancient", NOW - timedelta(days=10)),
    ])
    await drain(config, "webhook")
    rows = await db.fetch(f"SELECT idempotency_key, tableoid::regclass::text FROM {TABLE}")
    assert [tuple(r) for r in rows] == [("late", pname((NOW - timedelta(days=2, hours=20)).date()))]
    dead = await db.fetch("SELECT idempotency_key, reason FROM dead_letters ORDER BY idempotency_key")
    assert [tuple(r) for r in dead] == [("ancient", "timestamp_too_old"), ("future", "timestamp_in_future")]
    assert await partitions.default_rows(db, TABLE) == 0


async def test_run_forever_repeats_until_stopped_and_survives_failures(config: Config) -> None:
    metrics = Metrics()
    registry = metrics.registry
    pool = await create_pool(config.database_url, max_size=1)
    m = Maintenance(pool, [TablePolicy(TABLE, "day", timedelta(days=3), timedelta(days=2))], clock=clock(),
                    interval=0.05, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(m.run_forever(stop))
    try:
        async with asyncio.timeout(10):
            while (registry.get_sample_value("ingest_partition_maintenance_runs_total", {"result": "ok"}) or 0) < 2:
                await asyncio.sleep(0.02)
        await pool.close()  # every round now fails: logged, counted, retried
        async with asyncio.timeout(10):
            while not registry.get_sample_value("ingest_partition_maintenance_runs_total", {"result": "failed"}):
                await asyncio.sleep(0.02)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await pool.close()


async def test_maintenance_drops_the_ledger_epoch_past_the_window_and_counts_its_keys(
        pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    """A round rolls the ledger (tests/integration/test_ledger.py has the details): the epoch that ended more
    than a window ago is dropped whole, with a metric; a dry run only names it."""
    table = streams.WEBHOOK.tables().ledger
    listing = ledger.epochs_table(table)
    (first,) = [r[0] for r in await db.fetch(f"SELECT epoch FROM {listing} WHERE opened_at IS NOT NULL")]
    async with db.transaction():
        await ledger.claim(db, table, "webhook", [("org-1", f"k{i}") for i in range(300)], timedelta(days=7))
    await db.execute(f"CREATE TABLE {ledger.partition_name(table, first + 1)} PARTITION OF {table} "
                     f"FOR VALUES IN ({first + 1})")
    await db.execute(f"INSERT INTO {listing} VALUES ($1, now() - interval '8 days')", first + 1)
    await db.execute(f"UPDATE {listing} SET opened_at = now() - interval '9 days' WHERE epoch = $1", first)
    await db.execute(f"ANALYZE {table}")
    metrics = Metrics()
    m = Maintenance(pool, [], ledger=LedgerPolicy(table, timedelta(days=7)), metrics=metrics)
    gone = ledger.partition_name(table, first)
    preview = await m.run_once(dry_run=True)
    assert gone in preview.dropped and preview.ledger_pruned == 300
    report = await m.run_once()
    assert gone in report.dropped and report.ledger_pruned == 300
    assert metrics.registry.get_sample_value("ingest_ledger_pruned_total") == 300
    assert await db.fetchval("SELECT to_regclass($1)", gone) is None
    assert (await m.run_once()).ledger_pruned == 0


async def test_cli_prune_and_the_consumers_maintenance_expire_the_ledger(env: dict[str, str], config: Config,
                                                                         db: asyncpg.Connection) -> None:
    table = streams.WEBHOOK.tables().ledger
    listing = ledger.epochs_table(table)
    first = await db.fetchval(f"SELECT max(epoch) FROM {listing} WHERE opened_at IS NOT NULL")
    async with db.transaction():
        await ledger.claim(db, table, "audit", [("org-1", f"k{g}") for g in range(40)], timedelta(days=7))
    await db.execute(f"UPDATE {listing} SET opened_at = now() - interval '30 days' WHERE epoch = $1", first)
    await db.execute(f"CREATE TABLE {ledger.partition_name(table, first + 1)} PARTITION OF {table} "
                     f"FOR VALUES IN ({first + 1})")
    await db.execute(f"INSERT INTO {listing} VALUES ($1, now() - interval '29 days')", first + 1)
    await db.execute(f"ANALYZE {table}")
    gone = ledger.partition_name(table, first)
    cli = [sys.executable, "-m", "consumers.cli", "partitions", "prune"]
    out = await asyncio.to_thread(subprocess.run, [*cli, "--dry-run"], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"dedupe-ledger epochs past the window, would drop: {gone} (~40 keys)" in out.stdout
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 40
    out = await asyncio.to_thread(subprocess.run, cli, env={**os.environ, **env}, capture_output=True, text=True,
                                  timeout=60)
    assert out.returncode == 0, out.stderr
    assert gone in out.stdout and "dedupe-ledger keys dropped with their epochs: ~40" in out.stdout
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0

    rt = await run.open_runtime(config)
    try:
        assert run.maintenance(config, rt).ledger == LedgerPolicy(table, config.dedupe.window, config.dedupe.epochs)
    finally:
        await rt.aclose()


async def test_concurrent_creators_of_the_same_ranges_never_fail(config: Config) -> None:
    """Two processes creating the same partitions at once: Postgres reports the loser as a duplicate table, row
    type or catalog entry depending on timing; every form is a range someone else created (once in ~40 tries
    the row type was reported, and ``ensure`` failed)."""
    conns = [await asyncpg.connect(config.database_url) for _ in range(2)]
    try:
        for i in range(40):
            first = TODAY + timedelta(days=400 + 10 * i)
            await asyncio.gather(*(partitions.ensure(c, TABLE, first=first, last=first + timedelta(days=5),
                                                     granularity="day", lock_timeout_ms=2000) for c in conns))
        assert_no_overlap(await attached(conns[0]))
    finally:
        for c in conns:
            await c.close()
