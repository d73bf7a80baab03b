"""The dedupe ledger on a real Postgres: digests, claims across epochs, the epoch switch under concurrency,
expiry by dropping a partition, and the in-place migration from the text ledger."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from consumers import streams
from ingest import ledger, migrate
from ingest.config import Config
from ingest.rows import Key
from ingest.sql import ident
from tests.faults.helpers import wait_until
from tests.integration.conftest import PG_ADMIN

LEDGER = "dedupe_ledger"
EPOCHS = ledger.epochs_table(LEDGER)
WINDOW = timedelta(days=7)


async def claim(conn: asyncpg.Connection, keys: Sequence[Key], stream: str = "webhook") -> set[Key]:
    """A claim in its own transaction, taking the shared epoch lock first as the writer does."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", ledger.EPOCH_LOCK)
        return await ledger.claim(conn, LEDGER, stream, keys, WINDOW)


async def epoch_of(conn: asyncpg.Connection, key: Key, stream: str = "webhook") -> list[int]:
    return [r[0] for r in await conn.fetch(
        f"SELECT epoch FROM {LEDGER} WHERE digest = $1 ORDER BY epoch", digest(stream, *key))]


def digest(stream: str, tenant: str, key: str) -> bytes:
    """The documented digest: the first 16 bytes of SHA-256 over ``len(stream):stream len(tenant):tenant key``."""
    return hashlib.sha256(f"{len(stream)}:{stream}{len(tenant)}:{tenant}{key}".encode()).digest()[:16]


async def add_epoch(conn: asyncpg.Connection, epoch: int, opened_at: datetime | None) -> None:
    await conn.execute(f"CREATE TABLE {ident(ledger.partition_name(LEDGER, epoch))} PARTITION OF {LEDGER} "
                       f"FOR VALUES IN ({epoch})")
    await conn.execute(f"INSERT INTO {EPOCHS} VALUES ($1, $2)", epoch, opened_at)


async def test_keys_are_digests_each_stream_and_tenant_apart_and_unclaim_gives_a_key_back(
        config: Config, db: asyncpg.Connection) -> None:
    keys = [("a:b", "c"), ("a", "b:c"), ("t", "é ☃ \\ '")]  # ':' in tenants cannot make two keys one
    assert await claim(db, keys) == set(keys)
    assert await claim(db, keys) == set()
    assert await claim(db, keys, stream="audit") == set(keys)  # streams are apart
    rows = {bytes(r[0]) for r in await db.fetch(f"SELECT digest FROM {LEDGER}")}
    assert rows == {digest(s, *k) for s in ("webhook", "audit") for k in keys}  # the documented digest
    assert await ledger.holds(db, LEDGER, "webhook", [*keys, ("a", "other")]) == set(keys)
    async with db.transaction():
        await ledger.unclaim(db, LEDGER, "webhook", keys[:1])
    assert await claim(db, keys) == set(keys[:1])


async def test_new_keys_go_into_the_open_epoch_and_every_epoch_inside_the_window_is_probed(
        config: Config, db: asyncpg.Connection) -> None:
    (first,) = [r[0] for r in await db.fetch(f"SELECT epoch FROM {EPOCHS} WHERE opened_at IS NOT NULL")]
    await claim(db, [("t", "old")])
    second = first + 1
    await add_epoch(db, second, None)  # created ahead: not open, nothing goes in
    assert await claim(db, [("t", "k1")]) == {("t", "k1")}
    assert await epoch_of(db, ("t", "k1")) == [first]
    soon = datetime.now(UTC) + timedelta(seconds=5)  # the second epoch starts a second after the first
    assert await ledger.open_due(db, LEDGER, now=soon)
    assert not await ledger.open_due(db, LEDGER, now=soon)
    assert await claim(db, [("t", "old"), ("t", "k2")]) == {("t", "k2")}  # "old" is found in the older epoch
    assert await epoch_of(db, ("t", "k2")) == [second]

    # The window moves: the first epoch was open until 8 days ago, so its keys are past the window; the second,
    # open since then, is still probed.
    await db.execute(f"UPDATE {EPOCHS} SET opened_at = now() - interval '20 days' WHERE epoch = $1", first)
    await db.execute(f"UPDATE {EPOCHS} SET opened_at = now() - interval '8 days' WHERE epoch = $1", second)
    assert await claim(db, [("t", "old"), ("t", "k1"), ("t", "k2")]) == {("t", "old"), ("t", "k1")}
    assert await epoch_of(db, ("t", "old")) == [first, second]


