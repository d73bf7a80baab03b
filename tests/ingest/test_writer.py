"""ingest.writer without services: the order of one batch transaction (fence, dedupe claim, quota for fresh keys
only, over-quota keys unclaimed, rows COPYed, dead letters COPYed) and the bisection that isolates the rows
Postgres refuses, against a fake connection that records SQL and answers like a small database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ingest import ledger, offsets
from ingest.dedupe import Key
from ingest.reject import Reason
from ingest.rows import DEAD_LETTER_COLUMNS, Candidate, DeadLetter, SimpleRecord
from ingest.writer import StreamTables, Writer, WriteResult
from tests.fakes import Call, FakeConn

TOPIC = "events.webhook"
KAFKA_TIME = datetime(2026, 1, 1, tzinfo=UTC)
TABLES = StreamTables(events="events_webhook", columns=("tenant_id", "idempotency_key", "payload"),
                      dead_letters="dead_letters", ledger="dedupe_ledger", offsets="consumer_offsets",
                      offset_changes="offset_changes")
BAD = asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence")


@dataclass
class Db:
    """What the fake database answers: partitions another owner moved, keys already in the ledger, rows the
    events table refuses (with ``refusal``), and an error for every events COPY (``copy_error``)."""

    fenced: set[int] = field(default_factory=set)
    seen: set[Key] = field(default_factory=set)
    bad_rows: set[tuple[Any, ...]] = field(default_factory=set)
    refusal: asyncpg.PostgresError = BAD
    copy_error: BaseException | None = None

    def answer(self, call: Call) -> Any:
        sql = call.sql
        if call.method == "fetchval" and "opened_at IS NULL" in sql:
            return 0  # no ledger epoch due to open
        if call.method == "fetch" and 'UPDATE "consumer_offsets"' in sql:
            return [(p,) for p in call.args[2] if p not in self.fenced]
        if call.method == "fetch" and 'INSERT INTO "dedupe_ledger"' in sql:
            return [(t, k) for t, k in zip(call.args[1], call.args[2], strict=True) if (t, k) not in self.seen]
        if call.method == "copy_records_to_table" and sql == TABLES.events:
            if self.copy_error is not None:
                raise self.copy_error
            if any(row in self.bad_rows for row in call.args[0]):
                raise self.refusal
        return "OK"


class FakeQuota:
    """Refuses the tenants in ``over``; each call is logged into the connection's calls, to check its place."""

    def __init__(self, log: list[Call], over: Sequence[str] = ()) -> None:
        self.log, self.over = log, set(over)
        self.asked: list[list[str]] = []

        self.settled: list[list[tuple[str, str]]] = []

    async def admit(self, tenants: Sequence[str], keys: Sequence[tuple[str, str]] | None = None) -> list[bool]:
        self.asked.append(list(tenants))
        self.log.append(Call("quota", "", tuple(tenants)))
        return [t not in self.over for t in tenants]

    async def settle(self, keys: Sequence[tuple[str, str]]) -> None:
        self.settled.append(list(keys))


def label(call: Call) -> str:
    """A short name for each step of the batch transaction."""
    if call.method in ("begin", "commit", "rollback", "quota"):
        return call.method
    if "idle_in_transaction_session_timeout" in call.sql:
        return "idle timeout"
    if 'UPDATE "consumer_offsets"' in call.sql:
        return "fence"
    if 'INSERT INTO "dedupe_ledger"' in call.sql:
        return "claim"
    if 'DELETE FROM "dedupe_ledger"' in call.sql:
        return "unclaim"
    if call.method == "copy_records_to_table":
        return f"copy {call.sql}"
    return call.sql


def candidate(tenant: str, key: str, offset: int = 0) -> Candidate:
    raw = f'{{"tenant_id":"{tenant}","idempotency_key":"{key}"}}'.encode()
    return Candidate(key=(tenant, key), row=(tenant, key, raw.decode()),
                     record=SimpleRecord(TOPIC, 0, offset, None, raw, 0), kafka_time=KAFKA_TIME)


def invalid(offset: int) -> DeadLetter:
    return DeadLetter("webhook", str(Reason.NOT_JSON), "not JSON", b"{", None, None, TOPIC, 0, offset, None,
                      KAFKA_TIME)


def setup(db: Db, over: Sequence[str] = (), **kw: Any) -> tuple[Writer, FakeConn, FakeQuota]:
    conn = FakeConn(db.answer)
    quota = FakeQuota(conn.calls, over)
    writer = Writer(stream="webhook", group="g", topic=TOPIC, tables=TABLES, window=timedelta(days=1),
                    quota=quota, **kw)
    return writer, conn, quota


async def write(writer: Writer, conn: FakeConn, candidates: Sequence[Candidate],
                dead_letters: Sequence[tuple[Any, ...]] = (), expected: dict[int, int] | None = None,
                advance: dict[int, int] | None = None) -> WriteResult:
    return await writer.write(conn, candidates, dead_letters, expected or {0: 10},  # type: ignore[arg-type]
                              advance or {0: 20})


