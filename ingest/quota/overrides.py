"""Quota overrides stored in Postgres (schemas/sql/002_quotas.sql): polled by the consumers, written by operators.

Rules:
- Table names are configuration passed in by the caller (``OverrideTables``; ``consumers`` knows them).
- A consumer polls only the one-row version table, once per refresh interval, and re-reads the overrides when
  the version moved (a trigger moves it with every change). A missing table reads as "no overrides" (logged
  once), so a consumer started before ``ingest migrate`` applies the defaults instead of failing.
- ``upsert`` leaves a field given as None as it is; 0 means unlimited; values are finite and >= 0.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, NamedTuple

import asyncpg

from ingest.quota.limits import Override
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)


class OverrideTables(NamedTuple):
    """Where overrides live; names are configuration, never input."""

    overrides: str
    version: str  # one row whose ``version`` moves with every change to ``overrides``


def _override(row: asyncpg.Record) -> Override:
    return Override(row[0], row[1], row[2], row[3], row[4])


class PostgresOverrides:
    """The ``OverrideSource`` of the consumers: overrides in Postgres, read through ``pool``."""

    def __init__(self, pool: asyncpg.Pool, tables: OverrideTables) -> None:
        self._pool, self._tables = pool, tables
        self._warned = False
        self.acquire_timeout_s = 5.0  # never wait forever for a pooled connection inside a batch

    def _missing(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("quota overrides table missing (run `ingest migrate`); using the defaults only")

    async def version(self) -> int:
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn:
                return int(await conn.fetchval(f"SELECT version FROM {ident(self._tables.version)}") or 0)
        except asyncpg.UndefinedTableError:
            self._missing()
            return -1

    async def load(self) -> tuple[int, list[Override]]:
        """The version and every override, from one snapshot: ONE statement, so no explicit transaction (no
        BEGIN/COMMIT on the writer's connections besides the batches' own)."""
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn:
                rows = await conn.fetch(
                    f"""SELECT v.version, o.tenant_id, o.stream, o.per_second, o.burst, o.per_day
                        FROM (SELECT max(version) AS version FROM {ident(self._tables.version)}) AS v
                        LEFT JOIN {ident(self._tables.overrides)} AS o ON true""")
        except asyncpg.UndefinedTableError:
            self._missing()
            return -1, []
        version = int(rows[0][0] or 0) if rows else 0
        return version, [Override(r[1], r[2], r[3], r[4], r[5]) for r in rows if r[1] is not None]


async def select(conn: Conn, tables: OverrideTables, tenant: str | None = None) -> list[Override]:
    """Every override (or ``tenant``'s), ordered by tenant then stream."""
    rows = await conn.fetch(
        f"""SELECT tenant_id, stream, per_second, burst, per_day FROM {ident(tables.overrides)}
            WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY tenant_id, stream""", tenant)
    return [_override(r) for r in rows]


async def upsert(conn: Conn, tables: OverrideTables, override: Override) -> Override:
    """Store ``override`` (key: tenant and stream); a None field keeps the stored value. Returns the row as
    stored. Raises ValueError for a negative or infinite value, before any query."""
    for name in ("per_second", "burst", "per_day"):
        value = getattr(override, name)
        if value is not None and not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0")
    row = await conn.fetchrow(
        f"""INSERT INTO {ident(tables.overrides)} AS q (tenant_id, stream, per_second, burst, per_day)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (tenant_id, stream) DO UPDATE SET
                per_second = coalesce(excluded.per_second, q.per_second),
                burst = coalesce(excluded.burst, q.burst),
                per_day = coalesce(excluded.per_day, q.per_day),
                updated_at = now()
            RETURNING tenant_id, stream, per_second, burst, per_day""",
        override.tenant, override.stream, override.per_second, override.burst, override.per_day)
    assert row is not None
    return _override(row)


async def delete(conn: Conn, tables: OverrideTables, tenant: str, stream: str) -> bool:
    """Remove the override of ``tenant`` on ``stream`` (``ALL_STREAMS``: the tenant-wide one); False if absent."""
    status = await conn.execute(
        f"DELETE FROM {ident(tables.overrides)} WHERE tenant_id = $1 AND stream = $2", tenant, stream)
    return bool(status.endswith(" 1"))
