"""Time partitions for range-partitioned tables (UTC boundaries; the partition key is read from the catalog).

Rules: partition names derive only from dates computed here (``<table>_pYYYYMMDD``, the period's first day),
never from input; every DDL statement runs in its own short transaction under ``SET LOCAL lock_timeout`` so it
gives up (SQLSTATE 55P03) instead of queueing ingestion behind it; ``plan`` fills gaps around existing
partitions, so a change of granularity applies to future periods without touching old ones.

A partition is created as a standalone table (``LIKE`` the parent), rows of its range are moved out of the
DEFAULT partition, and it is then ``ATTACH``ed, all in one transaction. ``ATTACH PARTITION`` takes only SHARE
UPDATE EXCLUSIVE on the parent (``CREATE TABLE … PARTITION OF`` takes ACCESS EXCLUSIVE), so creating partitions
never waits for, or blocks, COPY into the parent; and rows that fell into DEFAULT are not an obstacle (a plain
``PARTITION OF`` fails with 23514 when DEFAULT holds rows of the new range).

Retention uses plain ``DETACH PARTITION`` (ACCESS EXCLUSIVE on the parent, the partition and DEFAULT for the
few milliseconds of a catalog change): ``DETACH … CONCURRENTLY`` cannot run inside a transaction block and is
refused while a DEFAULT partition exists. Detach and drop (or move to the archive schema) commit together, so
no orphan table is ever left behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

GRANULARITIES = ("day", "week", "month")
_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass(frozen=True, slots=True)
class Partition:
    name: str  # schema-qualified, from the catalog
    start: datetime
    end: datetime

    @property
    def relname(self) -> str:
        return self.name.rpartition(".")[2]


def period_start(day: date, granularity: str) -> date:
    """First day of the period containing ``day`` (weeks start on Monday)."""
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    raise ValueError(f"granularity must be one of {GRANULARITIES}")


def next_period(start: date, granularity: str) -> date:
    """First day of the period after the one starting at ``start``."""
    if granularity == "day":
        return start + timedelta(days=1)
    if granularity == "week":
        return start + timedelta(days=7)
    if granularity == "month":
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    raise ValueError(f"granularity must be one of {GRANULARITIES}")


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)



def partition_name(table: str, start: datetime) -> str:
    """The name of the partition of ``table`` starting at ``start`` (a date computed here, never input)."""
    return f"{table}_p{start:%Y%m%d}"


def coverage(now: datetime, retention: timedelta, premake: timedelta) -> tuple[date, date]:
    """Whole days that must be covered by partitions: ``[now - retention, now + premake]`` (UTC)."""
    now = now.astimezone(UTC)
    return (now - retention).date(), (now + premake).date()


def cutoff(now: datetime, retention: timedelta) -> datetime:
    """Partitions ending at or before this instant are past retention (midnight UTC of ``now - retention``)."""
    return midnight((now.astimezone(UTC) - retention).date())


def expired(have: list[Partition], now: datetime, retention: timedelta) -> list[Partition]:
    """Partitions whose END is <= ``cutoff(now, retention)``, oldest first.

    Consistent with ``coverage``: the partition containing the first covered day ends after the cutoff, so what
    ``ensure`` creates is never pruned in the same round."""
    limit = cutoff(now, retention)
    return sorted((p for p in have if p.end <= limit), key=lambda p: p.start)


def plan(have: list[Partition], first: date, last: date, granularity: str) -> list[tuple[datetime, datetime]]:
    """Ranges to create so that ``[first, last]`` (whole days) is covered, without overlapping ``have``."""
    wanted: list[tuple[datetime, datetime]] = []
    day = period_start(first, granularity)
    while day <= last:
        nxt = next_period(day, granularity)
        wanted.append((midnight(day), midnight(nxt)))
        day = nxt
    gaps = []
    for start, end in wanted:
        pieces = [(start, end)]
        for p in have:
            pieces = [piece for s, e in pieces for piece in _subtract(s, e, p.start, p.end)]
        gaps += pieces
    return gaps


def _subtract(s: datetime, e: datetime, hs: datetime, he: datetime) -> list[tuple[datetime, datetime]]:
    if he <= s or hs >= e:
        return [(s, e)]
    return [(a, b) for a, b in ((s, hs), (he, e)) if a < b]


# -- catalog --------------------------------------------------------------------------------------------------

async def existing(conn: Conn, table: str) -> list[Partition]:
    """Range partitions of ``table`` (the DEFAULT partition excluded), ordered by start.

    Reads the catalog only: ``pg_get_expr(bound, 0)`` (a bound holds constants only) does not open the
    partitions, so this never waits behind a lock held on one of them."""
    rows = await conn.fetch(
        """SELECT n.nspname || '.' || c.relname, pg_get_expr(c.relpartbound, 0)
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE i.inhparent = $1::regclass""",
        ident(table),
    )
    out = []
    for name, bound in rows:
        m = _BOUND.search(bound or "")
        if m:
            out.append(Partition(name, datetime.fromisoformat(m.group(1)).astimezone(UTC),
                                 datetime.fromisoformat(m.group(2)).astimezone(UTC)))
    return sorted(out, key=lambda p: p.start)


async def partition_key(conn: Conn, table: str) -> str:
    """The (single) partition key column of ``table``."""
    key = await conn.fetchval(
        """SELECT a.attname FROM pg_partitioned_table pt
           JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
           WHERE pt.partrelid = $1::regclass""",
        ident(table),
    )
    if key is None:
        raise ValueError(f"{table} is not partitioned on a single column")
    return str(key)


async def _columns(conn: Conn, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", ident(table))
    return [r[0] for r in rows]


def default_name(table: str) -> str:
    return table + "_default"


async def _set_lock_timeout(conn: Conn, lock_timeout_ms: int) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")


# -- DDL ------------------------------------------------------------------------------------------------------

async def create(conn: Conn, table: str, start: datetime, end: datetime, *, lock_timeout_ms: int) -> int:
    """Create and attach the partition ``[start, end)`` of ``table``, moving its rows out of DEFAULT, in one
    transaction under ``lock_timeout``. Returns how many rows were moved from DEFAULT.

    Raises ``asyncpg.LockNotAvailableError`` (55P03) when a lock is not granted in time, and
    ``asyncpg.DuplicateTableError`` (or ``DuplicateObjectError`` for its row type) when a table of that name
    exists (e.g. created concurrently)."""
    name = partition_name(table, start)
    key = await partition_key(conn, table)
    cols = ", ".join(ident(c) for c in await _columns(conn, table))
    has_default = await conn.fetchval("SELECT to_regclass($1)", ident(default_name(table))) is not None
    async with conn.transaction():
        await _set_lock_timeout(conn, lock_timeout_ms)
        await conn.execute(
            f"CREATE TABLE {ident(name)} (LIKE {ident(table)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)")
        moved = 0
        if has_default:
            status = await conn.execute(
                f"WITH moved AS (DELETE FROM {ident(default_name(table))} "
                f"WHERE {ident(key)} >= $1 AND {ident(key)} < $2 RETURNING {cols}) "
                f"INSERT INTO {ident(name)} ({cols}) SELECT {cols} FROM moved", start, end)
            moved = int(status.rsplit(" ", 1)[-1])
        await conn.execute(
            f"ALTER TABLE {ident(table)} ATTACH PARTITION {ident(name)} "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")
    return moved


async def ensure_default(conn: Conn, table: str, *, lock_timeout_ms: int) -> bool:
    """Create the DEFAULT partition when missing; True if it was created."""
    if await conn.fetchval("SELECT to_regclass($1)", ident(default_name(table))) is not None:
        return False
    async with conn.transaction():
        await _set_lock_timeout(conn, lock_timeout_ms)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ident(default_name(table))} PARTITION OF {ident(table)} DEFAULT")
    return True


async def ensure(conn: Conn, table: str, *, first: date, last: date, granularity: str,
                 lock_timeout_ms: int) -> list[str]:
    """Create missing partitions covering ``[first, last]`` plus the DEFAULT partition; return created names.

    Raises on a lock timeout (the caller retries later). A range created concurrently by someone else is
    skipped."""
    created = []
    for start, end in plan(await existing(conn, table), first, last, granularity):
        try:
            await create(conn, table, start, end, lock_timeout_ms=lock_timeout_ms)
        except (asyncpg.DuplicateTableError, asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            # A concurrent creator won the race (Postgres reports it as the table, its row type or the catalog
            # index, depending on timing).
            if not _covered(await existing(conn, table), start, end):
                raise
            continue
        created.append(partition_name(table, start))
    await ensure_default(conn, table, lock_timeout_ms=lock_timeout_ms)
    return created


def _covered(have: list[Partition], start: datetime, end: datetime) -> bool:
    pieces = [(start, end)]
    for p in have:
        pieces = [piece for s, e in pieces for piece in _subtract(s, e, p.start, p.end)]
    return not pieces


async def detach(conn: Conn, table: str, part: Partition, *, lock_timeout_ms: int,
                 archive_schema: str | None = None) -> None:
    """Detach ``part`` from ``table`` and, in the same transaction, drop it or (``archive_schema``) move it there.

    Raises ``asyncpg.LockNotAvailableError`` when a lock is not granted within ``lock_timeout_ms``."""
    async with conn.transaction():
        await _set_lock_timeout(conn, lock_timeout_ms)
        await conn.execute(f"ALTER TABLE {ident(table)} DETACH PARTITION {ident(part.name)}")
        if archive_schema is None:
            await conn.execute(f"DROP TABLE {ident(part.name)}")
        else:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(archive_schema)}")
            await conn.execute(f"ALTER TABLE {ident(part.name)} SET SCHEMA {ident(archive_schema)}")


async def default_rows(conn: Conn, table: str) -> int:
    """Rows that fell into the DEFAULT partition (should be 0; each one means a missing partition)."""
    return int(await conn.fetchval(f"SELECT count(*) FROM {ident(default_name(table))}"))
