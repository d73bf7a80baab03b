"""Quota overrides stored in Postgres (schemas/sql/002_quotas.sql): the ``OverrideSource`` the consumers poll.

Rule: a missing table reads as "no overrides" (logged once), so a consumer started before ``ingest migrate``
applies the defaults instead of failing.
"""

from __future__ import annotations

import logging

import asyncpg

from ingest.quota.limits import Override
from ingest.sql import ident

log = logging.getLogger(__name__)


class PostgresOverrides:
    """Overrides in Postgres (schemas/sql/002_quotas.sql). A missing table reads as "no overrides"."""

    def __init__(self, pool: asyncpg.Pool, table: str = "quota_overrides",
                 version_table: str = "quota_overrides_version") -> None:
        self._pool, self._table, self._version_table = pool, table, version_table
        self._warned = False
        self.acquire_timeout_s = 5.0  # never wait forever for a pooled connection inside a batch

    def _missing(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("quota overrides table missing (run `ingest migrate`); using the defaults only")

    async def version(self) -> int:
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn:
                return int(await conn.fetchval(f"SELECT version FROM {ident(self._version_table)}") or 0)
        except asyncpg.UndefinedTableError:
            self._missing()
            return -1

    async def load(self) -> tuple[int, list[Override]]:
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                version = int(await conn.fetchval(f"SELECT version FROM {ident(self._version_table)}") or 0)
                rows = await conn.fetch(
                    f"SELECT tenant_id, stream, per_second, burst, per_day FROM {ident(self._table)}")
        except asyncpg.UndefinedTableError:
            self._missing()
            return -1, []
        return version, [Override(r[0], r[1], r[2], r[3], r[4]) for r in rows]
