"""Postgres restarted while a consumer works through a backlog: the failed batches are retried, never
dead-lettered; nothing is lost or stored twice; the same consumer resumes by itself."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consumers import run, settings, streams
from consumers.cli import sample
from ingest.config import Config
from ingest.metrics import Metrics
from tests.integration.conftest import PG_ADMIN
from tests.integration.helpers import offsets_total, publish, stored_keys, unique_keys


def _cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: float(v))[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


async def _pg_ctl(action: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *_cluster(), action, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def _wait_postgres(timeout: float) -> bool:
    """True once Postgres accepts a connection and answers a query."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    conn = await asyncpg.connect(PG_ADMIN, timeout=2)
                    try:
                        await conn.fetchval("SELECT 1")
                        return True
                    finally:
                        await conn.close()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    await asyncio.sleep(0.2)
    except TimeoutError:
        return False


@pytest.fixture
async def postgres_back(config: Config) -> AsyncIterator[None]:
    """Whatever happens in the test, Postgres runs again afterwards (before ``config`` drops the database)."""
    yield
    if not await _wait_postgres(10):
        await _pg_ctl("start")
        assert await _wait_postgres(60), "Postgres did not come back"


async def _progress(config: Config) -> int:
    conn = await asyncpg.connect(config.database_url)
    try:
        return await offsets_total(conn, config, "webhook") + await offsets_total(conn, config, "audit")
    finally:
        await conn.close()


async def test_postgres_restart_mid_batch(config: Config, env: dict[str, str], postgres_back: None) -> None:
    webhooks = list(sample.generate("webhook", 14000, n_tenants=50, dup_rate=0.1, seed=61))
    audits = list(sample.generate("audit", 6000, n_tenants=50, dup_rate=0.1, seed=62))
    await publish(config, "webhook", webhooks)
    await publish(config, "audit", audits)
    published = len(webhooks) + len(audits)

    # Small batches, so that the restart lands while batches are being written.
    cfg = settings.from_env({**env, "INGEST_BATCH_MAX_ROWS": "250"})
    metrics = Metrics()
    consume = asyncio.create_task(
        run.consume(cfg, streams.select("all"), asyncio.Event(), drain=True, metrics=metrics))
    try:
        async with asyncio.timeout(60):
            while (at_restart := await _progress(cfg)) < 1000:
                assert not consume.done(), consume
                await asyncio.sleep(0.02)
        code, out = await _pg_ctl("restart")
        assert code == 0, out
        totals = await asyncio.wait_for(consume, 180)
    finally:
        if not consume.done():
            consume.cancel()
    assert at_restart < published, "the restart should interrupt the backlog part-way"
    assert (metrics.registry.get_sample_value("ingest_postgres_errors_total") or 0) > 0, \
        "the consumer should have seen the restart and retried"

    conn = await asyncpg.connect(cfg.database_url)  # the restart closed every earlier connection
    try:
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0, "a restart is never a dead letter"
        stored_w, stored_a = await stored_keys(conn, "webhook"), await stored_keys(conn, "audit")
        assert set(stored_w) == unique_keys(webhooks) and max(stored_w.values()) == 1
        assert set(stored_a) == unique_keys(audits) and max(stored_a.values()) == 1
        assert await offsets_total(conn, cfg, "webhook") == len(webhooks)
        assert await offsets_total(conn, cfg, "audit") == len(audits)
        assert await conn.fetchval("SELECT count(*) FROM dedupe_ledger") == len(stored_w) + len(stored_a)
    finally:
        await conn.close()
    assert sum(t.rejected for t in totals.values()) == 0