def copied(conn: FakeConn, table: str) -> list[tuple[Any, ...]]:
    """Rows COPYed into ``table`` by statements that were committed."""
    return [row for c in conn.committed if c.method == "copy_records_to_table" and c.sql == table
            for row in c.args[0]]


def unclaimed(conn: FakeConn) -> list[Key]:
    return [k for c in conn.committed if label(c) == "unclaim" for k in zip(c.args[1], c.args[2], strict=True)]


# -- one transaction, in order ----------------------------------------------------------------------------------
async def test_one_transaction_fence_first_then_claim_quota_unclaim_rows_dead_letters() -> None:
    fresh, dup, over = candidate("a", "1", 11), candidate("b", "1", 12), candidate("c", "1", 13)
    writer, conn, _ = setup(Db(seen={dup.key}), over=["c"])
    await write(writer, conn, [fresh, dup, over], [invalid(10)])
    assert [label(c) for c in conn.calls] == [
        "begin", "idle timeout", "fence", "claim", "quota", "unclaim",
        "copy events_webhook", "copy dead_letters", "commit"]


async def test_fence_moves_every_partition_from_expected_to_advance() -> None:
    writer, conn, _ = setup(Db())
    await write(writer, conn, [candidate("a", "1")], expected={1: 7, 0: 10}, advance={1: 9, 0: 20})
    fence = next(c for c in conn.calls if label(c) == "fence")
    assert fence.args == ("g", TOPIC, [0, 1], [10, 7], [20, 9])


async def test_idle_transaction_timeout_and_the_shared_epoch_lock_open_the_transaction() -> None:
    writer, conn, _ = setup(Db(), idle_timeout_ms=1234)
    await write(writer, conn, [candidate("a", "1")])
    first = conn.calls[1]
    assert label(first) == "idle timeout" and first.args == ("1234", ledger.EPOCH_LOCK)
    assert "true)" in first.sql.replace(" ", "")  # is_local: ends with the transaction
    assert "pg_advisory_xact_lock_shared($2)" in first.sql  # before the claim reads the open epoch


async def test_fenced_batch_rolls_back_before_claiming_anything() -> None:
    writer, conn, quota = setup(Db(fenced={1}))
    with pytest.raises(offsets.Fenced) as fenced:
        await write(writer, conn, [candidate("a", "1")], [invalid(3)], expected={0: 10, 1: 20},
                    advance={0: 15, 1: 25})
    assert fenced.value.partitions == (1,)
    assert [label(c) for c in conn.calls] == ["begin", "idle timeout", "fence", "rollback"]
    assert conn.committed == [] and quota.asked == []


# -- dedupe and quota -------------------------------------------------------------------------------------------
async def test_claim_covers_every_candidate_and_duplicates_are_not_copied() -> None:
    a, b, c = candidate("a", "1"), candidate("a", "2"), candidate("b", "1")
    writer, conn, _ = setup(Db(seen={b.key}))
    result = await write(writer, conn, [a, b, c])
    claim = next(x for x in conn.calls if label(x) == "claim")
    assert claim.args == ("webhook", ["a", "a", "b"], ["1", "2", "1"], timedelta(days=1))
    assert result.duplicates == [b] and result.stored == [a, c]
    assert copied(conn, TABLES.events) == [a.row, c.row]


async def test_quota_is_asked_once_and_only_for_fresh_keys() -> None:
    a, b, c = candidate("a", "1"), candidate("b", "1"), candidate("a", "2")
    writer, conn, quota = setup(Db(seen={b.key}))
    await write(writer, conn, [a, b, c])
    assert quota.asked == [["a", "a"]]


async def test_a_batch_of_duplicates_asks_no_quota_copies_no_rows_and_still_advances() -> None:
    a, b = candidate("a", "1"), candidate("b", "1")
    writer, conn, quota = setup(Db(seen={a.key, b.key}))
    result = await write(writer, conn, [a, b])
    assert quota.asked == []
    assert [label(c) for c in conn.committed] == ["idle timeout", "fence", "claim"]
    assert result.duplicates == [a, b] and result.stored == []


async def test_over_quota_keys_are_unclaimed_and_dead_lettered_with_their_source() -> None:
    a, c1, c2 = candidate("a", "1", 5), candidate("c", "1", 6), candidate("c", "2", 7)
    writer, conn, _ = setup(Db(), over=["c"])
    result = await write(writer, conn, [a, c1, c2])
    assert result.over_quota == [c1, c2] and result.stored == [a]
    assert unclaimed(conn) == [c1.key, c2.key]
    assert copied(conn, TABLES.events) == [a.row]
    letters = copied(conn, TABLES.dead_letters)
    assert [(d[1], d[3], d[8]) for d in letters] == [("quota_exceeded", c1.record.value, 6),
                                                      ("quota_exceeded", c2.record.value, 7)]


