"""Postgres faults injected under real ``ingest consume`` processes; every case ends with the invariant check
(each published event stored exactly once or dead-lettered, nothing twice, offsets at the end)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from ingest import ledger
from ingest.config import Config
from tests.faults.helpers import (
    Consumer,
    PgCluster,
    Published,
    Tablespace,
    check_invariants,
    progress,
    publish_mix,
    wait_caught_up,
    wait_event,
    wait_positioned,
    wait_until,
)
from tests.faults.proxy import CUT_AFTER, CUT_BEFORE, HOLD, Proxy, pg_query

# Small batches so that faults land between and inside many transactions; no maintenance round, so every
# COMMIT the consumer sends is a batch's.
CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "200", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"}


async def publish_both(config: Config, published: Published, seed: int) -> None:
    await publish_mix(config, published, "webhook", 2000, tenants=6, dup_rate=0.1, invalid=8, seed=seed)
    await publish_mix(config, published, "audit", 1000, tenants=6, dup_rate=0.1, invalid=4, seed=seed + 1)


async def open_transactions(pg: PgCluster, db_url: str) -> int:
    """Sessions of the test database idle inside a transaction (waiting for their client)."""
    admin = await asyncpg.connect(pg.url())
    try:
        return int(await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'idle in transaction'",
            db_url.rsplit("/", 1)[1]))
    finally:
        await admin.close()


def in_transaction(pg: PgCluster, db_url: str) -> Callable[[], Awaitable[bool]]:
    """A ``wait_until`` check: a session of the test database is idle inside a transaction (the state a held
    statement leaves its session in), as ``pg_stat_activity`` shows it."""
    async def check() -> bool:
        return await open_transactions(pg, db_url) >= 1
    return check


async def test_checker_catches_doubles_losses_and_lagging_offsets(config: Config, db_url: str) -> None:
    """The invariant checker is not vacuous: a correct state passes, a double, a loss, a stray dead letter or
    offsets short of the end fail it (states written by hand, no consumer)."""
    published = Published()
    events = [{"tenant_id": "org-1", "idempotency_key": f"k{i}"} for i in range(3)]
    published.add("webhook", [*events, events[0]], [b"not json"])  # 5 records: 3 unique, 1 re-delivery, 1 bad
    conn = await asyncpg.connect(db_url)
    try:
        for e in events:
            await conn.execute(
                "INSERT INTO webhook_events (tenant_id, idempotency_key, event_type, source, occurred_at, payload, "
                "kafka_timestamp, source_partition, source_offset) VALUES ($1, $2, 't', 's', now(), '{}', now(), 0, 0)",
                e["tenant_id"], e["idempotency_key"])
            async with conn.transaction():  # claimed as the writer does: under the shared epoch lock
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", ledger.EPOCH_LOCK)
                await ledger.claim(conn, "dedupe_ledger", "webhook", [(e["tenant_id"], e["idempotency_key"])],
                                   config.dedupe.window)
        await conn.execute(
            "INSERT INTO dead_letters (stream, reason, detail, raw, source_topic, source_partition, source_offset) "
            "VALUES ('webhook', 'not_json', '', 'not json', 't', 0, 0)")
        await conn.execute("INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 5)",
                           f"{config.group_prefix}.webhook", f"{config.topic_prefix}events.webhook")
        await check_invariants(db_url, config, published)

        ghost = [("org-1", "ghost")]  # claimed but never stored
        async with conn.transaction():
            await ledger.claim(conn, "dedupe_ledger", "webhook", ghost, config.dedupe.window)
        with pytest.raises(AssertionError, match="the ledger holds 4 keys for 3 stored events"):
            await check_invariants(db_url, config, published)
        async with conn.transaction():
            await ledger.unclaim(conn, "dedupe_ledger", "webhook", ghost)
            await ledger.unclaim(conn, "dedupe_ledger", "webhook", [("org-1", "k2")])
        with pytest.raises(AssertionError, match=r"1 stored but not in the ledger, e.g. \[\('org-1', 'k2'\)\]"):
            await check_invariants(db_url, config, published)
        async with conn.transaction():
            await ledger.claim(conn, "dedupe_ledger", "webhook", [("org-1", "k2")], config.dedupe.window)
        await check_invariants(db_url, config, published)

        await conn.execute("INSERT INTO webhook_events SELECT * FROM webhook_events LIMIT 1")
        with pytest.raises(AssertionError, match="stored more than once"):
            await check_invariants(db_url, config, published)
        await conn.execute("DELETE FROM webhook_events WHERE idempotency_key IN ('k0', 'k1')")
        with pytest.raises(AssertionError, match="2 events lost"):
            await check_invariants(db_url, config, published)
        await conn.execute("UPDATE consumer_offsets SET next_offset = 4")
        await conn.execute("UPDATE dead_letters SET reason = 'db_rejected', raw = 'other'")
        with pytest.raises(AssertionError, match=r"(?s)unexpected dead letters.*not dead-lettered.*sum to 4"):
            await check_invariants(db_url, config, published)
    finally:
        await conn.close()


@pytest.mark.parametrize("action", [CUT_BEFORE, CUT_AFTER])
async def test_commit_cut_at_the_protocol_level(pg: PgCluster, pg_proxy: Proxy, action: str) -> None:
    """The proxy's COMMIT triggers do what the cases rely on: CUT_BEFORE rolls the transaction back, CUT_AFTER
    commits it while the client only sees its connection die."""
    admin = await asyncpg.connect(pg.url())
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS proxy_probe (action text PRIMARY KEY)")
        await admin.execute("DELETE FROM proxy_probe WHERE action = $1", action)
        trigger = pg_proxy.on(pg_query("COMMIT;"), action)
        conn = await asyncpg.connect(f"postgresql://root@{pg_proxy.address}/postgres")
        with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            async with conn.transaction():
                await conn.execute("INSERT INTO proxy_probe VALUES ($1)", action)
        assert trigger.fired.is_set()
        conn.terminate()
        committed = await admin.fetchval("SELECT count(*) FROM proxy_probe WHERE action = $1", action)
        assert committed == (1 if action == CUT_AFTER else 0)
    finally:
        await admin.close()


async def test_postgres_restart_mid_transaction(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg: PgCluster, pg_proxy: Proxy,
        spawn: Callable[..., Consumer]) -> None:
    """Postgres goes down (fast shutdown) while a batch's COPY is held at the proxy, i.e. inside the transaction
    (its offset rows locked, its keys claimed), and comes back a few seconds later.

    Expected: the transaction rolls back; the consumer retries with every partition paused (``ingest_paused``
    = 1 while Postgres is down), the process keeps running and resumes by itself when Postgres is back; the
    restart is never a dead letter; nothing lost or stored twice."""
    await publish_both(config, published, seed=11)
    hold = pg_proxy.on(b'COPY "webhook_events"', HOLD, skip=3)
    consumer = spawn({**env, **CASE_ENV})
    await wait_event(hold.fired, 60, "the 4th webhook COPY", consumers=[consumer])
    await wait_until(in_transaction(pg, db_url), 10, "the held COPY's session to show idle in transaction",
                     consumers=[consumer])
    await asyncio.to_thread(pg.stop, "fast")
    hold.release()  # the held COPY now meets a closed server connection
    await wait_until(consumer.reached("ingest_paused", 1, stream="webhook", reason="postgres"), 30,
                     "the webhook stream to pause", consumers=[consumer])
    retries = await consumer.ametric("ingest_retries_total", component="postgres")
    await wait_until(consumer.reached("ingest_retries_total", retries + 2, component="postgres"), 30,
                     "more retries while Postgres is down", consumers=[consumer])
    await asyncio.to_thread(pg.start)
    waited = await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    print(f"\nrestart mid-transaction: {await consumer.ametric('ingest_retries_total')} retries, caught up "
          f"{waited:.1f} s after the start")
    await wait_until(consumer.at_most("ingest_paused", 0), 15, "the pause to end", consumers=[consumer])
    assert consumer.alive()
    assert await consumer.aterminate() == 0
    print(await check_invariants(db_url, config, published))


async def test_postgres_restart_mid_commit(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg: PgCluster, pg_proxy: Proxy,
        spawn: Callable[..., Consumer]) -> None:
    """A webhook batch's COMMIT is held at the proxy while Postgres is restarted in immediate mode (a crash: the
    server recovers from WAL), then released into the dead connection. One stream only, so that no other
    transaction is in flight when the server dies (another stream's COMMIT could be acknowledged-but-lost).

    Expected: the COMMIT never reached the server, so the batch rolled back; the consumer retries it and the CAS
    on the offsets succeeds (no fence: nothing moved them); nothing lost or stored twice."""
    await publish_mix(config, published, "webhook", 3000, tenants=6, dup_rate=0.1, invalid=8, seed=21)
    hold = pg_proxy.on(pg_query("COMMIT;"), HOLD, skip=4)
    consumer = spawn({**env, **CASE_ENV}, "webhook")
    await wait_event(hold.fired, 60, "the 5th COMMIT", consumers=[consumer])
    await wait_until(in_transaction(pg, db_url), 10, "the held COMMIT's transaction to show as still open",
                     consumers=[consumer])
    await asyncio.to_thread(pg.restart, "immediate")
    hold.release()
    await wait_until(consumer.reached("ingest_retries_total", 1, component="postgres"), 30,
                     "a retry after the restart", consumers=[consumer])
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    print(f"\nrestart mid-commit: {await consumer.ametric('ingest_retries_total')} retries, "
          f"{await consumer.ametric('ingest_fenced_batches_total')} fenced")
    assert await consumer.ametric("ingest_fenced_batches_total") == 0, "a rolled-back batch must not be fenced"
    await wait_until(consumer.at_most("ingest_paused", 0), 15, "the pause to end", consumers=[consumer])
    assert await consumer.aterminate() == 0
    print(await check_invariants(db_url, config, published))


@pytest.mark.parametrize("action", [CUT_BEFORE, CUT_AFTER])
async def test_connection_cut_during_commit(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg_proxy: Proxy,
        spawn: Callable[..., Consumer], action: str) -> None:
    """The consumer's Postgres connection is cut (RST) at a batch's COMMIT: before it reaches the server
    (``cut_before``: the server rolls back) or after the server committed, dropping its answer (``cut_after``:
    committed, but the client only sees a dead connection — the ambiguous case).

    Expected: the batch is retried. After ``cut_before`` the retry's CAS succeeds (no fence); after ``cut_after``
    the retry is fenced by the CAS on the offsets (they already moved), the partitions are re-positioned from
    Postgres and re-read from there. Either way the pause ends and nothing is lost or stored twice."""
    seed = 31 if action == CUT_BEFORE else 41
    # The consumer first drains a small backlog, so it has joined, positioned and committed on both streams
    # before the trigger is armed: the cut lands on a batch of the second backlog, never inside start-up.
    await publish_mix(config, published, "webhook", 200, tenants=6, seed=seed + 100)
    await publish_mix(config, published, "audit", 100, tenants=6, seed=seed + 101)
    consumer = spawn({**env, **CASE_ENV, "INGEST_LOG_LEVEL": "INFO"})  # INFO: how each retry ended
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=60)
    # Every partition must hold a position before the trigger counts COMMITs: a partition positioned later (one
    # the first backlog left empty, assigned late) commits its first position in a transaction of its own, and a
    # cut of that COMMIT would fail no batch.
    await wait_positioned(db_url, config, ["webhook", "audit"], consumers=[consumer])
    cut = pg_proxy.on(pg_query("COMMIT;"), action, skip=1)
    await publish_both(config, published, seed=seed)
    await wait_event(cut.done, 60, f"{action} at the 2nd COMMIT of the second backlog", consumers=[consumer])
    await wait_until(consumer.reached("ingest_retries_total", 1, component="postgres"), 30, "a retry",
                     consumers=[consumer])
    if action == CUT_AFTER:
        await wait_until(consumer.reached("ingest_fenced_batches_total", 1), 30,
                         "the retry of the batch that did commit to be fenced", consumers=[consumer])
        ended = [line for line in consumer.log(tail=10**7).splitlines() if '"retried write ended"' in line]
        assert ended and all('"outcome": "fenced"' in line for line in ended), ended
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    await wait_until(consumer.at_most("ingest_paused", 0), 15, "the pause to end", consumers=[consumer])
    retries = await consumer.ametric("ingest_retries_total", component="postgres")
    fenced = await consumer.ametric("ingest_fenced_batches_total")
    print(f"\n{action}: {retries} retries, {fenced} fenced")
    if action == CUT_BEFORE:  # caught up: the rolled-back batch's retry has committed
        assert fenced == 0, "a batch that never committed must not be fenced"
    assert await consumer.aterminate() == 0
    print(await check_invariants(db_url, config, published))


async def move_event_partitions(db_url: str, tablespace: str) -> int:
    """Move every partition of the event tables to ``tablespace``; return how many."""
    conn = await asyncpg.connect(db_url)
    try:
        parts = await conn.fetch(
            "SELECT i.inhrelid::regclass::text FROM pg_inherits i "
            "WHERE i.inhparent IN ('webhook_events'::regclass, 'audit_events'::regclass)")
        for (name,) in parts:
            await conn.execute(f"ALTER TABLE {name} SET TABLESPACE {tablespace}")
        return len(parts)
    finally:
        await conn.close()


async def test_disk_full_is_transient(
        config: Config, env: dict[str, str], db_url: str, published: Published,
        tablespace: Callable[[str], Awaitable[Tablespace]], spawn: Callable[..., Consumer]) -> None:
    """The event partitions live on a 512 KiB tmpfs tablespace that fills up mid-stream, so COPY fails with
    SQLSTATE 53100 (disk_full); then the filesystem is grown to 64 MiB.

    Expected: disk full is transient: the batch is retried with every partition paused (``ingest_paused``
    = 1, retries counted), never dead-lettered, the process keeps running; once space returns the consumer
    resumes by itself and everything lands exactly once."""
    space = await tablespace("512k")
    assert await move_event_partitions(db_url, space.name) > 0
    await publish_both(config, published, seed=51)
    consumer = spawn({**env, **CASE_ENV})

    async def disk_full_seen() -> bool:
        return "DiskFullError" in consumer.log(tail=1_000_000)

    await wait_until(disk_full_seen, 60, "a disk-full error (53100)", consumers=[consumer])
    await wait_until(consumer.reached("ingest_paused", 1, reason="postgres"), 30, "a pause", consumers=[consumer])
    retries = await consumer.ametric("ingest_retries_total", component="postgres")
    await wait_until(consumer.reached("ingest_retries_total", retries + 2, component="postgres"), 30,
                     "more retries while the disk is full", consumers=[consumer])
    stalled = await progress(db_url, config)
    assert stalled is not None and sum(stalled.values()) < sum(published.records.values()), \
        "the disk should fill up before the end of the stream"
    conn = await asyncpg.connect(db_url)
    try:
        refused = await conn.fetchval("SELECT count(*) FROM dead_letters WHERE reason = 'db_rejected'")
    finally:
        await conn.close()
    assert refused == 0, "disk full must never dead-letter a record"
    status, body = await asyncio.to_thread(consumer.http, "/readyz")
    print(f"\ndisk full: progress {stalled} of {dict(published.records)}, readyz {status} {body[:200]}")

    space.fs.resize("64m")
    waited = await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    print(f"disk full: caught up {waited:.1f} s after space returned")
    await wait_until(consumer.at_most("ingest_paused", 0), 15, "the pause to end", consumers=[consumer])
    assert await consumer.aterminate() == 0
    print(await check_invariants(db_url, config, published))


async def lock_waits(db_url: str) -> int:
    """Sessions of the test database waiting for a lock."""
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"))
    finally:
        await conn.close()


@pytest.mark.parametrize("held_at", ["copy", "begin"])
async def test_slow_write_beyond_max_poll_interval(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg: PgCluster,
        proxies: Callable[..., Proxy], spawn: Callable[..., Consumer], held_at: str) -> None:
    """Two webhook consumers, A and B, share the group (max poll interval 3 s). A's write of a webhook batch is held at
    A's own Postgres proxy far beyond the max poll interval: at its COPY (``copy``: inside the transaction, after
    A's CAS moved and locked the offset rows) or at its BEGIN (``begin``: before its CAS).

    Expected: A is removed from the group and B takes over every partition from the offsets in Postgres.
    ``copy``: B's positioning waits for A's row locks (an uncommitted offset is never read); released, A's late
    write lands first and B continues from A's committed offsets. ``begin``: B writes A's partitions to their
    end; released, A's late write is fenced by the CAS. Never both; the stream continues and ends exactly once."""
    # One stream, so that every BEGIN and COPY A sends is a webhook batch's.
    await publish_mix(config, published, "webhook", 3000, tenants=6, dup_rate=0.1, invalid=8,
                      seed=61 if held_at == "copy" else 71)
    a_proxy = proxies(("127.0.0.1", pg.port), "postgres-a")
    pattern = b'COPY "webhook_events"' if held_at == "copy" else pg_query("BEGIN;")
    hold = a_proxy.on(pattern, HOLD, skip=2, hold_timeout=90)
    group_env = {**env, **CASE_ENV, "INGEST_MAX_POLL_INTERVAL_MS": "3000", "INGEST_SESSION_TIMEOUT_MS": "3000"}
    a_url = env["INGEST_DATABASE_URL"].replace(env["INGEST_DATABASE_URL"].split("@")[1].split("/")[0],
                                               a_proxy.address)
    a = spawn({**group_env, "INGEST_DATABASE_URL": a_url, "INGEST_LOG_LEVEL": "INFO"}, "webhook", name="a")
    b = spawn(group_env, "webhook", name="b")
    both = [a, b]
    t0 = time.monotonic()
    await wait_event(hold.fired, 60, f"A's write held at {held_at}", consumers=both)
    t1 = time.monotonic()
    a_log_at_hold = len(a.log(tail=10**9))
    a_rebalances = await a.ametric("ingest_rebalances_total")
    await wait_until(b.reached("ingest_partitions_assigned", 4, stream="webhook"), 60,
                     "B to own every webhook partition", consumers=both)
    t2 = time.monotonic()
    a_batches = await a.ametric("ingest_batches_total", stream="webhook")
    if held_at == "copy":
        async def blocked() -> bool:
            return await lock_waits(db_url) > 0
        await wait_until(blocked, 30, "B to wait for A's locked offset rows", consumers=both)

        async def a_revoked() -> bool:  # A's on_revoked gave up waiting for the held write (10 s) and forgot
            since_hold = a.log(tail=10**9)[a_log_at_hold:]
            return re.search(r'"partitions revoked".*"partitions": \[\d', since_hold) is not None
        await wait_until(a_revoked, 30, "A's revocation to stop waiting for its write", consumers=both)
        hold.release()
        await wait_until(a.reached("ingest_batches_total", a_batches + 1, stream="webhook"), 30,
                         "A's held batch to commit", consumers=both)
        assert await a.ametric("ingest_fenced_batches_total", stream="webhook") == 0, "A's late write landed"
        await wait_until(a.reached("ingest_rebalances_total", a_rebalances + 1), 60, "A to rejoin", consumers=both)
        assert await a.ametric("ingest_retries_total") == 0, f"A's late write must not fail\n{a.log()}"
    else:
        async def webhook_done() -> bool:
            p = await progress(db_url, config)
            return p is not None and p["webhook"] >= published.records["webhook"]
        await wait_until(webhook_done, 60, "B to write every webhook partition to its end", consumers=both)
        hold.release()
        await wait_until(a.reached("ingest_fenced_batches_total", 1, stream="webhook"), 30,
                         "A's late write to be fenced", consumers=both)
    t3 = time.monotonic()
    await wait_caught_up(db_url, config, published, consumers=both, timeout=90)
    print(f"\nheld at {held_at}: held after {t1 - t0:.1f} s, B took over {t2 - t1:.1f} s later, released after "
          f"{t3 - t1:.1f} s, caught up {time.monotonic() - t3:.1f} s later; A fenced {await a.ametric('ingest_fenced_batches_total')}, "
          f"B fenced {await b.ametric('ingest_fenced_batches_total')}; proxy A: {a_proxy.events}")
    assert await a.aterminate() == 0
    assert await b.aterminate() == 0
    print(await check_invariants(db_url, config, published))
