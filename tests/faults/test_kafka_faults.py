"""Kafka faults under real ``ingest consume`` processes, on a private Tansu broker that every client reaches
through a fault proxy (the broker advertises the proxy's address, so metadata sends clients back through it).
Every case ends with the invariant check (each published event stored exactly once or dead-lettered, nothing
twice, offsets at the end)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from ingest import broker as broker_mod
from ingest.config import Config
from tests.conftest import free_port, stop_process
from tests.faults.helpers import (
    Consumer,
    PgCluster,
    Published,
    check_invariants,
    progress,
    publish_mix,
    wait_caught_up,
    wait_event,
    wait_until,
)
from tests.faults.proxy import HOLD, Proxy, pg_query

CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "100", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"}
TENANTS = 12  # org-0000..org-0011 hash to all four partitions (2, 6, 3 and 1 tenants)


@pytest.fixture(scope="module")
def kafka_proxy() -> Iterator[Proxy]:
    """A private Tansu for this module, listening on a free port and advertising a proxy in front of it."""
    port = free_port()
    proxy = Proxy(("127.0.0.1", port), name="kafka").start()
    log = os.path.join(tempfile.gettempdir(), f"ingest-faults-broker-{port}.log")
    proc = broker_mod.start_embedded("127.0.0.1", port, log_path=log, advertised=proxy.address)
    try:
        yield proxy
    finally:
        stop_process(proc)
        proxy.close()


@pytest.fixture(scope="module")
def broker(kafka_proxy: Proxy) -> str:
    """Overrides the session broker for this module: the bootstrap address is the proxy's."""
    return kafka_proxy.address


