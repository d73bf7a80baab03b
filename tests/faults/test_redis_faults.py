"""Redis faults under real ``ingest consume`` processes: Redis stalled (sockets open, nothing answers) and Redis
restarted empty. Redis is only a fast path for dedupe (and the quota store); every case ends with the invariant
check (each published event stored exactly once or dead-lettered, nothing twice, offsets at the end)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from consumers import quotas, streams
from consumers.cli import sample
from ingest.config import Config
from ingest.dedupe import Key, RedisHints
from ingest.metrics import Metrics
from tests.faults.helpers import (
    Consumer,
    Published,
    RedisServer,
    check_invariants,
    progress,
    publish_mix,
    wait_caught_up,
    wait_event,
    wait_until,
)
from tests.faults.proxy import HOLD, Proxy
from tests.integration.helpers import publish_raw, stored_keys

CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "200", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"}
TENANTS = 6
STALL_S = 10.0


async def count_rows(db_url: str, table: str) -> int:
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def counted(consumer: Consumer, records: int) -> Callable[[], Awaitable[bool]]:
    """A ``wait_until`` check: ``consumer`` counted ``records`` records in ``ingest_events_total`` (its metrics
    are updated just after each COMMIT, so they may trail what Postgres already shows)."""
    async def check() -> bool:
        return await consumer.ametric("ingest_events_total") >= records
    return check


async def test_redis_stalled_for_10_seconds(
        config: Config, env: dict[str, str], db_url: str, published: Published, redis_proxy: Proxy,
        spawn: Callable[..., Consumer]) -> None:
    """Redis stops answering for 10 s (the proxy holds every byte; connections stay open) while a backlog is
    consumed. The audit stream has quota overrides for every tenant (generous: nothing is ever denied), so its
    batches need Redis; the webhook stream has no limits, so quotas cost it nothing and Redis is only its dedupe
    hint.

    Expected: no crash and no hang — each Redis call gives up after the client's socket timeout (2 s, one retry).
    webhook keeps flowing during the stall, with Postgres alone deciding duplicates; audit follows the default
    quota policy (INGEST_QUOTA_FAIL_OPEN=false): it pauses (``ingest_paused{reason="redis"}`` and
    ``ingest_quota_degraded{mode="paused"}`` are 1) and stores nothing, with nothing dead-lettered for it. When
    Redis answers again both streams resume by themselves and drain; nothing lost or stored twice.

    The stall lasts 10 s, or longer if audit has not paused by then: a stalled call costs 4 s and audit only
    reaches its quota call after its dedupe lookup timed out, so the pause starts about 8 s in."""
    conn = await asyncpg.connect(db_url)
    try:
        for tenant in sample.tenants(TENANTS):
            await quotas.set_override(conn, tenant, stream="audit", per_second=1_000_000)
    finally:
        await conn.close()
    consumer = spawn({**env, **CASE_ENV})
    await publish_mix(config, published, "webhook", 500, tenants=TENANTS, seed=101)
    await publish_mix(config, published, "audit", 300, tenants=TENANTS, invalid=4, seed=102)
    await wait_caught_up(db_url, config, published, consumers=[consumer])
    assert await consumer.ametric("ingest_quota_decisions_total", stream="audit", decision="admitted") > 0, \
        "the audit quota must go through Redis for this case to mean anything"
    errors_before = await consumer.ametric("ingest_redis_errors_total")

    before = await progress(db_url, config)
    assert before is not None
    audit_rows = await count_rows(db_url, "audit_events")
    await asyncio.to_thread(redis_proxy.stall)
    stalled_at = time.monotonic()
    await publish_mix(config, published, "audit", 1000, tenants=TENANTS, invalid=4, seed=104, prefix="s-")
    await publish_mix(config, published, "webhook", 2000, tenants=TENANTS, seed=103, prefix="s-")
    seen: dict[str, float] = {}

    async def observed() -> bool:
        now = await progress(db_url, config)
        if "webhook stores" not in seen and now is not None and now["webhook"] > before["webhook"]:
            seen["webhook stores"] = time.monotonic() - stalled_at
        if "audit paused" not in seen and (
                await consumer.ametric("ingest_paused", stream="audit", reason="redis") == 1
                and await consumer.ametric("ingest_quota_degraded", mode="paused") == 1):
            seen["audit paused"] = time.monotonic() - stalled_at
        return len(seen) == 2 and time.monotonic() - stalled_at >= STALL_S
    try:
        await wait_until(observed, 3 * STALL_S, "webhook to store and audit to pause while Redis is stalled",
                         consumers=[consumer])
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nseen (s into the stall): {seen}") from None
    assert seen["webhook stores"] <= STALL_S, "webhook did not store anything within the 10 s stall"
    during = await progress(db_url, config)
    stall_s = time.monotonic() - stalled_at
    assert during is not None
    # Only events need the quota: a batch of nothing but invalid records or duplicates may still commit.
    assert await count_rows(db_url, "audit_events") == audit_rows, "audit stored while its quota was unknown"
    assert await consumer.ametric("ingest_redis_errors_total") > errors_before, "Redis calls must time out, not hang"
    assert consumer.alive()
    await asyncio.to_thread(redis_proxy.resume)
    resumed_at = time.monotonic()

    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)
    recovered_in = time.monotonic() - resumed_at
    assert await consumer.ametric("ingest_paused") == 0, "still paused after Redis came back"
    assert await consumer.ametric("ingest_quota_degraded") == 0
    assert await consumer.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print(f"\nredis stalled {stall_s:.1f} s: first webhook batch stored {seen['webhook stores']:.1f} s in, "
          f"{during['webhook'] - before['webhook']} webhook records stored during the stall; audit paused "
          f"{seen['audit paused']:.1f} s in, {during['audit'] - before['audit']} audit records (0 events) "
          f"committed during the stall; drained {recovered_in:.1f} s after resume; {summary}")


async def test_redis_restarted_empty_mid_backlog(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg_proxy: Proxy,
        redis_server: RedisServer, spawn: Callable[..., Consumer]) -> None:
    """The private redis-server is killed and started empty while a backlog is consumed (a webhook batch's COPY
    held at the Postgres proxy meanwhile, inside its transaction, so the restart is certainly mid-backlog);
    afterwards events that were stored before the restart — whose Redis hints died with it — are published
    again.

    Expected: the consumer goes on (Redis hints degrade to "no information"); every re-published copy is caught
    by the Postgres ledger as a duplicate (stored count unchanged, ``ingest_events_total{outcome="duplicate"}``
    up by exactly the copies); nothing lost or stored twice."""
    await publish_mix(config, published, "webhook", 2500, tenants=TENANTS, seed=201)
    await publish_mix(config, published, "audit", 1200, tenants=TENANTS, invalid=4, seed=202)
    hold = pg_proxy.on(b'COPY "webhook_events"', HOLD, skip=3)
    consumer = spawn({**env, **CASE_ENV})
    await wait_event(hold.fired, 60, "the 4th webhook COPY", consumers=[consumer])

    conn = await asyncpg.connect(db_url)
    try:
        before = {s: set(await stored_keys(conn, s)) for s in streams.STREAMS}
    finally:
        await conn.close()
    at = await progress(db_url, config)
    assert at is not None and sum(at.values()) < sum(published.records.values()), "not mid-backlog"
    redis = Redis.from_url(redis_server.url())
    try:
        hinted = [k async for k in redis.scan_iter(match=f"{config.redis_prefix}:dd:*", count=1000)]
        assert hinted, "Redis held no dedupe hints before the restart: the case would prove nothing"
        run_id = (await redis.info("server"))["run_id"]
    finally:
        await redis.aclose()
    await asyncio.to_thread(redis_server.restart_empty)  # no persistence: it comes back empty
    redis = Redis.from_url(redis_server.url())
    try:
        assert (await redis.info("server"))["run_id"] != run_id, "Redis was not restarted"
        hold.release()
        await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)

        # Copies of events stored before the restart that Redis does not know (again): only the ledger can
        # catch them.
        copies: dict[str, list[tuple[bytes, bytes]]] = {}
        for stream in streams.STREAMS:
            hints = RedisHints(redis, prefix=config.redis_prefix, stream=stream, ttl=timedelta(days=1),
                               metrics=Metrics())
            first: dict[Key, dict[str, Any]] = {}
            for e in published.valid[stream]:
                first.setdefault((e["tenant_id"], e["idempotency_key"]), e)
            candidates = [(k, e) for k, e in first.items() if k in before[stream]]
            known = await redis.mget([hints.redis_key(k) for k, _ in candidates]) if candidates else []
            chosen = [e for (_, e), v in zip(candidates, known, strict=True) if v is None][:600]
            assert len(chosen) >= 100, f"{stream}: too few stored-before-restart events without a hint"
            published.add(stream, chosen)
            copies[stream] = [(e["tenant_id"].encode(), orjson.dumps(e)) for e in chosen]
    finally:
        await redis.aclose()
    n = sum(len(r) for r in copies.values())
    await wait_until(counted(consumer, sum(published.records.values()) - n), 10,
                     "the metrics to count every record", consumers=[consumer])
    stored_before = await consumer.ametric("ingest_events_total", outcome="stored")
    dupes_before = await consumer.ametric("ingest_events_total", outcome="duplicate")
    for stream, records in copies.items():
        await publish_raw(config, stream, records)
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)
    await wait_until(counted(consumer, sum(published.records.values())), 10, "the metrics to count every record",
                     consumers=[consumer])
    assert await consumer.ametric("ingest_events_total", outcome="stored") == stored_before, \
        "a re-published copy was stored again"
    assert await consumer.ametric("ingest_events_total", outcome="duplicate") - dupes_before == n
    assert await consumer.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print(f"\nredis restarted empty at offsets {at}; {n} copies of pre-restart events all caught by the "
          f"ledger; {summary}")
