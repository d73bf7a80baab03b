"""Consumer-group faults under real ``ingest consume`` processes: members killed with SIGKILL while they share a
group. Every case ends with the invariant check (each published event stored exactly once or dead-lettered,
nothing twice, offsets at the end)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg

from ingest.config import Config
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

# Small batches; no maintenance round (every COMMIT after a stream's first batch is a batch's); a short session
# timeout: the broker drops a killed member (which never says goodbye) only when its session expires.
CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "100", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0",
            "INGEST_SESSION_TIMEOUT_MS": "3000", "INGEST_HEARTBEAT_INTERVAL_MS": "300"}
KILLS = 4
TENANTS = 12
STREAMS = ("webhook", "audit")


def active(consumer: Consumer) -> Callable[[], Awaitable[bool]]:
    """A ``wait_until`` check: ``consumer`` holds partitions of both streams and committed a batch of each."""
    async def check() -> bool:
        for s in STREAMS:
            if await consumer.ametric("ingest_partitions_assigned", stream=s) == 0 or \
                    await consumer.ametric("ingest_batches_total", stream=s) == 0:
                return False
        return True
    return check


def lock_waiters(db_url: str, seen: list[str]) -> Callable[[], Awaitable[bool]]:
    """A ``wait_until`` check: some session of the test database waits for a lock (its statements go to
    ``seen``)."""
    database = db_url.rsplit("/", 1)[1]

    async def check() -> bool:
        conn = await asyncpg.connect(db_url, timeout=5)
        try:
            rows = await conn.fetch("SELECT query FROM pg_stat_activity WHERE datname = $1 "
                                    "AND wait_event_type = 'Lock'", database)
        finally:
            await conn.close()
        seen[:] = [" ".join(r[0].split())[:60] for r in rows]
        return bool(rows)
    return check


async def test_repeated_kill9_while_two_consumers_share_the_group(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg: PgCluster,
        proxies: Callable[..., Proxy], spawn: Callable[..., Consumer]) -> None:
    """Two consumer processes share each stream's group, each reaching Postgres through its own proxy. They drain
    a backlog while more is published all along. Four times, one of them (alternately) is killed with SIGKILL
    while a batch's COMMIT is held at its proxy — its transaction open, its offset rows locked, no LeaveGroup —
    and a replacement is started at once; the next kill comes once the replacement holds partitions of both
    streams and committed on both. The held COMMIT of the dead process then either dies with its connection
    (kills 1 and 3: the server rolls the batch back) or is delivered late (kills 2 and 4, as when a process dies
    right after writing COMMIT): only after another member, now owning the partitions, is blocked behind the dead
    transaction's locks.

    Expected: a kill costs only time. A rolled-back batch is re-read from the stored offsets by the partitions'
    next owner; a late COMMIT lands, and the new owner either positions after it or has its own batch fenced by
    the CAS and re-positions — never both writes. The survivors reach the end of every partition and exit 0 on
    SIGTERM; nothing lost, nothing stored twice."""
    database = db_url.rsplit("/", 1)[1]
    case = {**env, **CASE_ENV}

    def start(name: str) -> tuple[Consumer, Proxy]:
        proxy = proxies(("127.0.0.1", pg.port), f"pg-{name}")
        url = f"postgresql://root@{proxy.address}/{database}"
        return spawn({**case, "INGEST_DATABASE_URL": url}, name=name), proxy

    await publish_mix(config, published, "webhook", 2000, tenants=TENANTS, invalid=12, seed=301)
    await publish_mix(config, published, "audit", 1000, tenants=TENANTS, invalid=6, seed=302)
    slots = [start("c0"), start("c1")]
    started = time.monotonic()
    publishing = asyncio.Event()
    publishing.set()

    async def keep_publishing() -> None:
        n = 0
        while publishing.is_set():
            n += 1
            await publish_mix(config, published, "webhook", 100, tenants=TENANTS, invalid=1, seed=400 + n,
                              prefix=f"p{n}-")
            await publish_mix(config, published, "audit", 40, tenants=TENANTS, invalid=1, seed=600 + n,
                              prefix=f"p{n}-")
            await asyncio.sleep(0.5)
    publisher = asyncio.create_task(keep_publishing())

    def members() -> list[Consumer]:
        return [c for c, _ in slots]

    log: list[str] = []
    try:
        for consumer, _ in slots:
            await wait_until(active(consumer), 60, f"{consumer.name} to commit on both streams", consumers=members())
        for i in range(KILLS):
            victim, proxy = slots[i % 2]
            hold = proxy.on(pg_query("COMMIT;"), HOLD)
            await wait_event(hold.fired, 30, f"a COMMIT of {victim.name}", consumers=members())
            killed_at = time.monotonic()
            await asyncio.to_thread(victim.kill)
            slots[i % 2] = start(f"c{i % 2}-r{i + 1}")
            fenced_before = sum([await c.ametric("ingest_fenced_batches_total") for c in members()])
            if i % 2 == 0:
                await asyncio.to_thread(proxy.cut)  # the COMMIT never reaches the server: rolled back
                what = "rolled back"
            else:
                waiting: list[str] = []
                await wait_until(lock_waiters(db_url, waiting), 30, "a session blocked by the dead transaction",
                                 consumers=members())
                hold.release()  # the dead process's COMMIT reaches the server now
                what = (f"committed late, {time.monotonic() - killed_at:.1f} s after the kill, once blocking "
                        f"{waiting}")
            await wait_until(active(slots[i % 2][0]), 60, "the replacement to commit on both streams",
                             consumers=members())
            fenced = sum([await c.ametric("ingest_fenced_batches_total") for c in members()]) - fenced_before
            log.append(f"kill {i + 1} ({victim.name}) +{killed_at - started:.1f} s: held batch {what}; "
                       f"replacement committing on both streams {time.monotonic() - killed_at:.1f} s after the "
                       f"kill; fenced batches since: {fenced:.0f}")
    finally:
        publishing.clear()
        await asyncio.wait([publisher])
    publisher.result()  # a failed publish would make the invariant meaningless
    at = await progress(db_url, config)
    drained = await wait_caught_up(db_url, config, published, consumers=members(), timeout=90)
    for consumer in members():
        assert await consumer.aterminate() == 0
    summary = await check_invariants(db_url, config, published)
    print("\n" + "\n".join(log) + f"\nafter the last kill: stored {at}, published {dict(published.records)}, "
          f"drained {drained:.1f} s later; {summary}")
