"""The batch transaction against a real Postgres: fencing, poison rows, dedupe window, quota hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from consumers import streams
from consumers.cli import sample
from consumers.settings import from_env
from ingest import ledger, offsets
from ingest.config import Config
from ingest.pipeline import prepare
from ingest.rows import SimpleRecord
from ingest.services import create_pool
from ingest.writer import Writer
from tests.integration.helpers import expire_ledger

STREAM = streams.WEBHOOK


Rec = SimpleRecord


class CountingQuota:
    def __init__(self, deny: set[str] | None = None) -> None:
        self.calls = 0
        self.deny = deny or set()

    async def admit(self, tenants: Sequence[str], keys: Sequence[tuple[str, str]] | None = None) -> list[bool]:
        self.calls += 1
        return [t not in self.deny for t in tenants]

    async def settle(self, keys: Sequence[tuple[str, str]]) -> None:
        pass


@pytest.fixture
async def pool(config: Config) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(config.database_url, max_size=2)
    yield p
    await p.close()


def records(config: Config, events: list[bytes | None], partition: int = 0, start: int = 0) -> list[Rec]:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return [Rec(STREAM.topic_for(config), partition, start + i, b"k", v, now_ms) for i, v in enumerate(events)]


def writer(config: Config, quota: CountingQuota | None = None, window: timedelta = timedelta(days=7)) -> Writer:
    return Writer(stream=STREAM.name, group=STREAM.group_for(config), topic=STREAM.topic_for(config),
                  tables=STREAM.tables(), window=window, quota=quota or CountingQuota())


async def write(config: Config, conn: asyncpg.Connection, w: Writer, recs: list[Rec], expected: dict[int, int]):
    prepared = prepare(STREAM.name, recs, STREAM.contract(config), config.decode, datetime.now(UTC))
    return prepared, await w.write(conn, prepared.candidates, prepared.dead_letters, expected, prepared.advance)


def events(n: int, seed: int = 1) -> list[bytes | None]:
    from ingest.publisher import encode
    defaults = from_env({})
    contract = STREAM.contract(defaults)
    return [encode(e, contract, defaults.decode)[1] for e in sample.generate("webhook", n, dup_rate=0, seed=seed)]


async def test_stale_owner_is_fenced(config: Config, pool: asyncpg.Pool) -> None:
    group, topic = STREAM.group_for(config), STREAM.topic_for(config)
    async with pool.acquire() as conn:
        start = await offsets.load(conn, "consumer_offsets", group, topic, [0])
        assert start == {0: offsets.UNSET}
        batch = events(10)
        # Owner B took over and committed the first 5 records.
        await write(config, conn, writer(config), records(config, batch[:5]), start)
        # Stale owner A still believes the partition is at UNSET and tries to commit all 10.
        with pytest.raises(offsets.Fenced):
            await write(config, conn, writer(config), records(config, batch), start)
        assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 5
        assert await conn.fetchval("SELECT next_offset FROM consumer_offsets WHERE partition = 0") == 5


async def test_postgres_refused_row_is_isolated_rest_copied(config: Config, pool: asyncpg.Pool) -> None:
    batch = events(40)
    async with pool.acquire() as conn:
        # A constraint the validator knows nothing about: Postgres itself refuses one row.
        await conn.execute("ALTER TABLE webhook_events ADD CONSTRAINT no_refunds CHECK (event_type <> 'refunds/create')")
        expected = await offsets.load(conn, "consumer_offsets", STREAM.group_for(config), STREAM.topic_for(config), [0])
        quota = CountingQuota()
        prepared, result = await write(config, conn, writer(config, quota), records(config, batch), expected)
        assert quota.calls == 1, "the careful replay must reuse the first attempt's quota verdicts"
        bad = [c for c in prepared.candidates if c.row[2] == "refunds/create"]
        assert bad, "sample should contain refunds/create events"
        assert len(result.refused) == len(bad)
        assert result.splits >= 1
        assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 40 - len(bad)
        reasons = await conn.fetch("SELECT reason, raw, source_offset FROM dead_letters")
        assert {r["reason"] for r in reasons} == {"db_rejected"}
        assert sorted(r["source_offset"] for r in reasons) == sorted(c.row[-1] for c in bad)
        assert {bytes(r["raw"]) for r in reasons} == {batch[c.row[-1]] for c in bad}
        # Refused keys are not left in the ledger: once fixed, a replay can be stored.
        assert await conn.fetchval("SELECT count(*) FROM dedupe_ledger") == 40 - len(bad)
        assert await conn.fetchval("SELECT next_offset FROM consumer_offsets WHERE partition = 0") == 40


async def test_dedupe_window_and_quota_hook(config: Config, pool: asyncpg.Pool) -> None:
    batch = events(20)
    quota = CountingQuota(deny={"org-0003"})
    async with pool.acquire() as conn:
        exp = await offsets.load(conn, "consumer_offsets", STREAM.group_for(config), STREAM.topic_for(config), [0])
        prepared, result = await write(config, conn, writer(config, quota), records(config, batch), exp)
        assert quota.calls == 1  # one call per batch, whatever the number of tenants
        denied = [c for c in prepared.candidates if c.key[0] == "org-0003"]
        assert len(result.over_quota) == len(denied)
        assert await conn.fetchval("SELECT count(*) FROM dead_letters WHERE reason = 'quota_exceeded'") == len(denied)
        # Over-quota events are not claimed: re-sent, they are judged again, not treated as duplicates.
        assert await ledger.holds(conn, "dedupe_ledger", "webhook", [c.key for c in denied]) == set()

        # The same events again: duplicates within the window ...
        _, again = await write(config, conn, writer(config), records(config, batch, start=20), {0: 20})
        assert len(again.stored) == len(denied) and len(again.duplicates) == 20 - len(denied)
        # ... but new again once the window has passed.
        await expire_ledger(conn, "dedupe_ledger", days=8)
        _, late = await write(config, conn, writer(config), records(config, batch, start=40), {0: 40})
        assert len(late.stored) == 20


class StallingQuota:
    """Answers only after ``seconds``: the batch transaction sits idle in the meantime (a hung process)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def admit(self, tenants: Sequence[str], keys: Sequence[tuple[str, str]] | None = None) -> list[bool]:
        await asyncio.sleep(self.seconds)
        return [True] * len(tenants)

    async def settle(self, keys: Sequence[tuple[str, str]]) -> None:
        pass


