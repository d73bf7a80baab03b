"""Dedupe by (stream, tenant_id, idempotency_key): in-batch set, Redis hint, Postgres ledger (the truth).

Rules: Redis only ever learns a key *after* the Postgres transaction that stored it committed, so a Redis "seen"
is always backed by Postgres, and a Redis that forgot (flushed, restarted, down) only costs a ledger lookup.
The ledger claim runs inside the batch transaction; a key counts as new when it is absent or older than the
dedupe window.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ingest.metrics import Metrics
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant_id, idempotency_key)

_REMEMBER = """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'EX', ttl) end
return #KEYS
"""


class RedisHints:
    """Fast-path dedupe hints in Redis; every method degrades to "no information" when Redis fails."""

    def __init__(self, redis: Redis, *, prefix: str, stream: str, ttl: timedelta, metrics: Metrics) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:dd:{stream}:".encode()
        self._ttl = max(1, int(ttl.total_seconds()))
        self._metrics = metrics
        self._remember = redis.register_script(_REMEMBER)

    def redis_key(self, key: Key) -> bytes:
        """Unambiguous, fixed-size Redis key for a dedupe key (tenant ids may contain ':')."""
        tenant, idem = key
        digest = hashlib.blake2b(f"{len(tenant)}:{tenant}:{idem}".encode(), digest_size=16).digest()
        return self._prefix + digest

    async def seen(self, keys: Sequence[Key]) -> list[bool]:
        """One MGET for the whole batch; on any Redis error, report nothing as seen."""
        if not keys:
            return []
        try:
            values = await self._redis.mget([self.redis_key(k) for k in keys])
        except (RedisError, OSError) as exc:
            self._metrics.redis_errors.inc()
            log.warning("redis dedupe lookup failed; Postgres decides", extra={"error": type(exc).__name__})
            return [False] * len(keys)
        return [v is not None for v in values]

    async def remember(self, keys: Sequence[Key]) -> None:
        """Record keys that are durably in Postgres (call only after COMMIT); errors are logged, not raised."""
        if not keys:
            return
        try:
            await self._remember(keys=[self.redis_key(k) for k in keys], args=[self._ttl])
        except (RedisError, OSError) as exc:
            self._metrics.redis_errors.inc()
            log.warning("redis dedupe hint write failed", extra={"error": type(exc).__name__})


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
