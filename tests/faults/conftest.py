"""Fixtures of the fault-injection suite (collected only with ``pytest --faults``).

Session-wide:
- ``broker``: the embedded broker of tests/conftest.py (shared).
- ``pg``: a private Postgres cluster (``helpers.PgCluster``) that tests may stop, restart or crash at will; never
  the shared one on 5432. ``redis_server``: a private redis-server (``helpers.RedisServer``) tests may stop and
  restart empty (``restart_empty``); never the shared one on 6379.

Per test:
- ``pg_proxy`` / ``redis_proxy``: a ``proxy.Proxy`` in front of each (pass mode); ``proxies(upstream, name)``
  starts more (e.g. one per consumer process, or in front of a broker), all closed afterwards.
- ``env``: the ``INGEST_*`` environment of an isolated deployment (own database, topic prefix, group prefix, Redis
  prefix, the embedded broker's fast group timeouts), with the database and Redis URLs pointing at the proxies.
- ``config``: ``Config`` of ``env``; the database is migrated directly (not through the proxy) and the topics are
  created. Afterwards topics and database are dropped and Redis is flushed, after Postgres and Redis are started
  again if the test left them down.
- ``db_url``: the direct URL of the test database (assertions never go through a proxy).
- ``published``: a ``helpers.Published`` to publish through (``helpers.publish_mix``) and check against.
- ``spawn(env, stream="all", *args, name=...)``: ``helpers.Consumer`` processes, killed (-9) and reaped after.
- ``tablespace(size)``: a tablespace on a tmpfs of that size in the test database (name, ``helpers.Tmpfs``);
  afterwards the database and tablespace are dropped and the tmpfs unmounted, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from consumers import run, settings, streams
from ingest import broker as broker_mod
from ingest.config import Config
from tests.conftest import deployment_env, free_port
from tests.faults.helpers import Consumer, PgCluster, Published, RedisServer, Tablespace, Tmpfs
from tests.faults.proxy import Proxy


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever a failed test left mounted under ``root``."""
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(str(root) + "/")]
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """A private Postgres 15 cluster for the session (fsync off, trust on 127.0.0.1, superuser root)."""
    root = Path(tempfile.mkdtemp(prefix="ingest-faults-pg-"))
    cluster = PgCluster(root, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            if cluster.running():
                cluster.stop("immediate")
        _unmount_under(root)
        for _ in range(5):  # a server that just stopped may still be removing its files
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.2)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxies() -> Iterator[Callable[..., Proxy]]:
    """``proxies((host, port), name)`` -> a started Proxy, closed after the test."""
    started: list[Proxy] = []

    def make(upstream: tuple[str, int], name: str = "proxy", *, port: int = 0) -> Proxy:
        proxy = Proxy(upstream, name=name, port=port).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


@pytest.fixture
def pg_proxy(pg: PgCluster, proxies: Callable[..., Proxy]) -> Proxy:
    return proxies(("127.0.0.1", pg.port), "postgres")


@pytest.fixture
def redis_proxy(redis_server: RedisServer, proxies: Callable[..., Proxy]) -> Proxy:
    return proxies(("127.0.0.1", redis_server.port), "redis")


@pytest.fixture
def env(broker: str, pg_proxy: Proxy, redis_proxy: Proxy) -> dict[str, str]:
    """Environment of an isolated deployment whose Postgres and Redis are reached through the proxies."""
    uid = f"f_{uuid.uuid4().hex[:10]}"
    return deployment_env(uid, INGEST_KAFKA_BOOTSTRAP=broker,
                          INGEST_DATABASE_URL=f"postgresql://root@{pg_proxy.address}/ingest_{uid}",
                          INGEST_REDIS_URL=f"redis://{redis_proxy.address}/0")


def _database(env: dict[str, str]) -> str:
    return env["INGEST_DATABASE_URL"].rsplit("/", 1)[1]


@pytest.fixture
def db_url(env: dict[str, str], pg: PgCluster) -> str:
    """Direct URL of the test database (not through the proxy)."""
    return pg.url(_database(env))


async def _drop_database(pg: PgCluster, name: str) -> None:
    admin = await asyncpg.connect(pg.url(), timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def config(env: dict[str, str], db_url: str, pg: PgCluster,
                 redis_server: RedisServer) -> AsyncIterator[Config]:
    """A migrated test database on the private cluster and created topics; all removed afterwards."""
    cfg = settings.from_env(env)
    await run.run_migrations(settings.from_env({**env, "INGEST_DATABASE_URL": db_url}))
    await run.ensure_all_topics(cfg)
    try:
        yield cfg
    finally:
        with contextlib.suppress(Exception):
            await broker_mod.delete_topics(cfg, [s.topic_for(cfg) for s in streams.STREAMS.values()])
        await asyncio.to_thread(pg.ensure_running)
        await _drop_database(pg, _database(env))
        await asyncio.to_thread(redis_server.ensure_running)
        redis = Redis.from_url(redis_server.url())
        try:
            await redis.flushall()
        finally:
            await redis.aclose()


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the item (``item.rep_call``), so fixtures can tell a failed test at teardown."""
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def spawn(config: Config, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Consumer]]:
    """``spawn(env, stream="all", *extra, name="consumer")`` -> a running ``ingest consume`` process. When the test
    failed, the end of every consumer's log is printed (the temporary directory holding the logs may be gone by the
    time anyone looks)."""
    started: list[Consumer] = []

    def make(env: dict[str, str], stream: str = "all", *extra: str, name: str = "consumer") -> Consumer:
        consumer = Consumer(env, stream, *extra, log_dir=tmp_path, name=name)
        started.append(consumer)
        return consumer

    yield make
    for consumer in started:
        consumer.kill()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for consumer in started:
            print(f"\n--- log of {consumer.name} (pid {consumer.proc.pid}, last 30,000 characters)\n"
                  f"{consumer.log(tail=30_000)}")


@pytest.fixture
async def tablespace(config: Config, env: dict[str, str], pg: PgCluster) -> AsyncIterator[Callable[[str], Awaitable[Tablespace]]]:
    """``await tablespace("512k")`` -> a ``Tablespace`` on a tmpfs of that size (see the module docstring)."""
    made: list[Tablespace] = []

    async def make(size: str) -> Tablespace:
        uid = uuid.uuid4().hex[:8]
        fs = Tmpfs(pg.root / f"ts-{uid}", size)
        space = Tablespace(f"tiny_{uid}", fs)
        made.append(space)
        admin = await asyncpg.connect(pg.url(), timeout=10)
        try:
            await admin.execute(f"CREATE TABLESPACE {space.name} LOCATION '{fs.path}'")
        finally:
            await admin.close()
        return space

    try:
        yield make
    finally:
        if made:
            await asyncio.to_thread(pg.ensure_running)
            await _drop_database(pg, _database(env))
        for space in made:
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(pg.url(), timeout=10)
                try:
                    await admin.execute(f"DROP TABLESPACE IF EXISTS {space.name}")
                finally:
                    await admin.close()
            space.fs.unmount()
