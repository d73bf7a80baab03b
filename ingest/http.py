"""/metrics, /healthz and /readyz on one small aiohttp server that shares the consumers' event loop.

Rules kept here:
- Nothing a handler does may stall the consume loop: /metrics renders in a worker thread, every readiness probe
  runs under a short timeout (all concurrently), and liveness only reads in-memory state.
- Bodies never carry connection URLs or credentials: errors are reduced to their type and a scrubbed message.
- /healthz is liveness: 200 while every watched consumer's loop has turned within ``stale_after`` seconds.
- /readyz is readiness: 200 when every probe passes, else 503 naming what failed. A consumer that joined its
  group but got no partitions (more members than partitions) is ready, with a note: see docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from ingest.consumer import ConsumerHealth
from ingest.metrics import Metrics
from ingest.redaction import redact_text

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str | None]]
"""A readiness check: returns None when ready, a note (still ready) as a string, or raises when not ready."""

PROBE_TIMEOUT_S = 1.0
MIN_STALE_AFTER_S = 60.0


class NotReady(Exception):
    """Raised by a probe to report a plain reason (shown without an exception type)."""


class Watched(Protocol):
    """What the server reads of a stream consumer (``ingest.consumer.StreamConsumer`` satisfies it)."""

    stream: str
    state: ConsumerHealth
    consumer: Any


def liveness_window(max_poll_interval_ms: int) -> float:
    """Seconds without a loop turn after which a consumer counts as stuck: Kafka's own max poll interval (a
    member that has not polled for that long has already been evicted from its group), but never under 60 s."""
    return max(MIN_STALE_AFTER_S, max_poll_interval_ms / 1000)


def scrub(exc: BaseException) -> str:
    """A short description of ``exc`` without URLs or credentials."""
    if isinstance(exc, NotReady):
        text = str(exc)
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        detail = str(exc).strip()
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return redact_text(text, hide_urls=True)[:200]


# -- probes ----------------------------------------------------------------------------------------------------
def postgres_probe(pool: asyncpg.Pool) -> Probe:
    """``SELECT 1`` on a pooled connection (waits at most the probe timeout for a free one)."""
    async def check() -> str | None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return None
    return check


def redis_probe(redis: Redis | RedisCluster) -> Probe:
    """``PING``."""
    async def check() -> str | None:
        await redis.ping()
        return None
    return check


def kafka_probe(consumers: Sequence[Watched]) -> Probe:
    """Every stream consumer is started, knows its group coordinator and has completed a group join.

    A member that joined but holds no partitions is ready (note only): with maxSurge rolling updates and as many
    replicas as partitions, a new pod may legitimately start idle, and a not-ready idle pod would block the
    rollout. ``consumers`` is read at each call, so a list filled later is fine."""
    async def check() -> str | None:
        if not consumers:
            raise NotReady("no stream consumer started yet")
        problems, notes = [], []
        for sc in consumers:
            kafka = sc.consumer
            joined = sc.state.joined
            coordinator = getattr(kafka, "_coordinator", None)
            if kafka is None:
                problems.append(f"{sc.stream}: consumer not started")
            elif coordinator is not None and getattr(coordinator, "coordinator_id", 0) is None:
                problems.append(f"{sc.stream}: group coordinator unknown (broker unreachable or rejoining)")
            elif not joined:
                problems.append(f"{sc.stream}: not joined to its consumer group yet")
            elif not sc.state.assigned:
                notes.append(f"{sc.stream}: no partitions assigned (idle member: more members than partitions)")
        if problems:
            raise NotReady("; ".join(problems))
        return "; ".join(notes) or None
    return check


# -- server ----------------------------------------------------------------------------------------------------
class HealthServer:
    """Serves the three endpoints; ``start`` binds (``port=0`` picks a free port), ``stop`` closes."""

    def __init__(self, *, metrics: Metrics, host: str, port: int,
                 probes: Mapping[str, Probe] | None = None, consumers: Sequence[Watched] = (),
                 stale_after: float = MIN_STALE_AFTER_S, probe_timeout: float = PROBE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics, self.host, self.requested_port = metrics, host, port
        self.probes = dict(probes or {})
        self.consumers = consumers
        self.stale_after, self.probe_timeout, self.clock = stale_after, probe_timeout, clock
        self.loop_lag = 0.0
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.handle_metrics)
        self.app.router.add_get("/healthz", self.handle_healthz)
        self.app.router.add_get("/readyz", self.handle_readyz)

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._runner is not None:
            for address in self._runner.addresses:
                if isinstance(address, tuple):
                    return int(address[1])
        return self.requested_port

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.requested_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot serve /metrics on {self.host}:{self.requested_port} ({exc.strerror}); "
                                     "set INGEST_METRICS_HOST/INGEST_METRICS_PORT (port 0 disables it)") from None
        self._runner = runner
        self._ticker = asyncio.create_task(self._tick(), name="ingest-loop-lag")
        log.info("serving /metrics /healthz /readyz", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _tick(self, interval: float = 0.5, window: int = 20) -> None:
        """How late the loop wakes a sleeper: /healthz reports the worst of the last ``window`` ticks (10 s)."""
        loop = asyncio.get_running_loop()
        recent: collections.deque[float] = collections.deque(maxlen=window)
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            recent.append(max(0.0, loop.time() - started - interval))
            self.loop_lag = max(recent)

    # -- handlers ----------------------------------------------------------------------------------------------
    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        now = self.clock()
        stale, streams = [], {}
        for sc in self.consumers:
            age = max(0.0, now - sc.state.last_turn)
            streams[sc.stream] = {"last_turn_age_s": round(age, 3), "partitions": len(sc.state.assigned),
                                  "paused": sc.state.paused_reason}
            if age > self.stale_after:
                stale.append(sc.stream)
        body: dict[str, Any] = {"status": "ok", "loop_lag_s": round(self.loop_lag, 4), "consumers": streams}
        if stale:
            body["status"] = "stale"
            body["detail"] = (f"consume loop of {', '.join(stale)} has not turned for more than "
                              f"{self.stale_after:g} s")
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def handle_readyz(self, request: web.Request) -> web.Response:
        names = list(self.probes)
        results = await asyncio.gather(*(self._run_probe(self.probes[n]) for n in names))
        checks = {n: r[0] for n, r in zip(names, results, strict=True)}
        notes = {n: r[1] for n, r in zip(names, results, strict=True) if r[1]}
        ready = all(v == "ok" for v in checks.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
        if notes:
            body["notes"] = notes
        return web.json_response(body, status=200 if ready else 503)

    async def _run_probe(self, probe: Probe) -> tuple[str, str | None]:
        try:
            async with asyncio.timeout(self.probe_timeout):
                note = await probe()
        except Exception as exc:
            return f"error: {scrub(exc)}", None
        return "ok", note


@contextlib.asynccontextmanager
async def serve(host: str, port: int, *, metrics: Metrics, probes: Mapping[str, Probe] | None = None,
                consumers: Sequence[Watched] = (), stale_after: float = MIN_STALE_AFTER_S,
                probe_timeout: float = PROBE_TIMEOUT_S) -> AsyncIterator[HealthServer]:
    """``async with serve(...) as server:`` the endpoints are up inside the block."""
    server = HealthServer(metrics=metrics, host=host, port=port, probes=probes, consumers=consumers,
                          stale_after=stale_after, probe_timeout=probe_timeout)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
