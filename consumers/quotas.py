"""Quota wiring and the operations behind ``ingest quota``: overrides in Postgres, usage in Redis.

Rules: overrides are written only here (the CLI and tests call these functions); consumers pick a change up
within ``INGEST_QUOTA_REFRESH_SECONDS``. Stream and table names come from ``consumers.streams``; tenant ids
and stream names are checked here, before any query.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from consumers import streams
from ingest.config import Config
from ingest.metrics import Metrics
from ingest.quota import admin as quota_admin
from ingest.quota import overrides as pg_overrides
from ingest.quota.admin import Usage
from ingest.quota.limits import ALL_STREAMS, LimitBook, Limits, LimitTable, Override, default_limits
from ingest.quota.overrides import PostgresOverrides
from ingest.quota.stage import RedisQuota

if TYPE_CHECKING:
    from ingest.sql import Conn

TENANT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # the contract's tenant_id (no braces: safe as a hash tag)


def build(config: Config, stream: str, *, redis: Redis | RedisCluster, pool: asyncpg.Pool, metrics: Metrics,
          clock: Callable[[], float] | None = None) -> RedisQuota:
    """The quota stage for ``stream``: costs nothing while every tenant is unlimited (the default)."""
    book = LimitBook(stream, default_limits(config.quota), PostgresOverrides(pool, streams.QUOTA_TABLES),
                     refresh_s=config.quota.refresh.total_seconds(), metrics=metrics)
    return RedisQuota(redis, prefix=config.redis_prefix, stream=stream, book=book, clock=clock,
                      fail_open=config.quota.fail_open, metrics=metrics)


def _check(tenant: str, stream: str | None) -> str:
    if not TENANT_ID.fullmatch(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}: 1-64 of [A-Za-z0-9._:-]")
    if stream is not None and stream not in streams.STREAMS:
        raise ValueError(f"unknown stream {stream!r}; choose {', '.join(streams.STREAMS)}")
    return stream or ALL_STREAMS


async def set_override(conn: Conn, tenant: str, *, stream: str | None = None, per_second: float | None = None,
                       burst: int | None = None, per_day: int | None = None) -> Override:
    """Upsert ``tenant``'s override (on every stream, or on ``stream``); None leaves a field as it is, 0 means
    unlimited. Returns the row as stored."""
    key = _check(tenant, stream)
    return await pg_overrides.upsert(conn, streams.QUOTA_TABLES, Override(tenant, key, per_second, burst, per_day))


async def clear_override(conn: Conn, tenant: str, *, stream: str | None = None) -> bool:
    """Remove ``tenant``'s override (tenant-wide, or for ``stream``): it falls back to the defaults."""
    return await pg_overrides.delete(conn, streams.QUOTA_TABLES, tenant, _check(tenant, stream))


async def overrides(conn: Conn, tenant: str | None = None) -> list[Override]:
    return await pg_overrides.select(conn, streams.QUOTA_TABLES, tenant)


@dataclass(frozen=True, slots=True)
class UsageRow:
    stream: str
    tenant: str
    limits: Limits
    usage: Usage


async def usage_rows(redis: Redis | RedisCluster, conn: Conn, config: Config,
                     tenant: str | None = None) -> list[UsageRow]:
    """Each tenant's usage against its limits, per stream: tenants with Redis state or an override (or, with
    ``tenant``, that tenant on every stream). Reads Redis state; never changes it."""
    if tenant is not None:
        _check(tenant, None)
        pairs = {(s, tenant) for s in streams.STREAMS}
    else:
        pairs = await quota_admin.tracked(redis, config.redis_prefix)
    rows = await overrides(conn, tenant)
    for o in rows:
        for s in ([o.stream] if o.stream else list(streams.STREAMS)):
            pairs.add((s, o.tenant))
    tables = {s: LimitTable.build(s, default_limits(config.quota), rows) for s in streams.STREAMS}
    entries = [(s, t, tables[s].limits_for(t)) for s, t in sorted(pairs, key=lambda p: (p[1], p[0])) if s in tables]
    used = await quota_admin.read(redis, config.redis_prefix, entries)
    return [UsageRow(s, t, limits, u) for (s, t, limits), u in zip(entries, used, strict=True)]


async def reset(redis: Redis | RedisCluster, config: Config, tenant: str) -> int:
    """Forget ``tenant``'s usage on every stream (full burst, nothing used today); returns keys deleted."""
    _check(tenant, None)
    return await quota_admin.forget(redis, config.redis_prefix, streams.STREAMS, tenant)