async def test_dead_letters_are_copied_in_the_same_transaction_with_their_columns() -> None:
    writer, conn, _ = setup(Db())
    await write(writer, conn, [], [invalid(3), invalid(4)])
    copy = next(c for c in conn.calls if label(c) == "copy dead_letters")
    assert copy.args == ([invalid(3), invalid(4)], DEAD_LETTER_COLUMNS)
    assert [label(c) for c in conn.calls] == ["begin", "idle timeout", "fence", "copy dead_letters", "commit"]


def test_with_reason_replaces_reason_and_detail_only() -> None:
    letter = candidate("a", "1", 9).dead_letter("webhook", "unset", "")
    out = letter.with_reason(Reason.DB_REJECTED, "refused")
    assert out == (letter[0], "db_rejected", "refused", *letter[3:])


# -- Postgres refuses rows --------------------------------------------------------------------------------------
ROWS = [candidate("t", str(i), i) for i in range(8)]


@pytest.mark.parametrize("bad", [{0}, {7}, {3}, {2, 5}, {4, 5, 6}, set(range(8))],
                         ids=["first", "last", "middle", "two", "three-adjacent", "all"])
async def test_bisection_stores_every_good_row_once_and_dead_letters_exactly_the_bad_ones(bad: set[int]) -> None:
    writer, conn, quota = setup(Db(bad_rows={ROWS[i].row for i in bad}))
    result = await write(writer, conn, ROWS, [invalid(99)])

    good = [c for i, c in enumerate(ROWS) if i not in bad]
    assert sorted(copied(conn, TABLES.events)) == sorted(c.row for c in good)  # committed, each once
    assert sorted(c.row for c in result.stored) == sorted(c.row for c in good)
    assert sorted(r[8] for r in result.refused) == sorted(bad)
    assert all(r[1] == "db_rejected" and r[2].startswith("Postgres refused the row: 22P05") for r in result.refused)
    assert sorted(unclaimed(conn)) == sorted(ROWS[i].key for i in bad)
    assert sorted(copied(conn, TABLES.dead_letters)) == sorted([invalid(99), *result.refused])
    assert quota.asked == [["t"] * 8]  # the careful replay reuses the verdicts
    assert [label(c) for c in conn.committed].count("fence") == 1
    assert result.splits >= 1


async def test_refused_rows_and_over_quota_rows_are_dead_lettered_once_each() -> None:
    a, b, over = candidate("a", "1", 1), candidate("a", "2", 2), candidate("c", "1", 3)
    writer, conn, _ = setup(Db(bad_rows={b.row}), over=["c"])
    result = await write(writer, conn, [a, b, over])
    assert result.stored == [a] and result.over_quota == [over] and len(result.refused) == 1
    assert sorted((d[1], d[8]) for d in copied(conn, TABLES.dead_letters)) == [
        ("db_rejected", 2), ("quota_exceeded", 3)]
    assert sorted(unclaimed(conn)) == [b.key, over.key]


@pytest.mark.parametrize("refusal", [
    asyncpg.exceptions.StringDataRightTruncationError("value too long"),
    asyncpg.exceptions.CheckViolationError("no partition of relation"),
    asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds maximum"),
], ids=lambda e: e.sqlstate)
async def test_data_and_constraint_errors_are_isolated(refusal: asyncpg.PostgresError) -> None:
    a, b = candidate("a", "1"), candidate("a", "2")
    writer, conn, _ = setup(Db(bad_rows={b.row}, refusal=refusal))
    result = await write(writer, conn, [a, b])
    assert result.stored == [a] and [r[5] for r in result.refused] == ["2"]


@pytest.mark.parametrize("error", [asyncpg.SerializationError("could not serialize"),
                                   asyncpg.exceptions.ConnectionFailureError("connection lost"),
                                   ConnectionResetError("reset")],
                         ids=["40001", "08006", "reset"])
async def test_other_errors_roll_back_the_whole_batch_without_bisecting(error: BaseException) -> None:
    writer, conn, _ = setup(Db(copy_error=error))
    with pytest.raises(type(error)):
        await write(writer, conn, [candidate("a", "1"), candidate("a", "2")])
    assert [label(c) for c in conn.calls].count("copy events_webhook") == 1
    assert conn.calls[-1].method == "rollback" and conn.committed == []


async def test_a_due_ledger_epoch_is_looked_for_before_the_transaction_at_most_once_a_minute() -> None:
    now = [0.0]
    writer, conn, _ = setup(Db(), monotonic=lambda: now[0])
    await write(writer, conn, [candidate("a", "1")])
    assert not any("opened_at IS NULL" in c.sql for c in conn.calls)  # at start the partition step opened them
    now[0] = Writer.EPOCH_CHECK_S
    await write(writer, conn, [candidate("a", "2")])
    await write(writer, conn, [candidate("a", "3")])
    checks = [i for i, c in enumerate(conn.calls) if "opened_at IS NULL" in c.sql]
    assert len(checks) == 1 and conn.calls[checks[0] + 1].method == "begin"  # outside the batch transaction
