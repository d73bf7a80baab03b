"""ingest on a real Redis Cluster of three masters (``tests.faults.cluster.LocalCluster``, on loopback):
exactly-once with duplicates, a quota split over the masters, and a master killed and restarted empty mid-run.

Consumers run with ``INGEST_REDIS_CLUSTER=true`` and ``INGEST_REDIS_URL`` naming one node; Postgres is the
suite's private cluster behind the proxy, as in every fault case."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from consumers import quotas, streams
from ingest.config import Config
from ingest.dedupe import RedisHints
from ingest.metrics import Metrics
from ingest.quota import admin as quota_admin
from ingest.quota.gcra import parse_state
from ingest.quota.keys import state_key
from ingest.quota.limits import LimitBook, Limits
from ingest.quota.stage import RedisQuota
from ingest.rows import Key
from tests.faults.cluster import LocalCluster
from tests.faults.helpers import (
    Consumer,
    Published,
    check_invariants,
    progress,
    publish_mix,
    wait_caught_up,
    wait_event,
    wait_until,
)
from tests.faults.proxy import HOLD, Proxy
from tests.ingest.quota.helpers import Source
from tests.integration.helpers import publish_raw, stored_keys

CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "200", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"}
TENANTS = 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    nodes = LocalCluster(3).start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def cluster_env(env: dict[str, str], cluster: LocalCluster) -> dict[str, str]:
    return {**env, **CASE_ENV, "INGEST_REDIS_URL": cluster.url(0), "INGEST_REDIS_CLUSTER": "true"}


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    redis = RedisCluster.from_url(cluster.url(0))
    try:
        yield redis
    finally:
        await redis.aclose()


def counted(consumer: Consumer, records: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await consumer.ametric("ingest_events_total") >= records
    return check


def evalsha_calls(cluster: LocalCluster) -> list[int]:
    """``EVALSHA`` calls served by each master so far (INFO commandstats)."""
    out = []
    for i in range(len(cluster.ports)):
        m = re.search(r"cmdstat_evalsha:calls=(\d+)", cluster.info(i, "commandstats"))
        out.append(int(m.group(1)) if m else 0)
    return out


async def copies_of_stored(config: Config, published: Published, db_url: str, limit: int,
                           ) -> dict[str, list[tuple[bytes, bytes]]]:
    """Up to ``limit`` per stream of already-stored events, as records to publish again (recorded in
    ``published``)."""
    conn = await asyncpg.connect(db_url)
    try:
        stored = {s: set(await stored_keys(conn, s)) for s in streams.STREAMS}
    finally:
        await conn.close()
    copies: dict[str, list[tuple[bytes, bytes]]] = {}
    for stream in streams.STREAMS:
        first: dict[Key, dict[str, Any]] = {}
        for e in published.valid[stream]:
            first.setdefault((e["tenant_id"], e["idempotency_key"]), e)
        chosen = [e for k, e in first.items() if k in stored[stream]][:limit]
        published.add(stream, chosen)
        copies[stream] = [(e["tenant_id"].encode(), orjson.dumps(e)) for e in chosen]
    return copies


async def test_exactly_once_with_duplicates_on_a_cluster(
        config: Config, cluster_env: dict[str, str], db_url: str, published: Published, cluster: LocalCluster,
        client: RedisCluster, spawn: Callable[..., Consumer]) -> None:
    """A backlog with re-deliveries on both streams, then copies of stored events.

    Expected: each event stored once; every stored key has its hint, and the hints are spread over all three
    masters; the copies are all duplicates (caught by the hints: each batch of copies asks the cluster with
    one script call per slot); nothing is dead-lettered but the invalid records."""
    await publish_mix(config, published, "webhook", 2000, tenants=TENANTS, seed=301)
    await publish_mix(config, published, "audit", 1000, tenants=TENANTS, invalid=4, seed=302)
    consumer = spawn(cluster_env)
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    await wait_until(counted(consumer, sum(published.records.values())), 10, "the metrics to count every record",
                     consumers=[consumer])
    conn = await asyncpg.connect(db_url)
    try:
        stored = {s: list(await stored_keys(conn, s)) for s in streams.STREAMS}
    finally:
        await conn.close()
    per_node = [0, 0, 0]
    for stream, keys in stored.items():
        hints = RedisHints(client, prefix=config.redis_prefix, stream=stream, ttl=timedelta(days=1), metrics=Metrics())
        names = [hints.redis_key(k) for k in keys]
        pipe = client.pipeline()
        for name in names:
            pipe.exists(name)
        found = await pipe.execute()
        assert all(found), f"{stream}: {found.count(0)} stored keys without a hint"
        for name in names:
            per_node[cluster.master_of(key_slot(name))] += 1
    assert all(n > 0 for n in per_node), f"hints not spread over the masters: {per_node}"

    dupes_before = await consumer.ametric("ingest_events_total", outcome="duplicate")
    stored_before = await consumer.ametric("ingest_events_total", outcome="stored")
    copies = await copies_of_stored(config, published, db_url, 500)
    n = sum(len(r) for r in copies.values())
    for stream, records in copies.items():
        await publish_raw(config, stream, records)
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)
    await wait_until(counted(consumer, sum(published.records.values())), 10, "the metrics to count every record",
                     consumers=[consumer])
    assert await consumer.ametric("ingest_events_total", outcome="stored") == stored_before
    assert await consumer.ametric("ingest_events_total", outcome="duplicate") - dupes_before == n
    assert await consumer.ametric("ingest_redis_errors_total") == 0
    assert await consumer.aterminate() == 0
    print(f"\ncluster: hints per master {per_node}; {n} copies all duplicates; "
          f"{await check_invariants(db_url, config, published)}")


async def test_quota_split_over_the_masters(config: Config, cluster: LocalCluster, client: RedisCluster) -> None:
    """One batch of 3,000 events of 300 limited tenants whose state keys fall on all three masters (daily cap 7
    each, 10 events each).

    Expected: per tenant exactly 7 admitted, in batch order, state on the master that owns its slot; the batch
    costs one EVALSHA per slot (all sent as one pipeline: one round trip per master); a retry of the same batch
    returns the same verdicts without charging anything again."""
    book = LimitBook("webhook", Limits(per_day=7), Source(), refresh_s=3600)
    quota = RedisQuota(client, prefix=config.redis_prefix, stream="webhook", book=book)
    tenants = [f"org-{i:04d}" for i in range(300)]
    batch = [t for _ in range(10) for t in tenants]
    keys = [(t, f"k{n}") for n in range(10) for t in tenants]
    slots = {key_slot(state_key(config.redis_prefix, "webhook", t).encode()) for t in tenants}
    masters = Counter(cluster.master_of(s) for s in slots)
    assert len(masters) == 3, f"the tenants' slots should cover every master: {masters}"
    await quota.admit(["warm-up"], [("warm-up", "k")])  # the script gets loaded on the masters (NOSCRIPT once)
    before = evalsha_calls(cluster)
    verdicts = await quota.admit(batch, keys)
    calls = [a - b for a, b in zip(evalsha_calls(cluster), before, strict=True)]
    assert sum(calls) == len(slots), f"one EVALSHA per slot: {calls} for {len(slots)} slots"
    assert calls == [masters[i] for i in range(3)], f"{calls} vs slots per master {masters}"
    got = Counter(t for t, v in zip(batch, verdicts, strict=True) if v)
    assert got == Counter(dict.fromkeys(tenants, 7))
    for t in tenants:
        assert [v for u, v in zip(batch, verdicts, strict=True) if u == t] == [True] * 7 + [False] * 3
    states = await client.mget_nonatomic([state_key(config.redis_prefix, "webhook", t) for t in tenants])
    assert all(s is not None and parse_state(s).used == 7 for s in states)  # type: ignore[union-attr]
    assert await quota.admit(batch, keys) == verdicts  # retried: same verdicts, nothing charged again
    states_again = await client.mget_nonatomic([state_key(config.redis_prefix, "webhook", t) for t in tenants])
    assert states_again == states
    await quota.settle(keys)
    # What `ingest quota list` reads (SCAN over every master, a pipeline of GETs, TIME) works on the cluster too.
    assert {("webhook", t) for t in tenants} <= await quota_admin.tracked(client, config.redis_prefix)
    usage = await quota_admin.read(client, config.redis_prefix, [("webhook", t, Limits(per_day=7)) for t in tenants])
    assert {(u.used_today, u.denied_today) for u in usage} == {(7, 3)}
    print(f"\nquota split: {len(slots)} slots, EVALSHA per master {calls}")


async def test_master_killed_and_restarted_empty_mid_run(
        config: Config, cluster_env: dict[str, str], db_url: str, published: Published, pg_proxy: Proxy,
        cluster: LocalCluster, spawn: Callable[..., Consumer]) -> None:
    """While a backlog is consumed (a webhook batch's COPY held at the Postgres proxy, so it is certainly
    mid-run), one master is killed (SIGKILL); once the survivors report the cluster failed the held batch is
    released, and once the consumer has paused the master is started again empty (its slots kept, its hints and
    quota states gone). Both streams' tenants have generous quota overrides, so every
    batch needs Redis for its quota decision. Afterwards copies of stored events are published.

    Expected: while the cluster is down the consumer pauses on its quota calls (nothing dead-lettered, nothing
    skipped) and resumes by itself once the master is back; every copy is a duplicate (hints or ledger); nothing
    lost or stored twice."""
    conn = await asyncpg.connect(db_url)
    try:
        for i in range(TENANTS):
            await quotas.set_override(conn, f"org-{i:04d}", per_second=100_000, burst=100_000)
    finally:
        await conn.close()
    await publish_mix(config, published, "webhook", 2500, tenants=TENANTS, seed=311)
    await publish_mix(config, published, "audit", 1200, tenants=TENANTS, invalid=4, seed=312)
    hold = pg_proxy.on(b'COPY "webhook_events"', HOLD, skip=3)
    consumer = spawn(cluster_env)
    await wait_event(hold.fired, 60, "the 4th webhook COPY", consumers=[consumer])
    at = await progress(db_url, config)
    assert at is not None and sum(at.values()) < sum(published.records.values()), "not mid-run"
    victim = 1
    keys_before = cluster.dbsize(victim)
    assert keys_before > 0, "the victim master held nothing: the case would prove nothing"
    await asyncio.to_thread(cluster.kill, victim)
    # The survivors declare the cluster failed after the node timeout; only then is every quota call refused, so
    # the held batch is released into a failed cluster (else the backlog may end before any call meets it).
    failed_after = await asyncio.to_thread(cluster.wait_state, "fail")
    hold.release()
    await wait_until(consumer.reached("ingest_paused", 1, reason="redis"), 30,
                     "a pause on the quota call while the cluster is down", consumers=[consumer])
    ok_after = await asyncio.to_thread(cluster.restart_empty, victim)
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    await wait_until(consumer.at_most("ingest_paused", 0), 30, "the pause to end", consumers=[consumer])
    await wait_until(counted(consumer, sum(published.records.values())), 10, "the metrics to count every record",
                     consumers=[consumer])
    stored_before = await consumer.ametric("ingest_events_total", outcome="stored")
    dupes_before = await consumer.ametric("ingest_events_total", outcome="duplicate")
    copies = await copies_of_stored(config, published, db_url, 600)
    n = sum(len(r) for r in copies.values())
    for stream, records in copies.items():
        await publish_raw(config, stream, records)
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)
    await wait_until(counted(consumer, sum(published.records.values())), 10, "the metrics to count every record",
                     consumers=[consumer])
    assert await consumer.ametric("ingest_events_total", outcome="stored") == stored_before
    assert await consumer.ametric("ingest_events_total", outcome="duplicate") - dupes_before == n
    retries = await consumer.ametric("ingest_retries_total", component="redis")
    assert await consumer.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print(f"\nmaster {victim} killed at offsets {at} ({keys_before} keys), cluster failed {failed_after:.1f} s later, "
          f"ok {ok_after:.1f} s after its "
          f"restart; {retries} redis retries; {n} copies all duplicates; {summary}")
