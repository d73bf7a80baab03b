"""Real services for integration tests: one embedded broker per session; per test a fresh database, topic
prefix, consumer-group prefix and Redis key prefix, all removed afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from redis.asyncio import Redis

from consumers import run, settings, streams
from ingest import broker as broker_mod
from ingest.config import Config
from tests.conftest import deployment_env
from tests.integration import helpers

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def env(broker: str) -> Iterator[dict[str, str]]:
    """Environment of an isolated ingest deployment (fast group timeouts for the embedded broker)."""
    uid = f"t_{uuid.uuid4().hex[:10]}"
    yield deployment_env(uid, INGEST_KAFKA_BOOTSTRAP=broker,
                         INGEST_DATABASE_URL=f"postgresql://127.0.0.1:5432/ingest_{uid}", INGEST_REDIS_URL=REDIS_URL)


@pytest.fixture
async def config(env: dict[str, str]) -> AsyncIterator[Config]:
    """A migrated database and created topics for this test; everything is dropped afterwards."""
    cfg = settings.from_env(env)
    await run.run_migrations(cfg)
    await run.ensure_all_topics(cfg)
    try:
        yield cfg
    finally:
        await broker_mod.delete_topics(cfg, [s.topic_for(cfg) for s in streams.STREAMS.values()])
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            name = cfg.database_url.rsplit("/", 1)[1]
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        redis = Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in redis.scan_iter(match=f"{cfg.redis_prefix}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
        except Exception:
            pass  # a test may have stopped Redis; its keys died with it
        finally:
            await redis.aclose()


@pytest.fixture
async def db(config: Config) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, for assertions."""
    conn = await asyncpg.connect(config.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis_back() -> AsyncIterator[None]:
    """Whatever the test does to Redis, it runs again afterwards."""
    yield
    helpers.start_redis()
