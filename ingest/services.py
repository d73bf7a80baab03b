"""Connections to Postgres, Redis and Kafka, with one-line errors that say which service and how to start it."""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

HOW_TO_START = {
    "postgres": "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
                "(or set INGEST_DATABASE_URL)",
    "redis": 'start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" '
             "--appendonly no (or set INGEST_REDIS_URL)",
    "kafka": "start the embedded broker with: ingest dev up (or set INGEST_KAFKA_BOOTSTRAP)",
}


class ServiceUnavailable(Exception):
    """A required service cannot be reached; ``str()`` is a one-line, actionable message."""

    def __init__(self, service: str, where: str, error: BaseException | str) -> None:
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}".strip(": ")
        super().__init__(f"{service} is unreachable at {where} ({detail}); {HOW_TO_START[service]}")
        self.service = service


def redact(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb values travel as the JSON bytes we already have: binary format = version byte 1 + UTF-8 text.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda b: b"\x01" + b, decoder=lambda b: b[1:])


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 4, **kwargs: Any) -> asyncpg.Pool:
    """A pool whose connections pass jsonb as raw JSON ``bytes`` (no re-encoding)."""
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                         command_timeout=60, **kwargs)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable("postgres", redact(url), exc) from None
    assert pool is not None
    return pool


def redis_client(url: str) -> Redis:
    """A Redis client that fails fast: one quick retry, short timeouts (callers degrade or back off themselves;
    redis-py's default of ten retries would hold every batch for seconds while Redis is down)."""
    return Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))


async def connect_redis(url: str) -> Redis:
    """A Redis client that has answered PING."""
    client = redis_client(url)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise ServiceUnavailable("redis", redact(url), exc) from None
    return client