def metric_at_least(consumer: Consumer, n: float, name: str, **labels: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await consumer.ametric(name, **labels) >= n
    return check


def owns(consumer: Consumer, n: int, stream: str = "webhook") -> Callable[[], Awaitable[bool]]:
    """A ``wait_until`` check: ``consumer`` was last assigned ``n`` partitions of ``stream``."""
    async def check() -> bool:
        return await consumer.ametric("ingest_partitions_assigned", stream=stream) == n
    return check


async def test_stalled_member_is_evicted_and_its_late_write_fenced(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg: PgCluster,
        kafka_proxy: Proxy, proxies: Callable[..., Proxy], spawn: Callable[..., Consumer]) -> None:
    """Two consumers share the webhook group: A (webhook only; its own Postgres proxy) and B (both streams).
    While A is mid-batch — records staged, its write holding its position lock, the transaction's BEGIN held at
    A's Postgres proxy — every Kafka connection of A (by client id) is stalled beyond the 6 s session timeout.

    Expected: the coordinator evicts A; B is assigned all four partitions, positions them from Postgres and
    stores everything, A's staged records included. When A's write is let through (A still believes it owns its
    partitions), its compare-and-swap on the offset rows fails: the batch is fenced
    (``ingest_fenced_batches_total`` on A, "batch fenced" in its log), never stored; B is never fenced. When
    A's Kafka connections flow again, A rejoins and takes two partitions back and stores its share of new
    events; both exit 0 on SIGTERM; nothing lost, nothing stored twice."""
    database = db_url.rsplit("/", 1)[1]
    a_pg = proxies(("127.0.0.1", pg.port), "pg-a")
    case = {**env, **CASE_ENV}
    b = spawn(case, name="b")
    a = spawn({**case, "INGEST_DATABASE_URL": f"postgresql://root@{a_pg.address}/{database}"}, "webhook", name="a")
    a_id = a.client_id("webhook")
    assert all(a_id not in b.client_id(s) for s in ("webhook", "audit")), "client ids must tell A from B"
    try:
        await wait_until(owns(a, 2), 60, "A to own two webhook partitions", consumers=[a, b])
        await wait_until(owns(b, 2), 30, "B to own two webhook partitions", consumers=[a, b])
        # A's third write is held before its transaction starts (plain "BEGIN;" is only sent by batch writes
        # once a consumer runs without maintenance rounds).
        hold = a_pg.on(pg_query("BEGIN;"), HOLD, skip=2)
        await publish_mix(config, published, "webhook", 2000, tenants=TENANTS, invalid=12, seed=501)
        await publish_mix(config, published, "audit", 800, tenants=TENANTS, invalid=4, seed=502)
        await wait_event(hold.fired, 30, "A's third batch write", consumers=[a, b])

        await asyncio.to_thread(kafka_proxy.only, a_id)
        await asyncio.to_thread(kafka_proxy.stall)
        stalled_at = time.monotonic()
        await wait_until(owns(b, 4), 45, "B to be assigned all four webhook partitions", consumers=[a, b])
        evicted_in = time.monotonic() - stalled_at
        await wait_caught_up(db_url, config, published, consumers=[a, b], timeout=60)
        assert await a.ametric("ingest_fenced_batches_total") == 0

        hold.release()  # A's stale write goes ahead now
        await wait_until(metric_at_least(a, 1, "ingest_fenced_batches_total", stream="webhook"), 30,
                         "A's late batch to be fenced", consumers=[a, b])
        assert "batch fenced" in a.log(100_000)
        rebalances = await a.ametric("ingest_rebalances_total", stream="webhook")
        stall_s = time.monotonic() - stalled_at
        await asyncio.to_thread(kafka_proxy.heal)
        healed_at = time.monotonic()
        await wait_until(metric_at_least(a, rebalances + 1, "ingest_rebalances_total", stream="webhook"), 45,
                         "A to rejoin the group", consumers=[a, b])
        await wait_until(owns(a, 2), 30, "A to own two webhook partitions again", consumers=[a, b])
        await wait_until(owns(b, 2), 30, "B to hand two webhook partitions back", consumers=[a, b])
        rejoined_in = time.monotonic() - healed_at
    finally:
        await asyncio.to_thread(kafka_proxy.heal)

    a_stored = await a.ametric("ingest_events_total", stream="webhook", outcome="stored")
    await publish_mix(config, published, "webhook", 600, tenants=TENANTS, invalid=2, seed=503, prefix="t-")
    await publish_mix(config, published, "audit", 200, tenants=TENANTS, invalid=1, seed=504, prefix="t-")
    await wait_caught_up(db_url, config, published, consumers=[a, b], timeout=60)
    await wait_until(metric_at_least(a, a_stored + 1, "ingest_events_total", stream="webhook", outcome="stored"),
                     10, "A to store new events after rejoining", consumers=[a, b])
    a_fenced = await a.ametric("ingest_fenced_batches_total")
    b_fenced = await b.ametric("ingest_fenced_batches_total")
    assert b_fenced == 0, "B's batches must never be fenced: nobody else wrote its partitions"
    assert await a.aterminate() == 0
    assert await b.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print(f"\nA stalled {stall_s:.1f} s: B owned all partitions {evicted_in:.1f} s after the stall began; A fenced "
          f"{a_fenced:.0f} batch(es), B {b_fenced:.0f}; A rejoined {rejoined_in:.1f} s after the heal; {summary}")


async def test_broker_connections_cut_then_refused_mid_backlog(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg_proxy: Proxy,
        kafka_proxy: Proxy, spawn: Callable[..., Consumer]) -> None:
    """One consumer (both streams) drains a backlog. While its 4th webhook batch is held at the Postgres proxy
    (records staged, so the cut is certainly mid-backlog), every Kafka connection is reset three times, then
    new Kafka connections are refused for 9 s — longer than the 6 s session timeout, so the coordinator drops
    the member — and the held batch is let through while Kafka is still unreachable.

    Expected: the consumer never exits; the held batch commits to Postgres without Kafka (offsets live in
    Postgres); when the broker is reachable again the consumer drains the rest and what is published after — after rejoining if the
    coordinator expired it (Apache Kafka does; Tansu keeps a lone member that heartbeats again, so no new
    assignment is required here); it exits 0 on SIGTERM; nothing lost, nothing stored twice."""
    await publish_mix(config, published, "webhook", 2500, tenants=TENANTS, invalid=10, seed=601)
    await publish_mix(config, published, "audit", 1000, tenants=TENANTS, invalid=4, seed=602)
    hold = pg_proxy.on(b'COPY "webhook_events"', HOLD, skip=3)
    consumer = spawn({**env, **CASE_ENV})
    try:
        await wait_event(hold.fired, 60, "the 4th webhook COPY", consumers=[consumer])
        at = await progress(db_url, config)
        assert at is not None and sum(at.values()) < sum(published.records.values()), "not mid-backlog"
        rebalances = await consumer.ametric("ingest_rebalances_total", stream="webhook")
        resets = 0
        for _ in range(3):
            resets += await asyncio.to_thread(kafka_proxy.cut)
            await asyncio.sleep(1.0)
        assert resets > 0, "the consumer had no Kafka connection to cut"
        await asyncio.to_thread(kafka_proxy.refuse)
        await asyncio.to_thread(kafka_proxy.cut)
        refused_at = time.monotonic()
        await asyncio.sleep(3)
        hold.release()  # the staged batch is written while Kafka is unreachable
        while time.monotonic() - refused_at < 9:
            assert consumer.alive(), f"the consumer exited while Kafka was unreachable\n{consumer.log()}"
            await asyncio.sleep(0.5)
        during = await progress(db_url, config)
    finally:
        await asyncio.to_thread(kafka_proxy.heal)  # also accepts connections again
    healed_at = time.monotonic()
    assert during is not None and at is not None and during["webhook"] > at["webhook"], \
        "the held batch was not committed while Kafka was unreachable"
    # aiokafka may have prefetched the whole backlog before the outage: new records prove consumption resumed.
    await publish_mix(config, published, "webhook", 800, tenants=TENANTS, invalid=3, seed=603, prefix="t-")
    await publish_mix(config, published, "audit", 300, tenants=TENANTS, invalid=1, seed=604, prefix="t-")
    drained_in = await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    waited = time.monotonic() - healed_at
    rejoined = await consumer.ametric("ingest_rebalances_total", stream="webhook") - rebalances
    assert await consumer.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print(f"\n{resets} Kafka connections reset, then refused for 9 s: webhook offsets {at['webhook']} -> "
          f"{during['webhook']} while unreachable; caught up {waited:.1f} s after the heal "
          f"(drain wait {drained_in:.1f} s), {rejoined:.0f} new webhook assignment(s); {summary}")