async def test_an_idle_batch_transaction_is_ended_by_the_server_and_frees_its_offset_rows(
        config: Config, pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    group, topic = STREAM.group_for(config), STREAM.topic_for(config)
    hung = Writer(stream=STREAM.name, group=group, topic=topic, tables=STREAM.tables(), window=timedelta(days=7),
                  quota=StallingQuota(3.0), idle_timeout_ms=500)
    async with pool.acquire() as conn:
        start = await offsets.load(conn, "consumer_offsets", group, topic, [0])
        task = asyncio.create_task(write(config, conn, hung, records(config, events(5)), start))
        await asyncio.sleep(1.5)  # the fence locked the offset row, then the transaction went idle
        # The server ended it: the next owner gets the row at once, unchanged.
        async with db.transaction():
            row = await db.fetchval("SELECT next_offset FROM consumer_offsets WHERE partition = 0 FOR UPDATE NOWAIT")
        assert row == offsets.UNSET
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await task
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 0


async def test_batch_transactions_carry_the_idle_timeout(config: Config, pool: asyncpg.Pool) -> None:
    seen: list[str] = []

    class Probe:
        async def admit(self, tenants: Sequence[str], keys: Sequence[tuple[str, str]] | None = None) -> list[bool]:
            seen.append(await conn.fetchval("SHOW idle_in_transaction_session_timeout"))  # inside the transaction
            return [True] * len(tenants)

        async def settle(self, keys: Sequence[tuple[str, str]]) -> None:
            pass

    async with pool.acquire() as conn:
        start = await offsets.load(conn, "consumer_offsets", STREAM.group_for(config), STREAM.topic_for(config), [0])
        w = Writer(stream=STREAM.name, group=STREAM.group_for(config), topic=STREAM.topic_for(config),
                   tables=STREAM.tables(), window=timedelta(days=7), quota=Probe())
        await write(config, conn, w, records(config, events(3)), start)
        assert seen == ["1min"]
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "0"  # only inside the batch
