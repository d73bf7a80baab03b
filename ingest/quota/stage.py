"""The quota stage: per-tenant, per-stream rate + burst (GCRA) and a per-UTC-day cap, enforced in Redis.

``admit`` gets the tenants of a batch's new events, in batch order, and answers per event. Rules:
- One call per batch, never per event; the Redis work is ONE ``EVALSHA`` carrying every limited tenant of the
  batch (one pipeline round trip per node on Redis Cluster). Unlimited tenants never touch Redis.
- An event is admitted only if both the rate and the daily cap allow it; denied events consume nothing.
  A tenant's events in one batch are judged in order, so its first ``k`` events are the admitted ones.
- Infrastructure failure raises (the batch rolls back and is retried: backpressure), unless ``fail_open``,
  which falls back to per-process in-memory limits until Redis answers again.
- Limits come from a ``LimitBook`` (defaults plus overrides, re-read at most once per refresh interval).
See docs/quotas.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from ingest.metrics import Metrics
from ingest.quota.gcra import SCRIPT, LocalLimiter, script_args
from ingest.quota.keys import group_by_slot, state_key
from ingest.quota.limits import US, LimitBook, Limits
from ingest.services import REDIS_UNAVAILABLE

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)


class Quota(Protocol):
    """Rule: one call per batch, never per event; raise on infrastructure failure (the batch is retried)."""

    async def admit(self, tenants: Sequence[str]) -> list[bool]: ...


class RedisQuota:
    """The quota stage of one stream, shared by all processes through Redis.

    ``clock`` (seconds since the epoch) is sent to the script as "now"; None (production) makes the script use
    Redis TIME, one clock for every process. Rule: one ``admit`` per batch, batches of one stream one at a time.
    """

    def __init__(self, redis: Redis | RedisCluster, *, prefix: str, stream: str, book: LimitBook,
                 clock: Callable[[], float] | None = None, fail_open: bool = False,
                 metrics: Metrics | None = None, probe_interval_s: float = 1.0) -> None:
        self._redis, self.prefix, self.stream, self.book = redis, prefix, stream, book
        self.clock, self.fail_open, self.metrics = clock, fail_open, metrics or Metrics()
        self._script: AsyncScript = redis.register_script(SCRIPT)
        self._local = LocalLimiter()
        self._outage = False
        self._probe_interval = probe_interval_s
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._redis_back = False

    def key(self, tenant: str) -> str:
        return state_key(self.prefix, self.stream, tenant)

    async def admit(self, tenants: Sequence[str]) -> list[bool]:
        """Verdicts in batch order. Raises the Redis error when Redis is unreachable (unless fail-open)."""
        if not tenants:
            return []
        table = await self.book.get()
        decisions = self.metrics.quota_decisions
        if not table.any_limited:
            decisions.labels(self.stream, "unlimited").inc(len(tenants))
            return [True] * len(tenants)
        counts: dict[str, int] = {}
        for t in tenants:
            counts[t] = counts.get(t, 0) + 1
        batch = [(t, c, lim) for t, c in counts.items() if not (lim := table.limits_for(t)).unlimited]
        if not batch:
            decisions.labels(self.stream, "unlimited").inc(len(tenants))
            return [True] * len(tenants)
        left = dict(zip((t for t, _, _ in batch), await self._decide(batch), strict=True))
        verdicts: list[bool] = []
        for t in tenants:
            k = left.get(t)
            if k is None:
                verdicts.append(True)
            else:
                verdicts.append(k > 0)
                left[t] = k - 1
        limited = sum(c for _, c, _ in batch)
        admitted = sum(verdicts) - (len(tenants) - limited)
        decisions.labels(self.stream, "unlimited").inc(len(tenants) - limited)
        decisions.labels(self.stream, "admitted").inc(admitted)
        decisions.labels(self.stream, "denied").inc(limited - admitted)
        return verdicts

    def _now_us(self) -> int:
        return round((self.clock or time.time)() * US)

    async def _decide(self, batch: Sequence[tuple[str, int, Limits]]) -> list[int]:
        if self._outage and self.fail_open and not self._redis_back:
            self._start_probe()
            return self._local.decide(batch, self._now_us())
        try:
            started = time.perf_counter()
            result = await self._evaluate(batch)
            self.metrics.quota_check.labels(self.stream).observe(time.perf_counter() - started)
        except REDIS_UNAVAILABLE as exc:
            self._enter_outage(exc)
            if not self.fail_open:
                raise
            return self._local.decide(batch, self._now_us())
        if self._outage:
            self._leave_outage()
        return result

    async def _evaluate(self, batch: Sequence[tuple[str, int, Limits]]) -> list[int]:
        now = None if self.clock is None else self._now_us()
        keys = [self.key(t) for t, _, _ in batch]
        if not isinstance(self._redis, RedisCluster):
            args = script_args(now, [(c, lim) for _, c, lim in batch])
            return [int(k) for k in await self._script(keys=keys, args=args)]
        return await self._evaluate_cluster(now, keys, batch)

    async def _evaluate_cluster(self, now: int | None, keys: list[str],
                                batch: Sequence[tuple[str, int, Limits]]) -> list[int]:
        """One script call per slot, sent as one pipeline (redis-py sends one round trip per node, in parallel)."""
        assert isinstance(self._redis, RedisCluster)
        groups = list(group_by_slot(keys).values())
        for attempt in (0, 1):
            pipe = self._redis.pipeline()
            for idx in groups:
                args = script_args(now, [(batch[i][1], batch[i][2]) for i in idx])
                pipe.execute_command("EVALSHA", self._script.sha, len(idx), *[keys[i] for i in idx], *args)
            try:
                replies = await pipe.execute()
                break
            except rx.NoScriptError:
                if attempt:
                    raise
                self._script.sha = await self._redis.script_load(SCRIPT)
        out = [0] * len(keys)
        for idx, reply in zip(groups, replies, strict=True):
            for i, k in zip(idx, reply, strict=True):
                out[i] = int(k)
        return out

    def _enter_outage(self, exc: BaseException) -> None:
        mode = "fail_open" if self.fail_open else "paused"
        self.metrics.quota_degraded.labels(mode).set(1)
        self._redis_back = False
        self._next_probe = time.monotonic() + self._probe_interval
        if not self._outage:
            self._outage = True
            log.warning("redis unreachable for quotas: " + (
                "applying per-process in-memory limits until it returns" if self.fail_open
                else "pausing consumption until it returns"),
                extra={"stream": self.stream, "error": type(exc).__name__, "detail": str(exc)[:200]})

    def _leave_outage(self) -> None:
        self._outage = False
        self._local.states.clear()
        self.metrics.quota_degraded.labels("fail_open" if self.fail_open else "paused").set(0)
        log.warning("redis reachable again for quotas", extra={"stream": self.stream})

    def _start_probe(self) -> None:
        """Fail-open only: check Redis in the background at most once per probe interval, so batches never
        wait on a dead Redis; when it answers, the next batch goes to Redis again."""
        if (self._probe is not None and not self._probe.done()) or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + self._probe_interval

        async def probe() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._probe_interval):
                    await self._redis.ping()
                self._redis_back = True

        self._probe = asyncio.create_task(probe())

    async def aclose(self) -> None:
        """Cancel a background probe (fail-open mode); the Redis client belongs to the caller."""
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
