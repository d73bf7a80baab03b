"""Redis dedupe hints: the fast path in front of the Postgres ledger (``ingest.ledger``, the truth).

Rules: Redis only ever learns a key *after* the Postgres transaction that stored it committed, so a Redis "seen"
is always backed by Postgres, and a Redis that forgot (flushed, restarted, down) only costs a ledger lookup.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ingest import scripts
from ingest.metrics import Metrics
from ingest.quota.keys import group_by_slot
from ingest.rows import Key
from ingest.services import REDIS_UNAVAILABLE

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# Keys are built in the scripts: KEYS[i] is the base of one hint bucket (``<prefix>:dd:<stream>:{<bucket>}``, the
# bucket a hash tag, so a bucket's hints share a Redis Cluster slot) and ARGV[i] the digests of the batch that fall
# in it, 16 bytes each, concatenated: packing one argument per bucket instead of one per key is most of the
# client-side cost of a batch. A key is its bucket's base followed by the digest.
_SEEN = """
local out = {}
for i = 1, #KEYS do
  local base, blob = KEYS[i], ARGV[i]
  for j = 1, #blob, 16 do
    out[#out + 1] = redis.call('EXISTS', base .. string.sub(blob, j, j + 15))
  end
end
return table.concat(out)
"""

_REMEMBER = """
local ttl, n = tonumber(ARGV[#KEYS + 1]), 0
for i = 1, #KEYS do
  local base, blob = KEYS[i], ARGV[i]
  for j = 1, #blob, 16 do
    redis.call('SET', base .. string.sub(blob, j, j + 15), '1', 'EX', ttl)
    n = n + 1
  end
end
return n
"""

BUCKETS = 64
"""Hint buckets (hash tags): a batch costs one script call per Redis Cluster slot of its buckets, so at most 64
calls, sent as one round trip per node."""

DIGEST_SIZE = 16


# A failed hint is harmless (Postgres decides), so any Redis error switches hints off for a while.
_HINT_ERRORS: tuple[type[BaseException], ...] = (RedisError, *REDIS_UNAVAILABLE)


class RedisHints:
    """Fast-path dedupe hints in Redis; every method degrades to "no information" when Redis fails.

    A key is hinted under ``<prefix>:dd:<stream>:{<bucket>}<digest>``, the bucket (a hash tag) taken from the
    digest; callers hash each key once (``digest``) and pass the digests of a batch to ``seen`` and, after COMMIT,
    to ``remember``. Each costs one script call on a single Redis, one per slot (one round trip per node) on a
    Redis Cluster. After a Redis failure the hints are off for ``cooldown_s`` (no call at all), so an unreachable
    or stalled Redis costs one timeout per cooldown instead of one per batch."""

    def __init__(self, redis: Redis | RedisCluster, *, prefix: str, stream: str, ttl: timedelta, metrics: Metrics,
                 cooldown_s: float = 5.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._cooldown_s, self._monotonic = cooldown_s, monotonic
        self._off_until = 0.0
        self._bases = [f"{prefix}:dd:{stream}:{{{b:02x}}}".encode() for b in range(BUCKETS)]
        # Buckets per cluster slot (on a single Redis, every bucket in one call).
        self._slots = ([list(g) for g in group_by_slot(self._bases).values()] if isinstance(redis, RedisCluster)
                       else [list(range(BUCKETS))])
        self._ttl = max(1, int(ttl.total_seconds()))
        self._metrics = metrics
        self._seen = redis.register_script(_SEEN)
        self._remember = redis.register_script(_REMEMBER)

    @staticmethod
    def digest(key: Key) -> bytes:
        """Unambiguous, fixed-size (``DIGEST_SIZE``) hash of a dedupe key (tenant ids may contain ':')."""
        tenant, idem = key
        return hashlib.blake2b(f"{len(tenant)}:{tenant}:{idem}".encode(), digest_size=DIGEST_SIZE).digest()

    def redis_key(self, key: Key) -> bytes:
        """The Redis key that hints ``key``."""
        d = self.digest(key)
        return self._bases[d[0] % BUCKETS] + d

    def _calls(self, digests: Sequence[bytes], extra: Sequence[str | bytes | int] = ()) -> tuple[
            list[scripts.Call], list[int]]:
        """One call per slot group of buckets, and the order (indexes into ``digests``) its replies follow."""
        buckets: list[list[int]] = [[] for _ in range(BUCKETS)]
        for i, d in enumerate(digests):
            buckets[d[0] % BUCKETS].append(i)
        calls: list[scripts.Call] = []
        order: list[int] = []
        for group in self._slots:
            used = [b for b in group if buckets[b]]
            if not used:
                continue
            calls.append(([self._bases[b] for b in used],
                          [*(b"".join(digests[i] for i in buckets[b]) for b in used), *extra]))
            order += [i for b in used for i in buckets[b]]
        return calls, order

    async def seen(self, digests: Sequence[bytes]) -> list[bool]:
        """One script call per slot for the whole batch; on any Redis error, report nothing as seen."""
        if not digests or self._cooling():
            return [False] * len(digests)
        calls, order = self._calls(digests)
        try:
            replies = await scripts.run(self._redis, self._seen, calls)
        except _HINT_ERRORS as exc:
            self._failed("lookup", exc)
            return [False] * len(digests)
        out = [False] * len(digests)
        flags = b"".join(r if isinstance(r, bytes) else str(r).encode() for r in replies)
        for i, flag in zip(order, flags, strict=True):
            out[i] = flag == 49  # b"1"
        return out

    async def remember(self, digests: Sequence[bytes]) -> None:
        """Record digests of keys that are durably in Postgres (call only after COMMIT); errors are logged, not
        raised."""
        if not digests or self._cooling():
            return
        calls, _ = self._calls(digests, (self._ttl,))
        try:
            await scripts.run(self._redis, self._remember, calls)
        except _HINT_ERRORS as exc:
            self._failed("write", exc)

    def _cooling(self) -> bool:
        return self._monotonic() < self._off_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._metrics.redis_errors.inc()
        self._off_until = self._monotonic() + self._cooldown_s
        log.warning("redis dedupe hints failed; Postgres decides alone for a while",
                    extra={"call": what, "error": type(exc).__name__, "off_for_s": self._cooldown_s})