async def test_an_epoch_opens_only_after_every_claim_into_the_old_one_committed(
        config: Config, db: asyncpg.Connection) -> None:
    """A key claimed on both sides of an epoch switch at once is stored once: the switch waits for the
    transaction claiming into the old epoch, and a claim after the switch waits for the switch and then sees the
    old epoch's key. (Without the lock the second claim would insert into the new epoch, unseen, beside it.)"""
    first = await db.fetchval(f"SELECT max(epoch) FROM {EPOCHS} WHERE opened_at IS NOT NULL")
    await add_epoch(db, first + 1, None)
    key = [("t", "raced")]
    old = await asyncpg.connect(config.database_url)
    switch = await asyncpg.connect(config.database_url)
    new = await asyncpg.connect(config.database_url)
    try:
        tx = old.transaction()
        await tx.start()
        await old.execute("SELECT pg_advisory_xact_lock_shared($1)", ledger.EPOCH_LOCK)
        assert await ledger.claim(old, LEDGER, "webhook", key, WINDOW) == set(key)  # not committed yet
        soon = datetime.now(UTC) + timedelta(seconds=5)
        opening = asyncio.create_task(ledger.open_due(switch, LEDGER, now=soon))

        def waiting(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await db.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == n
            return check

        await wait_until(waiting(1), 10, "the switch waiting on the epoch lock")
        second = asyncio.create_task(claim(new, key))  # after the switch was asked for
        await wait_until(waiting(2), 10, "the second claim waiting behind the switch")
        assert not opening.done() and not second.done()
        await tx.commit()
        assert await asyncio.wait_for(opening, 10)
        assert await asyncio.wait_for(second, 10) == set()
        assert await epoch_of(db, key[0]) == [first]
    finally:
        for c in (old, switch, new):
            await c.close()


async def test_roll_creates_ahead_opens_what_is_due_and_drops_epochs_past_the_window(
        config: Config, db: asyncpg.Connection) -> None:
    epochs = config.dedupe.epochs
    length = ledger.epoch_length(WINDOW, epochs)
    now = datetime.now(UTC)
    listed = lambda: db.fetch(f"SELECT epoch, opened_at IS NOT NULL FROM {EPOCHS} ORDER BY epoch")  # noqa: E731
    (first, _), (ahead, opened) = await listed()  # migrate made one open epoch and one ahead
    assert ahead == int(now.timestamp()) // length * length + length and not opened
    await claim(db, [("t", "a")])

    later = now + timedelta(seconds=length)  # the epoch ahead is due
    done = await ledger.roll(db, LEDGER, window=WINDOW, epochs=epochs, now=later, lock_timeout_ms=2000)
    assert done.opened and done.dropped == []
    assert done.created == [ledger.partition_name(LEDGER, ahead + length)]
    assert [tuple(r) for r in await listed()] == [(first, True), (ahead, True), (ahead + length, False)]
    assert await claim(db, [("t", "a"), ("t", "b")]) == {("t", "b")}
    assert await epoch_of(db, ("t", "b")) == [ahead]

    # Eight days on (opened_at moved back instead of the clock forward), the first epoch ended more than a window
    # ago: a dry run names it, a roll drops the partition (no row deleted) and its key counts as new.
    await db.execute(f"UPDATE {EPOCHS} SET opened_at = opened_at - interval '8 days' WHERE opened_at IS NOT NULL")
    await db.execute(f"ANALYZE {LEDGER}")
    plan = await ledger.roll(db, LEDGER, window=WINDOW, epochs=epochs, now=later, lock_timeout_ms=2000, dry_run=True)
    assert plan.dropped == [ledger.partition_name(LEDGER, first)] and plan.keys_dropped == 1
    assert await db.fetchval("SELECT to_regclass($1)", ledger.partition_name(LEDGER, first)) is not None
    done = await ledger.roll(db, LEDGER, window=WINDOW, epochs=epochs, now=later, lock_timeout_ms=2000)
    assert done.dropped == plan.dropped and done.keys_dropped == 1
    assert await db.fetchval("SELECT to_regclass($1)", ledger.partition_name(LEDGER, first)) is None
    assert [r[0] for r in await listed()] == [ahead, ahead + length]
    assert await claim(db, [("t", "a"), ("t", "b")]) == {("t", "a")}


async def test_the_text_ledger_is_migrated_in_place() -> None:
    """Upgrading keeps every remembered key: the old rows become digests in one first epoch that starts at the
    oldest key, and the text table is gone."""
    name = f"ingest_ledger_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
    try:
        before = [m for m in streams.migrations() if m[0] < 6]
        await migrate.apply(conn, before)
        oldest = datetime(2026, 11, 20, 8, 30, 15, tzinfo=UTC)
        await conn.executemany("INSERT INTO dedupe_keys VALUES ($1, $2, $3, $4)", [
            ("webhook", "t:1", "k", oldest), ("audit", "t", "1:k", oldest + timedelta(days=3))])
        assert await migrate.apply(conn, streams.migrations()) == [m[0] for m in streams.migrations() if m[0] >= 6]
        assert await conn.fetchval("SELECT to_regclass('dedupe_keys')") is None
        epoch = int(oldest.timestamp())
        assert await conn.fetchval(f"SELECT epoch FROM {EPOCHS} WHERE opened_at IS NOT NULL") == epoch
        assert await conn.fetchval("SELECT to_regclass($1)", ledger.partition_name(LEDGER, epoch)) is not None
        assert {bytes(r[0]) for r in await conn.fetch(f"SELECT digest FROM {LEDGER}")} == {
            digest("webhook", "t:1", "k"), digest("audit", "t", "1:k")}
        assert await claim(conn, [("t:1", "k"), ("t", "1:k")]) == {("t", "1:k")}  # webhook's key is remembered
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_epoch_length_cuts_the_window(epochs: int) -> None:
    assert ledger.epoch_length(WINDOW, epochs) * epochs == int(WINDOW.total_seconds())


async def test_a_roll_that_cannot_open_an_epoch_in_time_still_creates_and_leaves_opening_to_later(
        config: Config, db: asyncpg.Connection) -> None:
    epochs = config.dedupe.epochs
    length = ledger.epoch_length(WINDOW, epochs)
    later = datetime.now(UTC) + timedelta(seconds=length)
    busy = await asyncpg.connect(config.database_url)
    try:
        async with busy.transaction():  # a batch transaction that holds the shared epoch lock for a while
            await busy.execute("SELECT pg_advisory_xact_lock_shared($1)", ledger.EPOCH_LOCK)
            done = await ledger.roll(db, LEDGER, window=WINDOW, epochs=epochs, now=later, lock_timeout_ms=200)
            assert not done.opened and len(done.created) == 1
        assert await ledger.open_due(db, LEDGER, now=later)
    finally:
        await busy.close()
