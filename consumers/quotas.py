"""Quota wiring and the operations behind ``ingest quota``: overrides in Postgres, usage in Redis.

Rules: overrides are written only here (the CLI and tests call these functions); consumers pick a change up
within ``INGEST_QUOTA_REFRESH_SECONDS``. Stream names come from ``consumers.streams``.
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
from ingest.quota import (
    ALL_STREAMS,
    US,
    LimitBook,
    Limits,
    LimitTable,
    Override,
    PostgresOverrides,
    RedisQuota,
    Usage,
    parse_key,
    parse_state,
    state_key,
    usage,
)

if TYPE_CHECKING:
    from ingest.sql import Conn

TENANT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # the contract's tenant_id (no braces: safe as a hash tag)


def default_limits(config: Config) -> Limits:
    q = config.quota
    return Limits(q.default_per_second, q.default_burst, q.default_per_day)


def build(config: Config, stream: str, *, redis: Redis | RedisCluster, pool: asyncpg.Pool, metrics: Metrics,
          clock: Callable[[], float] | None = None) -> RedisQuota:
    """The quota stage for ``stream``: costs nothing while every tenant is unlimited (the default)."""
    book = LimitBook(stream, default_limits(config), PostgresOverrides(pool),
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
    for name, value in (("per_second", per_second), ("burst", burst), ("per_day", per_day)):
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0")
    row = await conn.fetchrow(
        """INSERT INTO quota_overrides AS q (tenant_id, stream, per_second, burst, per_day)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (tenant_id, stream) DO UPDATE SET
               per_second = coalesce(excluded.per_second, q.per_second),
               burst = coalesce(excluded.burst, q.burst),
               per_day = coalesce(excluded.per_day, q.per_day),
               updated_at = now()
           RETURNING tenant_id, stream, per_second, burst, per_day""",
        tenant, key, per_second, burst, per_day)
    assert row is not None
    return Override(row[0], row[1], row[2], row[3], row[4])


async def clear_override(conn: Conn, tenant: str, *, stream: str | None = None) -> bool:
    """Remove ``tenant``'s override (tenant-wide, or for ``stream``): it falls back to the defaults."""
    key = _check(tenant, stream)
    status = await conn.execute("DELETE FROM quota_overrides WHERE tenant_id = $1 AND stream = $2", tenant, key)
    return bool(status.endswith(" 1"))


async def overrides(conn: Conn, tenant: str | None = None) -> list[Override]:
    rows = await conn.fetch(
        """SELECT tenant_id, stream, per_second, burst, per_day FROM quota_overrides
           WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY tenant_id, stream""", tenant)
    return [Override(r[0], r[1], r[2], r[3], r[4]) for r in rows]


@dataclass(frozen=True, slots=True)
class UsageRow:
    stream: str
    tenant: str
    limits: Limits
    usage: Usage


async def _redis_now_us(redis: Redis | RedisCluster) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * US + int(micros)


async def usage_rows(redis: Redis | RedisCluster, conn: Conn, config: Config,
                     tenant: str | None = None) -> list[UsageRow]:
    """Each tenant's usage against its limits, per stream: tenants with Redis state or an override (or, with
    ``tenant``, that tenant on every stream). Reads Redis state; never changes it."""
    rows = await overrides(conn, tenant)
    if tenant is not None:
        _check(tenant, None)
        keys = [state_key(config.redis_prefix, s, tenant) for s in streams.STREAMS]
    else:
        keys = [k.decode() if isinstance(k, bytes) else str(k)
                async for k in redis.scan_iter(match=f"{config.redis_prefix}:q:*", count=1000)]
    pairs = {parsed for k in keys if (parsed := parse_key(config.redis_prefix, k)) is not None}
    for o in rows:
        for s in ([o.stream] if o.stream else list(streams.STREAMS)):
            pairs.add((s, o.tenant))
    ordered = sorted(pairs, key=lambda p: (p[1], p[0]))
    pipe = redis.pipeline()
    for s, t in ordered:
        pipe.get(state_key(config.redis_prefix, s, t))
    states = await pipe.execute() if ordered else []
    now = await _redis_now_us(redis)
    tables = {s: LimitTable.build(s, default_limits(config), rows) for s in streams.STREAMS}
    out = []
    for (s, t), values in zip(ordered, states, strict=True):
        if s not in tables:
            continue
        limits = tables[s].limits_for(t)
        out.append(UsageRow(s, t, limits, usage(parse_state(values), limits, now)))
    return out


async def reset(redis: Redis | RedisCluster, config: Config, tenant: str) -> int:
    """Forget ``tenant``'s usage on every stream (full burst, nothing used today); returns keys deleted."""
    _check(tenant, None)
    keys = [state_key(config.redis_prefix, s, tenant) for s in streams.STREAMS]
    return int(await redis.delete(*keys))  # one slot: every key carries the tenant as hash tag
