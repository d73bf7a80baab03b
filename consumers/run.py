"""Wire the stages for each stream and run them: ``consume`` is what ``ingest consume`` executes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from consumers import quotas, streams
from consumers.streams import Stream
from ingest import ledger, migrate, partitions
from ingest import roles as pg_roles
from ingest.breaker import Breaker
from ingest.broker import ensure_topics
from ingest.config import Config, maintenance_url
from ingest.consumer import StreamConsumer, Totals
from ingest.dedupe import RedisHints
from ingest.maintenance import LOCK_KEY, DeadLetterPolicy, LedgerPolicy, Maintenance
from ingest.metrics import Metrics
from ingest.pipeline import Pipeline
from ingest.redaction import redact
from ingest.services import ServiceUnavailable, connect_redis, create_pool, redis_client
from ingest.sql import ident
from ingest.writer import Writer

if TYPE_CHECKING:
    from ingest.http import HealthServer
    from ingest.sql import Conn

log = logging.getLogger(__name__)


async def run_migrations(config: Config, roles: pg_roles.Roles | None = None,
                         passwords: Mapping[str, str] | None = None,
                         report: pg_roles.RoleChanges | None = None) -> list[int]:
    """Create the database if needed, apply migrations, create partitions; return versions applied now.

    Connects with the maintenance (owner) URL. With ``roles`` (``ingest migrate --roles``): create or converge
    the roles, hand existing objects over to the owner, migrate and create partitions as the owner, then grant
    the writer and reader exactly their privileges (``ingest.roles``); ``report`` records what changed."""
    url = maintenance_url(config)
    try:
        await migrate.create_database_if_missing(url)
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ServiceUnavailable("postgres", redact(url), exc) from None
    pool = await create_pool(url, max_size=1)
    try:
        async with pool.acquire() as conn:
            if roles is not None:
                report = await pg_roles.ensure_roles(conn, roles, passwords, report)
                await pg_roles.hand_over(conn, roles.owner, report=report)
                await pg_roles.act_as(conn, roles.owner)
            try:
                applied = await migrate.apply(conn, streams.migrations())
                await ensure_partitions(conn, config)
                if roles is not None:
                    await pg_roles.grant(conn, roles, role_tables())
            finally:
                if roles is not None:
                    await pg_roles.act_as(conn, None)
        return applied
    finally:
        await pool.close()


def role_tables() -> pg_roles.GrantTables:
    """The tables the writer and reader roles are granted on: every stream's, and the quota overrides."""
    shared = streams.shared_tables()
    return pg_roles.GrantTables(events=tuple(s.table for s in streams.STREAMS.values()),
                           dead_letters=shared.dead_letters, ledger=shared.ledger, offsets=shared.offsets,
                           offset_changes=shared.offset_changes,
                           quota=tuple(streams.QUOTA_TABLES))


async def ensure_partitions(conn: Conn, config: Config) -> list[str]:
    """Partitions for every stream over [now - retention, now + premake], and the ledger's epochs; one process
    at a time."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return []
    try:
        today = datetime.now(UTC).date()
        created = []
        for p in streams.policies(config, list(streams.STREAMS.values())):
            created += await partitions.ensure(
                conn, p.table, first=today - p.retention, last=today + p.premake, granularity=p.granularity,
                lock_timeout_ms=config.partitions.lock_timeout_ms)
        policy = ledger_policy(config)
        created += (await ledger.roll(conn, policy.table, window=policy.window, epochs=policy.epochs,
                                      now=datetime.now(UTC), lock_timeout_ms=config.partitions.lock_timeout_ms)).created
        return created
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


def maintenance(config: Config, rt: Runtime, pool: asyncpg.Pool | None = None) -> Maintenance:
    """Partition maintenance for every stream's table (creation ahead, retention, DEFAULT check), on ``pool``
    (connected with ``maintenance_url``: the owner) or else the runtime's pool."""
    cfg = config.partitions
    return Maintenance(
        pool or rt.pool, streams.policies(config, list(streams.STREAMS.values())),
        lock_timeout_ms=cfg.lock_timeout_ms, interval=cfg.maintenance_interval.total_seconds(),
        archive=cfg.retention_action == "archive", export_dir=cfg.export_dir or None,
        metrics=rt.metrics, ledger=ledger_policy(config), dead_letters=dead_letter_policy(config))


def ledger_policy(config: Config) -> LedgerPolicy:
    """The dedupe ledger's epochs (shared by every stream): the window cut into ``INGEST_DEDUPE_EPOCHS``."""
    return LedgerPolicy(streams.shared_tables().ledger, config.dedupe.window, config.dedupe.epochs)


def dead_letter_policy(config: Config) -> DeadLetterPolicy | None:
    """Retention of the dead letters (shared by every stream); None when ``INGEST_DLQ_RETENTION_DAYS`` is 0."""
    if not config.dlq_retention:
        return None
    return DeadLetterPolicy(streams.shared_tables().dead_letters, config.dlq_retention)


async def ensure_all_topics(config: Config) -> list[str]:
    """Create the streams' topics that are missing, with the configured partitions, replication factor and
    ``min.insync.replicas``."""
    return await ensure_topics(config, [s.topic_for(config) for s in streams.STREAMS.values()],
                               config.topic_partitions, replication_factor=config.topic_replication_factor,
                               min_insync_replicas=config.topic_min_insync_replicas)


