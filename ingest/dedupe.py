"""Dedupe by (stream, tenant_id, idempotency_key): in-batch set, Redis hint, Postgres ledger (the truth).

Rules: Redis only ever learns a key *after* the Postgres transaction that stored it committed, so a Redis "seen"
is always backed by Postgres, and a Redis that forgot (flushed, restarted, down) only costs a ledger lookup.
The ledger claim runs inside the batch transaction; a key counts as new when it is absent or older than the
dedupe window.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ingest.metrics import Metrics
from ingest.rows import Key
from ingest.services import REDIS_UNAVAILABLE
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

# Both scripts take the batch's digests as ONE argument (16 bytes each, concatenated): packing one argument
# instead of thousands is most of the client-side cost of a batch. Keys are built in the script from the
# prefix, so these scripts are for a single Redis server (not Redis Cluster).
_SEEN = """
local prefix, blob = ARGV[1], ARGV[2]
local out = {}
for i = 1, #blob, 16 do
  out[#out + 1] = redis.call('EXISTS', prefix .. string.sub(blob, i, i + 15))
end
return table.concat(out)
"""

_REMEMBER = """
local prefix, blob, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 1, #blob, 16 do
  redis.call('SET', prefix .. string.sub(blob, i, i + 15), '1', 'EX', ttl)
end
return #blob / 16
"""

DIGEST_SIZE = 16


# A failed hint is harmless (Postgres decides), so any Redis error switches hints off for a while.
_HINT_ERRORS: tuple[type[BaseException], ...] = (RedisError, *REDIS_UNAVAILABLE)


class RedisHints:
    """Fast-path dedupe hints in Redis; every method degrades to "no information" when Redis fails.

    A key is hinted under ``<prefix>:dd:<stream>:<digest>``; callers hash each key once (``digest``) and pass the
    digests of a batch to ``seen`` and, after COMMIT, to ``remember``. After a Redis failure the hints are off
    for ``cooldown_s`` (no call at all), so an unreachable or stalled Redis costs one timeout per cooldown
    instead of one per batch."""

    def __init__(self, redis: Redis, *, prefix: str, stream: str, ttl: timedelta, metrics: Metrics,
                 cooldown_s: float = 5.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._cooldown_s, self._monotonic = cooldown_s, monotonic
        self._off_until = 0.0
        self._prefix = f"{prefix}:dd:{stream}:".encode()
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
        return self._prefix + self.digest(key)

    async def seen(self, digests: Sequence[bytes]) -> list[bool]:
        """One script call for the whole batch; on any Redis error, report nothing as seen."""
        if not digests or self._cooling():
            return [False] * len(digests)
        try:
            flags = await self._seen(args=[self._prefix, b"".join(digests)])
        except _HINT_ERRORS as exc:
            self._failed("lookup", exc)
            return [False] * len(digests)
        return [flag == 49 for flag in flags]  # b"1"

    async def remember(self, digests: Sequence[bytes]) -> None:
        """Record digests of keys that are durably in Postgres (call only after COMMIT); errors are logged, not
        raised."""
        if not digests or self._cooling():
            return
        try:
            await self._remember(args=[self._prefix, b"".join(digests), self._ttl])
        except _HINT_ERRORS as exc:
            self._failed("write", exc)

    def _cooling(self) -> bool:
        return self._monotonic() < self._off_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._metrics.redis_errors.inc()
        self._off_until = self._monotonic() + self._cooldown_s
        log.warning("redis dedupe hints failed; Postgres decides alone for a while",
                    extra={"call": what, "error": type(exc).__name__, "off_for_s": self._cooldown_s})


async def claim(
    conn: Conn, table: str, stream: str, keys: Sequence[Key], window: timedelta
) -> set[Key]:
    """Insert keys into the ledger inside the caller's transaction; return those that were new (or expired)."""
    if not keys:
        return set()
    rows = await conn.fetch(
        f"""INSERT INTO {ident(table)} AS l (stream, tenant_id, idempotency_key, seen_at)
            SELECT $1, t, k, now() FROM unnest($2::text[], $3::text[]) AS u(t, k)
            ON CONFLICT (stream, tenant_id, idempotency_key)
            DO UPDATE SET seen_at = excluded.seen_at WHERE l.seen_at < excluded.seen_at - $4::interval
            RETURNING tenant_id, idempotency_key""",
        stream, [k[0] for k in keys], [k[1] for k in keys], window,
    )
    return {(r[0], r[1]) for r in rows}


async def unclaim(conn: Conn, table: str, stream: str, keys: Sequence[Key]) -> None:
    """Remove keys claimed in this transaction whose rows will not be stored (over quota, refused by Postgres)."""
    if keys:
        await conn.execute(
            f"""DELETE FROM {ident(table)} l USING unnest($2::text[], $3::text[]) AS u(t, k)
                WHERE l.stream = $1 AND l.tenant_id = u.t AND l.idempotency_key = u.k""",
            stream, [k[0] for k in keys], [k[1] for k in keys],
        )
