"""/metrics, /healthz and /readyz served on a real socket (port 0), with fake probes and consumers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from ingest import http
from ingest.consumer import ConsumerHealth
from ingest.metrics import Metrics
from tests.fakes import FakeKafka


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeConsumer:
    stream: str
    state: ConsumerHealth = field(default_factory=ConsumerHealth)
    consumer: Any = None


def ok() -> http.Probe:
    async def check() -> str | None:
        return None
    return check


def failing(exc: BaseException) -> http.Probe:
    async def check() -> str | None:
        raise exc
    return check


def slow(seconds: float) -> http.Probe:
    async def check() -> str | None:
        await asyncio.sleep(seconds)
        return None
    return check


Start = Callable[..., Any]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a HealthServer on a free port; returns (server, base URL, session)."""
    servers: list[http.HealthServer] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def _start(**kwargs: Any) -> tuple[http.HealthServer, str, aiohttp.ClientSession]:
        kwargs.setdefault("metrics", Metrics())
        server = http.HealthServer(host="127.0.0.1", port=0, **kwargs)
        await server.start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.port}", session

    try:
        yield _start
    finally:
        await session.close()
        for s in servers:
            await s.stop()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


# -- /metrics ---------------------------------------------------------------------------------------------------
async def test_metrics_serves_the_registry_in_text_format(start: Start) -> None:
    metrics = Metrics()
    metrics.events.labels("webhook", "stored").inc(3)
    metrics.lag.labels("webhook", "0").set(0)
    _, base, session = await start(metrics=metrics)
    async with session.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    assert 'ingest_events_total{outcome="stored",stream="webhook"} 3.0' in text
    assert 'ingest_consumer_lag{partition="0",stream="webhook"} 0.0' in text
    assert "# TYPE ingest_tenant_events_total counter" in text
    assert "python_gc" not in text  # own registry, not the global one


async def test_unknown_path_is_404(start: Start) -> None:
    _, base, session = await start()
    async with session.get(base + "/nope") as resp:
        assert resp.status == 404


# -- /readyz ----------------------------------------------------------------------------------------------------
async def test_readyz_200_when_every_probe_passes(start: Start) -> None:
    _, base, session = await start(probes={"postgres": ok(), "redis": ok(), "kafka": ok()})
    assert await get(session, base + "/readyz") == (
        200, {"status": "ready", "checks": {"postgres": "ok", "redis": "ok", "kafka": "ok"}})


async def test_readyz_503_names_the_failure_without_secrets(start: Start) -> None:
    leak = ConnectionError("Error connecting to redis://admin:hunter2@10.0.0.7:6379/0 password=hunter2")
    _, base, session = await start(probes={"postgres": ok(), "redis": failing(leak)})
    status, body = await get(session, base + "/readyz")
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"].startswith("error: ConnectionError: Error connecting to")
    assert "hunter2" not in str(body) and "redis://" not in str(body)


async def test_readyz_probes_time_out_concurrently(start: Start) -> None:
    _, base, session = await start(probes={"a": slow(30), "b": slow(30), "c": ok()}, probe_timeout=0.2)
    started = time.monotonic()
    status, body = await get(session, base + "/readyz")
    assert time.monotonic() - started < 1.0
    assert status == 503
    assert body["checks"] == {"a": "error: timed out", "b": "error: timed out", "c": "ok"}


async def test_readyz_notes_do_not_make_it_unready(start: Start) -> None:
    async def idle() -> str | None:
        return "webhook: no partitions assigned"
    _, base, session = await start(probes={"kafka": idle})
    assert await get(session, base + "/readyz") == (
        200, {"status": "ready", "checks": {"kafka": "ok"}, "notes": {"kafka": "webhook: no partitions assigned"}})