@dataclass
class Runtime:
    """Shared connections of one process; close with ``aclose``."""

    pool: asyncpg.Pool
    redis: Redis | RedisCluster
    metrics: Metrics

    async def aclose(self) -> None:
        await self.pool.close()
        await self.redis.aclose()


async def open_runtime(config: Config, metrics: Metrics | None = None, *, pool_size: int = 4) -> Runtime:
    """Connect to Postgres (required) and Redis (optional: without it Postgres alone decides duplicates)."""
    pool = await create_pool(config.database_url, max_size=pool_size)
    try:
        redis = await connect_redis(config.redis_url, cluster=config.redis_cluster)
    except ServiceUnavailable as exc:
        log.warning("redis unavailable at start; continuing, Postgres decides duplicates", extra={"error": str(exc)})
        redis = redis_client(config.redis_url, cluster=config.redis_cluster)
    return Runtime(pool, redis, metrics or Metrics(tenant_label_limit=config.tenant_label_limit))


def build_consumer(config: Config, stream: Stream, rt: Runtime) -> StreamConsumer:
    """Wire decode/validate -> dedupe -> quota -> write for ``stream``."""
    tables = stream.tables()
    topic, group = stream.topic_for(config), stream.group_for(config)
    quota = quotas.build(config, stream.name, redis=rt.redis, pool=rt.pool, metrics=rt.metrics)
    writer = Writer(stream=stream.name, group=group, topic=topic, tables=tables, window=config.dedupe.window,
                    quota=quota)
    hints = RedisHints(rt.redis, prefix=config.redis_prefix, stream=stream.name, ttl=config.dedupe.hint_ttl,
                       metrics=rt.metrics)
    pipeline = Pipeline(stream=stream.name, contract=stream.contract(config), limits=config.decode,
                        writer=writer, hints=hints, metrics=rt.metrics, breaker=Breaker(config.breaker))
    return StreamConsumer(config=config, stream=stream.name, topic=topic, group=group, pipeline=pipeline,
                          pool=rt.pool, metrics=rt.metrics, offsets_table=tables.offsets,
                          changes_table=tables.offset_changes)


GC_THRESHOLD = 50_000
"""Allocations between two young-generation collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Collect cyclic garbage less often in a consuming process.

    A batch allocates tens of thousands of short-lived objects (records, rows, decoded values) that reference
    counting frees; with CPython's default threshold the collector runs every 700 allocations and, as batches
    stay alive across collections, promotes them and rescans older generations: about 1 µs per event in
    ``prepare`` alone. Objects alive at start-up (modules, clients) are frozen out of every collection. Memory
    stays bounded: cycles are still collected, only in larger steps."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


async def consume(config: Config, selected: list[Stream], stop: asyncio.Event, *, drain: bool = False,
                  metrics: Metrics | None = None) -> dict[str, Totals]:
    """Run one consumer per selected stream until ``stop`` (or caught up with ``drain``)."""
    rt = await open_runtime(config, metrics)
    tune_gc()
    maint_pool: asyncpg.Pool | None = None  # DDL runs as the owner when its URL differs from the writer's
    watched: list[StreamConsumer] = []  # filled below; the probes read it at each request
    server: HealthServer | None = None
    try:
        consumers = [build_consumer(config, s, rt) for s in selected]
        watched.extend(consumers)
        # The group join takes seconds (the broker waits for more members); do our own start-up meanwhile.
        ready = asyncio.Event()
        tasks = [asyncio.create_task(c.run(stop, drain=drain, ready=ready)) for c in consumers]
        maint_stop = asyncio.Event()
        maint_task = None
        try:
            if config.metrics_port:
                # aiohttp takes ~0.5 s to import: in a thread, so the loop keeps joining the group meanwhile.
                await asyncio.to_thread(importlib.import_module, "ingest.http")
                from ingest import http

                server = http.HealthServer(
                    metrics=rt.metrics, host=config.metrics_host, port=config.metrics_port, consumers=watched,
                    probes={"postgres": http.postgres_probe(rt.pool), "redis": http.redis_probe(rt.redis),
                            "kafka": http.kafka_probe(watched)},
                    stale_after=http.liveness_window(config.max_poll_interval_ms))
                await server.start()
            async with rt.pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regclass($1)", ident(streams.shared_tables().offsets)) is None:
                    raise ServiceUnavailable("postgres", redact(config.database_url),
                                             "schema missing: run `ingest migrate` first")
            if maintenance_url(config) != config.database_url:
                maint_pool = await create_pool(maintenance_url(config), max_size=1)
            async with (maint_pool or rt.pool).acquire() as conn:
                try:
                    await ensure_partitions(conn, config)
                except asyncpg.InsufficientPrivilegeError as exc:
                    log.warning("cannot create partitions as this role; set INGEST_MAINTENANCE_DATABASE_URL to "
                                "the owner's URL or run `ingest partitions ensure` as the owner",
                                extra={"error": str(exc)[:200]})
            ready.set()
            if config.partitions.maintenance_interval.total_seconds() > 0 and not drain:
                maint_task = asyncio.create_task(maintenance(config, rt, maint_pool).run_forever(maint_stop))
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            maint_stop.set()
            if maint_task is not None:
                # Each maintenance step is its own transaction: a cancel after 5 s rolls back cleanly.
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(maint_task, 5)
        return {s.name: r for s, r in zip(selected, results, strict=True)}
    finally:
        try:
            if server is not None:
                await server.stop()
        finally:
            if maint_pool is not None:
                await maint_pool.close()
            await rt.aclose()
