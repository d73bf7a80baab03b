"""Time partitions for range-partitioned tables (partition key ``occurred_at``, UTC boundaries).

Rules: partition names derive only from dates computed here, never from input; DDL runs with a short
``lock_timeout`` so it never queues ingestion behind it; ``ensure`` fills gaps around existing partitions, so a
change of granularity applies to future periods without touching old ones. A DEFAULT partition is the last-resort
safety net; rows there are reported by ``default_rows`` (and alerted on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

GRANULARITIES = ("day", "week", "month")
_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: datetime
    end: datetime


def period_start(day: date, granularity: str) -> date:
    """First day of the period containing ``day``."""
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


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def existing(conn: Conn, table: str) -> list[Partition]:
    """Range partitions of ``table`` (the DEFAULT partition excluded), ordered by start."""
    rows = await conn.fetch(
        """SELECT n.nspname || '.' || c.relname, pg_get_expr(c.relpartbound, c.oid)
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


def plan(have: list[Partition], first: date, last: date, granularity: str) -> list[tuple[datetime, datetime]]:
    """Ranges to create so that ``[first, last]`` (whole days) is covered, without overlapping ``have``."""
    wanted: list[tuple[datetime, datetime]] = []
    day = period_start(first, granularity)
    while day <= last:
        nxt = next_period(day, granularity)
        wanted.append((_midnight(day), _midnight(nxt)))
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


async def ensure(conn: Conn, table: str, *, first: date, last: date, granularity: str,
                 lock_timeout_ms: int) -> list[str]:
    """Create missing partitions covering ``[first, last]`` plus the DEFAULT partition; return created names."""
    created = []
    for start, end in plan(await existing(conn, table), first, last, granularity):
        name = f"{table}_p{start:%Y%m%d}"
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {ident(name)} PARTITION OF {ident(table)} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        created.append(name)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {ident(table + '_default')} PARTITION OF {ident(table)} DEFAULT")
    return created


async def default_rows(conn: Conn, table: str) -> int:
    """Rows that fell into the DEFAULT partition (should be 0; each one means a missing partition)."""
    return int(await conn.fetchval(f"SELECT count(*) FROM {ident(table + '_default')}"))