async def test_a_slow_probe_does_not_block_the_loop(start: Start) -> None:
    _, base, session = await start(probes={"slow": slow(30)}, probe_timeout=0.5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await get(session, base + "/readyz")
    finally:
        task.cancel()
    assert ticks > 10


# -- /healthz ---------------------------------------------------------------------------------------------------
async def test_healthz_ok_while_loops_turn_and_503_when_one_is_stale(start: Start) -> None:
    clock = Clock()
    web, audit = FakeConsumer("webhook", ConsumerHealth(assigned={0, 1}, last_turn=clock.now)), FakeConsumer("audit")
    audit.state.last_turn = clock.now
    _, base, session = await start(consumers=[web, audit], stale_after=60, clock=clock)

    status, body = await get(session, base + "/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert isinstance(body["loop_lag_s"], float)
    assert body["consumers"]["webhook"] == {"last_turn_age_s": 0.0, "partitions": 2, "paused": None}

    clock.now += 59
    audit.state.last_turn = clock.now  # audit keeps turning, webhook is stuck
    audit.state.paused_reason = "postgres"
    status, body = await get(session, base + "/healthz")
    assert status == 200
    assert body["consumers"]["audit"]["paused"] == "postgres"

    clock.now += 2
    status, body = await get(session, base + "/healthz")
    assert status == 503
    assert body["status"] == "stale"
    assert "webhook" in body["detail"] and "audit" not in body["detail"]

    web.state.last_turn = clock.now
    assert (await get(session, base + "/healthz"))[0] == 200


async def test_healthz_without_consumers_is_ok(start: Start) -> None:
    _, base, session = await start()
    status, body = await get(session, base + "/healthz")
    assert status == 200 and body["consumers"] == {}


async def test_healthz_reports_loop_lag(start: Start) -> None:
    server, base, session = await start()
    await asyncio.sleep(0.1)
    time.sleep(0.8)  # block the loop on purpose (longer than the ticker's interval)  # noqa: ASYNC251
    await asyncio.sleep(0.6)
    assert server.loop_lag >= 0.2
    status, body = await get(session, base + "/healthz")
    assert status == 200 and body["loop_lag_s"] >= 0.2


def test_liveness_window() -> None:
    assert http.liveness_window(300_000) == 300.0
    assert http.liveness_window(10_000) == 60.0


# -- kafka probe ------------------------------------------------------------------------------------------------
async def test_kafka_probe() -> None:
    consumers: list[FakeConsumer] = []
    probe = http.kafka_probe(consumers)
    with pytest.raises(http.NotReady, match="no stream consumer"):
        await probe()

    web = FakeConsumer("webhook")
    consumers.append(web)
    with pytest.raises(http.NotReady, match="webhook: consumer not started"):
        await probe()

    web.consumer = FakeKafka()
    with pytest.raises(http.NotReady, match="not joined"):
        await probe()

    web.state.joined = True
    assert await probe() == "webhook: no partitions assigned (idle member: more members than partitions)"

    web.state.assigned = {0, 3}
    assert await probe() is None

    web.consumer._coordinator.coordinator_id = None
    with pytest.raises(http.NotReady, match="coordinator unknown"):
        await probe()


# -- lifecycle --------------------------------------------------------------------------------------------------
async def test_serve_binds_and_releases_the_port() -> None:
    async with http.serve("127.0.0.1", 0, metrics=Metrics()) as server:
        port = server.port
        assert port > 0
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_port_in_use_is_a_clear_error() -> None:
    async with http.serve("127.0.0.1", 0, metrics=Metrics()) as first:
        second = http.HealthServer(metrics=Metrics(), host="127.0.0.1", port=first.port)
        with pytest.raises(OSError, match="INGEST_METRICS_PORT"):
            await second.start()


def test_scrub_removes_urls_and_credentials() -> None:
    text = http.scrub(RuntimeError("connect postgresql://u:pw@db:5432/x failed; password=pw"))
    assert "pw" not in text.replace("password", "")
    assert text.startswith("RuntimeError: connect <url> failed")
    assert http.scrub(TimeoutError()) == "timed out"
    assert http.scrub(http.NotReady("webhook: not joined")) == "webhook: not joined"
