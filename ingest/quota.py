"""Quota stage: per-tenant, per-stream rate + burst (GCRA) and a per-UTC-day cap, enforced in Redis.

``admit`` gets the tenants of a batch's new events, in batch order, and answers per event. Rules:
- One call per batch, never per event; the Redis work is ONE ``EVALSHA`` carrying every limited tenant of the
  batch (one pipeline round trip per node on Redis Cluster). Unlimited tenants never touch Redis.
- An event is admitted only if both the rate and the daily cap allow it; denied events consume nothing.
  A tenant's events in one batch are judged in order, so its first ``k`` events are the admitted ones.
- Infrastructure failure raises (the batch rolls back and is retried: backpressure), unless ``fail_open``,
  which falls back to per-process in-memory limits until Redis answers again.
- Limits are defaults plus Postgres overrides, re-read at most once per refresh interval (never per event).
See docs/quotas.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import asyncpg
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ingest.metrics import Metrics
from ingest.services import REDIS_UNAVAILABLE
from ingest.sql import ident

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger(__name__)

US = 1_000_000
DAY_US = 86_400 * US
ALL_STREAMS = ""  # the ``stream`` of an override that applies to every stream


class Quota(Protocol):
    """Rule: one call per batch, never per event; raise on infrastructure failure (the batch is retried)."""

    async def admit(self, tenants: Sequence[str]) -> list[bool]: ...



# -- limits ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits on one stream. 0 = unlimited; ``burst`` 0 = one second's worth (at least 1)."""

    per_second: float = 0.0
    burst: int = 0
    per_day: int = 0

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0 and self.per_day <= 0

    @property
    def effective_burst(self) -> int:
        if self.per_second <= 0:
            return 0
        return self.burst if self.burst > 0 else max(1, math.ceil(self.per_second))

    @property
    def interval_us(self) -> float:
        """GCRA emission interval T: microseconds per event (0 = no rate limit)."""
        return US / self.per_second if self.per_second > 0 else 0.0

    @property
    def tolerance_us(self) -> float:
        """GCRA tolerance tau = burst * T: how far ahead of now the theoretical arrival time may run."""
        return self.effective_burst * self.interval_us


@dataclass(frozen=True, slots=True)
class Override:
    """A row of ``quota_overrides``: ``stream`` '' applies to every stream; a None field inherits."""

    tenant: str
    stream: str = ALL_STREAMS
    per_second: float | None = None
    burst: int | None = None
    per_day: int | None = None


@dataclass(frozen=True, slots=True)
class LimitTable:
    """Resolved limits of one stream: per field, stream override > tenant-wide override > default."""

    default: Limits
    tenants: Mapping[str, Limits] = field(default_factory=dict)
    any_limited: bool = field(init=False)
    """False when no tenant can be limited: ``admit`` then costs nothing (computed once per reload)."""

    def __post_init__(self) -> None:
        limited = not self.default.unlimited or any(not lim.unlimited for lim in self.tenants.values())
        object.__setattr__(self, "any_limited", limited)

    @classmethod
    def build(cls, stream: str, default: Limits, overrides: Iterable[Override]) -> LimitTable:
        wide: dict[str, Override] = {}
        own: dict[str, Override] = {}
        for o in overrides:
            if o.stream == ALL_STREAMS:
                wide[o.tenant] = o
            elif o.stream == stream:
                own[o.tenant] = o
        return cls(default, {t: resolve(default, own.get(t), wide.get(t)) for t in wide.keys() | own.keys()})

    def limits_for(self, tenant: str) -> Limits:
        return self.tenants.get(tenant, self.default)


def resolve(default: Limits, *overrides: Override | None) -> Limits:
    """Each field from the first override (most specific first) that sets it, else the default."""
    def pick(name: str) -> Any:
        for o in overrides:
            if o is not None and getattr(o, name) is not None:
                return getattr(o, name)
        return getattr(default, name)
    return Limits(float(pick("per_second")), int(pick("burst")), int(pick("per_day")))


class OverrideSource(Protocol):
    """Where overrides come from. ``version`` is cheap and changes whenever the overrides do."""

    async def version(self) -> int: ...
    async def load(self) -> tuple[int, list[Override]]: ...


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


