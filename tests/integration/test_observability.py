"""Observability against real services: a real Prometheus scrapes an in-process consumer, and /readyz follows
Redis going away and coming back."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from consumers import run, settings, streams
from consumers.cli import sample
from ingest.config import Config
from tests.conftest import free_port
from tests.integration.helpers import publish, start_redis, stop_redis
from tests.tools import which


def require(binary: str) -> str:
    """The binary's path (PATH, then the virtualenv); missing is a skip on a workstation and a failure in CI."""
    path = which(binary)
    if path is None:
        message = f"{binary} is not installed (`make tools` puts it into .venv/bin; Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def metrics_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "INGEST_METRICS_PORT": str(free_port())}


@pytest.fixture
def served(config: Config, metrics_env: dict[str, str]) -> Config:
    """The test's migrated deployment, with the HTTP endpoints on a free port."""
    cfg = settings.from_env(metrics_env)
    assert cfg.database_url == config.database_url and cfg.metrics_port > 0
    return cfg


@pytest.fixture
async def consumer(served: Config) -> AsyncIterator[str]:
    """``consume`` for every stream in this process until the test ends; yields the endpoints' base URL."""
    stop = asyncio.Event()
    task = asyncio.create_task(run.consume(served, streams.select("all"), stop))
    try:
        yield f"http://127.0.0.1:{served.metrics_port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def prometheus(served: Config, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the consumer every second; yields its base URL."""
    binary = require("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ingest\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{served.metrics_port}']}}]\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with session.get(url, params=params) as resp:
        return resp.status, await resp.json(content_type=None)


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> float | None:
    """The value of a scalar-valued PromQL expression now, or None (no data yet / Prometheus not up)."""
    try:
        status, body = await get_json(session, f"{prometheus}/api/v1/query", query=expr)
    except aiohttp.ClientError:
        return None
    if status != 200 or body.get("status") != "success" or not body["data"]["result"]:
        return None
    return float(body["data"]["result"][0]["value"][1])


async def rows(db: asyncpg.Connection) -> int:
    total = 0
    for s in streams.STREAMS.values():
        total += int(await db.fetchval(f'SELECT count(*) FROM "{s.table}"'))
    return total


async def test_prometheus_sees_stored_duplicates_and_zero_lag(
        served: Config, db: asyncpg.Connection, consumer: str, prometheus: str) -> None:
    webhook = list(sample.generate("webhook", 600, n_tenants=12, dup_rate=0.0, seed=11))
    audit = list(sample.generate("audit", 300, n_tenants=5, dup_rate=0.0, seed=12))
    # Duplicates three ways: within the first publish (often the same batch), and re-sent after they were
    # stored (caught by the Redis hint or the Postgres ledger).
    first_webhook = webhook + webhook[:40]
    first_audit = audit + audit[:15]
    await publish(served, "webhook", first_webhook)
    await publish(served, "audit", first_audit)
    unique = len(webhook) + len(audit)
    async with asyncio.timeout(60):
        while await rows(db) < unique:
            await asyncio.sleep(0.1)
    await publish(served, "webhook", webhook[100:160])
    await publish(served, "audit", audit[:25])
    duplicates = 40 + 15 + 60 + 25

    want = {
        'sum(ingest_events_total{outcome="stored"})': float(unique),
        'sum(ingest_events_total{outcome="duplicate"})': float(duplicates),
        'sum(ingest_tenant_events_total{outcome="stored"})': float(unique),
        'sum(ingest_tenant_events_total{outcome="duplicate"})': float(duplicates),
        'sum(ingest_events_total{outcome=~"rejected|quota_exceeded"}) or vector(0)': 0.0,
        "max(ingest_consumer_lag)": 0.0,
        'count(up{job="ingest"} == 1)': 1.0,
    }
    got: dict[str, float | None] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        try:
            async with asyncio.timeout(90):
                while True:
                    got = {expr: await query(session, prometheus, expr) for expr in want}
                    if got == want:
                        break
                    await asyncio.sleep(0.5)
        except TimeoutError:
            pytest.fail(f"Prometheus never agreed with the expected values: got {got}, want {want}")
    assert await rows(db) == unique  # Postgres agrees with what Prometheus saw


async def test_readyz_follows_redis(served: Config, consumer: str, redis_back: None) -> None:
    async def wait_for(status: int, timeout: float = 60) -> Any:
        body: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        got, body = await get_json(session, consumer + "/readyz")
                    except aiohttp.ClientError:
                        got = None
                    if got == status:
                        return body
                    await asyncio.sleep(0.2)
        except TimeoutError:
            pytest.fail(f"/readyz never returned {status}; last body {body}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        body = await wait_for(200)
        assert body == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok", "kafka": "ok"}}
        status, health = await get_json(session, consumer + "/healthz")
        assert status == 200 and health["status"] == "ok"
        assert set(health["consumers"]) == {"webhook", "audit"}

        stop_redis()
        body = await wait_for(503)
        assert body["status"] == "not ready"
        assert body["checks"]["postgres"] == "ok" and body["checks"]["kafka"] == "ok"
        assert body["checks"]["redis"].startswith("error: ")
        assert "redis://" not in str(body) and served.redis_url not in str(body)
        status, health = await get_json(session, consumer + "/healthz")
        assert status == 200  # liveness does not depend on Redis

        start_redis()
        body = await wait_for(200)
        assert body["checks"]["redis"] == "ok"
