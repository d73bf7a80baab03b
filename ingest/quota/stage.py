"""The quota stage: per-tenant, per-stream rate + burst (GCRA) and a per-UTC-day cap, enforced in Redis.

``admit`` gets the tenants of a batch's new events, in batch order, and answers per event. Rules:
- One call per batch, never per event; the Redis work is ONE ``EVALSHA`` carrying every limited tenant of the
  batch (one pipeline round trip per node on Redis Cluster). Unlimited tenants never touch Redis.
- An event is admitted only if both the rate and the daily cap allow it; denied events consume nothing.
  A tenant's events in one batch are judged in order, so its first ``k`` new events are the admitted ones.
- Charged once per event: given the events' dedupe keys, the script keeps each verdict in Redis (in the
  tenant's slot) and an event judged again (its batch retried after a failed COMMIT, a cut connection, a
  crash) gets its first verdict without being charged again. ``settle`` drops those verdicts once their batch
  committed (best effort; otherwise they expire after ``judged_ttl``).
- Infrastructure failure raises (the batch rolls back and is retried: backpressure), unless ``fail_open``,
  which falls back to per-process in-memory limits until Redis answers again.
- Limits come from a ``LimitBook`` (defaults plus overrides, re-read at most once per refresh interval).
See docs/quotas.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from ingest import scripts
from ingest.metrics import Metrics
from ingest.quota.gcra import SCRIPT, LocalLimiter, script_args
from ingest.quota.keys import group_by_slot, judged_key, judged_prefix, state_key
from ingest.quota.limits import US, LimitBook, Limits
from ingest.rows import Key
from ingest.services import REDIS_UNAVAILABLE

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)

_SETTLE_ERRORS: tuple[type[BaseException], ...] = (rx.RedisError, *REDIS_UNAVAILABLE)


class Quota(Protocol):
    """Rule: one call per batch, never per event; raise on infrastructure failure (the batch is retried).
    With ``keys`` (the events' dedupe keys, aligned with ``tenants``) an event judged before keeps its verdict
    and is not charged again; ``settle`` is told the keys of a committed batch (best effort, never raises)."""

    async def admit(self, tenants: Sequence[str], keys: Sequence[Key] | None = None) -> list[bool]: ...

    async def settle(self, keys: Sequence[Key]) -> None: ...


class RedisQuota:
    """The quota stage of one stream, shared by all processes through Redis.

    ``clock`` (seconds since the epoch) is sent to the script as "now"; None (production) makes the script use
    Redis TIME, one clock for every process. Rule: one ``admit`` per batch, batches of one stream one at a time.
    """

    JUDGED_TTL_S = 86_400
    """How long a verdict is kept for a batch that never committed (its process died, or Redis failed before
    ``settle``): a retry within this time is not charged again."""

    def __init__(self, redis: Redis | RedisCluster, *, prefix: str, stream: str, book: LimitBook,
                 clock: Callable[[], float] | None = None, fail_open: bool = False,
                 metrics: Metrics | None = None, probe_interval_s: float = 1.0,
                 judged_ttl_s: int = JUDGED_TTL_S) -> None:
        self._redis, self.prefix, self.stream, self.book = redis, prefix, stream, book
        self.judged_ttl_s = judged_ttl_s
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

    async def admit(self, tenants: Sequence[str], keys: Sequence[Key] | None = None) -> list[bool]:
        """Verdicts in batch order. Raises the Redis error when Redis is unreachable (unless fail-open). With
        ``keys`` (each event's dedupe key), an event judged before gets the same verdict, uncharged."""
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
        digests: dict[str, list[bytes]] | None = None
        if keys is not None:
            digests = {t: [] for t, _, _ in batch}
            for key in keys:
                if (own := digests.get(key[0])) is not None:
                    own.append(_digest(key))
        left = {t: iter(v) for (t, _, _), v in zip(batch, await self._decide(batch, digests), strict=True)}
        verdicts = [next(it) if (it := left.get(t)) is not None else True for t in tenants]
        limited = sum(c for _, c, _ in batch)
        admitted = sum(verdicts) - (len(tenants) - limited)
        decisions.labels(self.stream, "unlimited").inc(len(tenants) - limited)
        decisions.labels(self.stream, "admitted").inc(admitted)
        decisions.labels(self.stream, "denied").inc(limited - admitted)
        return verdicts

    async def settle(self, keys: Sequence[Key]) -> None:
        """Forget the verdicts of ``keys`` (their batch committed: a copy seen later is a duplicate, or, replayed
        from dead letters, judged afresh). Best effort: a failure is logged and the verdicts expire by themselves."""
        if not keys or self._outage:
            return
        table = await self.book.get()
        if not table.any_limited:
            return
        names = [judged_key(self.prefix, self.stream, k[0], _digest(k)) for k in keys
                 if not table.limits_for(k[0]).unlimited]
        if not names:
            return
        try:
            if isinstance(self._redis, RedisCluster):
                pipe = self._redis.pipeline()
                for idx in group_by_slot(names).values():
                    pipe.execute_command("UNLINK", *[names[i] for i in idx])
                await pipe.execute()
            else:
                await self._redis.unlink(*names)
        except _SETTLE_ERRORS as exc:
            log.warning("quota verdicts not dropped after commit; they expire by themselves",
                        extra={"stream": self.stream, "error": type(exc).__name__, "keys": len(names)})

    def _now_us(self) -> int:
        return round((self.clock or time.time)() * US)

    async def _decide(self, batch: Sequence[tuple[str, int, Limits]],
                      digests: dict[str, list[bytes]] | None) -> list[list[bool]]:
        """Per tenant of ``batch``, the verdict of each of its events in order."""
        if self._outage and self.fail_open and not self._redis_back:
            self._start_probe()
            return _spread(batch, self._local.decide(batch, self._now_us()))
        try:
            started = time.perf_counter()
            result = await self._evaluate(batch, digests)
            self.metrics.quota_check.labels(self.stream).observe(time.perf_counter() - started)
        except REDIS_UNAVAILABLE as exc:
            self._enter_outage(exc)
            if not self.fail_open:
                raise
            return _spread(batch, self._local.decide(batch, self._now_us()))
        if self._outage:
            self._leave_outage()
        return result

    async def _evaluate(self, batch: Sequence[tuple[str, int, Limits]],
                        digests: dict[str, list[bytes]] | None) -> list[list[bool]]:
        """One ``EVALSHA`` (single Redis), or one per slot in one cluster pipeline."""
        now = None if self.clock is None else self._now_us()
        keys = [self.key(t) for t, _, _ in batch]
        groups = (list(group_by_slot(keys).values()) if isinstance(self._redis, RedisCluster)
                  else [list(range(len(keys)))])
        calls: list[scripts.Call] = []
        for idx in groups:
            judged = None
            if digests is not None:
                judged = (judged_prefix(self.prefix, self.stream), self.judged_ttl_s,
                          [d for i in idx for d in digests[batch[i][0]]])
            calls.append(([keys[i] for i in idx],
                          script_args(now, [(batch[i][1], batch[i][2]) for i in idx], judged)))
        replies = await scripts.run(self._redis, self._script, calls)
        out: list[list[bool]] = [[] for _ in keys]
        for idx, reply in zip(groups, replies, strict=True):
            for i, k in zip(idx, reply, strict=True):
                out[i] = _verdicts(k, batch[i][1])
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


def _digest(key: Key) -> bytes:
    """16-byte digest of an event's dedupe key (the same as the dedupe hints')."""
    tenant, idem = key
    return hashlib.blake2b(f"{len(tenant)}:{tenant}:{idem}".encode(), digest_size=16).digest()


def _verdicts(reply: Any, count: int) -> list[bool]:
    """A script reply for one key: admitted count ``k`` (the first k events), or one '1'/'0' per event."""
    if isinstance(reply, bytes | str):
        text = reply.decode() if isinstance(reply, bytes) else reply
        return [c == "1" for c in text]
    k = int(reply)
    return [True] * k + [False] * (count - k)


def _spread(batch: Sequence[tuple[str, int, Limits]], admitted: Sequence[int]) -> list[list[bool]]:
    return [[True] * k + [False] * (c - k) for (_, c, _), k in zip(batch, admitted, strict=True)]