class LimitBook:
    """The current ``LimitTable`` of one stream, re-read from ``source`` at most once per ``refresh_s``.

    Rule: call ``get`` once per batch. The first load must succeed (it raises); later failures keep the last
    table and are logged, so a Postgres hiccup never changes limits."""

    def __init__(self, stream: str, default: Limits, source: OverrideSource | None = None, *,
                 refresh_s: float = 2.0, monotonic: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.stream, self.default, self.source, self.refresh_s = stream, default, source, refresh_s
        self._monotonic, self._metrics = monotonic, metrics
        self._table: LimitTable | None = None if source is not None else LimitTable(default)
        self._version: int | None = None
        self._next = 0.0

    async def get(self) -> LimitTable:
        if self.source is None:
            assert self._table is not None
            return self._table
        now = self._monotonic()
        if self._table is None or now >= self._next:
            self._next = now + self.refresh_s
            try:
                await self._refresh(self.source)
            except Exception as exc:
                if self._table is None:
                    raise
                if self._metrics is not None:
                    self._metrics.quota_refresh_errors.labels(self.stream).inc()
                log.warning("quota overrides refresh failed; keeping the last limits",
                            extra={"stream": self.stream, "error": type(exc).__name__})
        assert self._table is not None
        return self._table

    async def _refresh(self, source: OverrideSource) -> None:
        if self._table is not None and await source.version() == self._version:
            return
        version, rows = await source.load()
        self._table = LimitTable.build(self.stream, self.default, rows)
        self._version = version
        log.info("quota limits loaded", extra={"stream": self.stream, "overrides": len(self._table.tenants),
                                               "version": version})


# -- the algorithm ---------------------------------------------------------------------------------------------
class State(NamedTuple):
    """One tenant's state on one stream: GCRA theoretical arrival time (µs), UTC day number, today's admitted
    and denied counts."""

    tat: float
    day: int
    used: int
    denied: int


def judge(state: State | None, now_us: int, count: int, limits: Limits) -> tuple[int, State]:
    """How many of ``count`` events (in order, all at ``now_us``) are admitted, and the new state.

    Same arithmetic as the Lua script: k = min(count, events that fit the GCRA tolerance, what is left of
    today's cap); only the k admitted events advance the TAT and the day counter."""
    day = now_us // DAY_US
    tat = now_us if state is None else max(state.tat, now_us)
    used = denied = 0
    if state is not None and state.day == day:
        used, denied = state.used, state.denied
    k = count
    interval = limits.interval_us
    if interval > 0:
        k = min(k, math.floor((limits.tolerance_us - (tat - now_us)) / interval + 1e-9))
    if limits.per_day > 0:
        k = min(k, limits.per_day - used)
    k = max(k, 0)
    return k, State(math.ceil(tat + k * interval), day, used + k, denied + count - k)


def state_ttl_ms(state: State, now_us: int) -> int:
    """Keep a state until both its TAT and its UTC day have passed (+1 h), so idle tenants cost no memory."""
    until = max(state.tat, (state.day + 1) * DAY_US)
    return math.ceil((until - now_us) / 1000) + 3_600_000


# KEYS[i]: one tenant's state, the string "tat day used denied" (µs, UTC day number, today's admitted and
# denied events). ARGV[1]: now in µs, or '' to use Redis TIME (one clock for every process). ARGV[2]: the event
# count per key, space-separated. ARGV[3]: the limit profile per key (1-based, space-separated). ARGV[4..]:
# profiles as triples T (µs/event, 0 = no rate), tau (µs), daily cap (0 = none). Few arguments whatever the
# batch: most tenants share a profile. Returns per key how many of its events, in order, are admitted.
SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local day = math.floor(now / 86400000000)
local next_day = (day + 1) * 86400000000
local counts, which, profiles = {}, {}, {}
for c in string.gmatch(ARGV[2], '%d+') do counts[#counts + 1] = tonumber(c) end
for p in string.gmatch(ARGV[3], '%d+') do which[#which + 1] = tonumber(p) end
for a = 4, #ARGV, 3 do
  profiles[#profiles + 1] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
end
local out = {}
for i = 1, #KEYS do
  local count, prof = counts[i], profiles[which[i]]
  local interval, tau, cap = prof[1], prof[2], prof[3]
  local tat, used, denied = now, 0, 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local t, d, u, x = string.match(v, '(%S+) (%S+) (%S+) (%S+)')
    tat = tonumber(t) or now
    if tat < now then tat = now end
    if tonumber(d) == day then used, denied = tonumber(u), tonumber(x) end
  end
  local k = count
  if interval > 0 then
    local fit = math.floor((tau - (tat - now)) / interval + 1e-9)
    if fit < k then k = fit end
  end
  if cap > 0 and cap - used < k then k = cap - used end
  if k < 0 then k = 0 end
  tat = math.ceil(tat + k * interval)
  local keep = next_day
  if tat > keep then keep = tat end
  redis.call('SET', KEYS[i], string.format('%.0f %d %d %d', tat, day, used + k, denied + count - k),
             'PX', math.ceil((keep - now) / 1000) + 3600000)
  out[i] = k
end
return out
"""


def state_key(prefix: str, stream: str, tenant: str) -> str:
    """``prefix:q:stream:{tenant}``: the tenant is the Redis Cluster hash tag (tenant ids contain no braces)."""
    return f"{prefix}:q:{stream}:{{{tenant}}}"


def parse_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``(stream, tenant)`` of a ``state_key``, or None."""
    head = f"{prefix}:q:"
    if not key.startswith(head) or not key.endswith("}"):
        return None
    stream, sep, tenant = key[len(head):-1].partition(":{")
    return (stream, tenant) if sep else None


def parse_state(value: bytes | str | None) -> State | None:
    """A ``State`` from a state key's value (``GET``), or None when the key is absent."""
    if value is None:
        return None
    tat, day, used, denied = (value.decode() if isinstance(value, bytes) else value).split()
    return State(float(tat), int(day), int(used), int(denied))


@dataclass(frozen=True, slots=True)
class Usage:
    """What ``ingest quota list`` shows: today's admitted and denied events, and the burst available now."""

    used_today: int
    denied_today: int
    burst_left: int | None  # None = no rate limit


def usage(state: State | None, limits: Limits, now_us: int) -> Usage:
    day = now_us // DAY_US
    used, denied = (state.used, state.denied) if state is not None and state.day == day else (0, 0)
    burst_left: int | None = None
    if limits.interval_us > 0:
        burst_left, _ = judge(state, now_us, limits.effective_burst, Limits(limits.per_second, limits.burst))
    return Usage(used, denied, burst_left)


def group_by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
    """Indices of ``keys`` per Redis Cluster slot: one script call per slot (a script's keys share a slot)."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(key_slot(k.encode()), []).append(i)
    return groups


# -- the stage -------------------------------------------------------------------------------------------------


class LocalLimiter:
    """Per-process fallback with the same algorithm (used only in fail-open mode while Redis is away)."""

    def __init__(self) -> None:
        self.states: dict[str, State] = {}

    def decide(self, batch: Sequence[tuple[str, int, Limits]], now_us: int) -> list[int]:
        out = []
        for tenant, count, limits in batch:
            k, self.states[tenant] = judge(self.states.get(tenant), now_us, count, limits)
            out.append(k)
        if len(self.states) > 100_000:
            self.states = {t: s for t, s in self.states.items() if state_ttl_ms(s, now_us) > 3_600_000}
        return out


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
        now = "" if self.clock is None else str(self._now_us())
        keys = [self.key(t) for t, _, _ in batch]
        profiles: dict[Limits, int] = {}
        which = [profiles.setdefault(lim, len(profiles) + 1) for _, _, lim in batch]
        table = [a for lim in profiles for a in (repr(lim.interval_us), repr(lim.tolerance_us), str(lim.per_day))]
        counts = [c for _, c, _ in batch]
        if not isinstance(self._redis, RedisCluster):
            args = [now, " ".join(map(str, counts)), " ".join(map(str, which)), *table]
            return [int(k) for k in await self._script(keys=keys, args=args)]
        return await self._evaluate_cluster(now, keys, counts, which, table)

    async def _evaluate_cluster(self, now: str, keys: list[str], counts: list[int], which: list[int],
                                table: list[str]) -> list[int]:
        """One script call per slot, sent as one pipeline (redis-py sends one round trip per node, in parallel)."""
        assert isinstance(self._redis, RedisCluster)
        groups = list(group_by_slot(keys).values())
        for attempt in (0, 1):
            pipe = self._redis.pipeline()
            for idx in groups:
                pipe.execute_command(
                    "EVALSHA", self._script.sha, len(idx), *[keys[i] for i in idx], now,
                    " ".join(str(counts[i]) for i in idx), " ".join(str(which[i]) for i in idx), *table)
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
