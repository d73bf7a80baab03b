"""Quota usage for operators: read it (``ingest quota get/list``) and clear it (``ingest quota reset``).

Rules: reading never changes a state; "today" and "now" are Redis ``TIME``, the clock the script uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from ingest.quota.gcra import DAY_US, State, judge, parse_state
from ingest.quota.keys import parse_key, state_key, state_key_pattern
from ingest.quota.limits import US, Limits


@dataclass(frozen=True, slots=True)
class Usage:
    """What ``ingest quota list`` shows: today's admitted and denied events, and the burst available now."""

    used_today: int
    denied_today: int
    burst_left: int | None  # None = no rate limit


def usage(state: State | None, limits: Limits, now_us: int) -> Usage:
    """``state``'s counts if they are today's (UTC), and how many events would be admitted at once now."""
    day = now_us // DAY_US
    used, denied = (state.used, state.denied) if state is not None and state.day == day else (0, 0)
    burst_left: int | None = None
    if limits.interval_us > 0:
        burst_left, _ = judge(state, now_us, limits.effective_burst, Limits(limits.per_second, limits.burst))
    return Usage(used, denied, burst_left)


async def redis_now_us(redis: Redis | RedisCluster) -> int:
    """Redis ``TIME`` in µs since the epoch."""
    seconds, micros = await redis.time()
    return int(seconds) * US + int(micros)


async def tracked(redis: Redis | RedisCluster, prefix: str) -> set[tuple[str, str]]:
    """``(stream, tenant)`` of every state under ``prefix`` (a ``SCAN``: for operators, never the hot path)."""
    keys = [k.decode() if isinstance(k, bytes) else str(k)
            async for k in redis.scan_iter(match=state_key_pattern(prefix), count=1000)]
    return {parsed for k in keys if (parsed := parse_key(prefix, k)) is not None}


async def read(redis: Redis | RedisCluster, prefix: str,
               entries: Sequence[tuple[str, str, Limits]]) -> list[Usage]:
    """Usage of each ``(stream, tenant, limits)`` now: one pipeline of ``GET`` and one ``TIME``."""
    pipe = redis.pipeline()
    for stream, tenant, _ in entries:
        pipe.get(state_key(prefix, stream, tenant))
    values = await pipe.execute() if entries else []
    now = await redis_now_us(redis)
    return [usage(parse_state(v), lim, now) for (_, _, lim), v in zip(entries, values, strict=True)]


async def forget(redis: Redis | RedisCluster, prefix: str, streams: Iterable[str], tenant: str) -> int:
    """Delete ``tenant``'s state on ``streams`` (full burst, nothing used today); returns the keys deleted.
    One command: a tenant's keys share a slot (the tenant is their hash tag)."""
    keys = [state_key(prefix, s, tenant) for s in streams]
    return int(await redis.delete(*keys)) if keys else 0
