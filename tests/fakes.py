"""In-memory stand-ins shared by the unit tests (no services).

Each fake covers the part of the real client's surface the library calls and records what it was asked to do,
so a test can assert on it. Options cover what individual tests need; the defaults are the common case.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import TopicPartition

TOPIC = "events.webhook"
PARTITION_0 = TopicPartition(TOPIC, 0)


@dataclass
class FakeCoordinator:
    """aiokafka's group coordinator, as far as the readiness probe reads it."""

    coordinator_id: int | None = 1


class FakeKafka:
    """An ``AIOKafkaConsumer`` that never returns records.

    ``assigned`` is the assignment (default: partition 0 of ``TOPIC``). ``pause``/``resume`` keep the paused
    partition numbers in ``paused``; ``seek`` and ``commit`` are recorded; ``stop`` sets ``stopped``;
    ``getmany`` waits its timeout and returns nothing; ``highwater`` is unknown (None)."""

    def __init__(self, assigned: Iterable[TopicPartition] = (PARTITION_0,)) -> None:
        self.assigned = set(assigned)
        self.paused: set[int] = set()
        self.seeks: list[tuple[TopicPartition, int | None]] = []  # None: seek to the beginning
        self.commits: list[Any] = []
        self.started = False
        self.stopped = False
        self._coordinator = FakeCoordinator()

    def subscribe(self, topics: list[str], listener: Any = None) -> None: ...

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= {tp.partition for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks += [(tp, None) for tp in tps]

    async def beginning_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.highwater(tp) or 0 for tp in tps}

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return None

    async def commit(self, offsets: Any) -> None:
        self.commits.append(offsets)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}


class FakePool:
    """An ``asyncpg.Pool`` whose ``acquire`` lends ``conn`` (default None, for code that only passes it on)."""

    def __init__(self, conn: Any = None) -> None:
        self.conn = conn
        self.acquired = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        self.acquired += 1
        yield self.conn


@dataclass
class Call:
    """One statement sent to a ``FakeConn``: a query method and its SQL (for a COPY, the table), or a transaction
    boundary (``method`` is ``begin``, ``commit`` or ``rollback``; ``sql`` is empty)."""

    method: str
    sql: str = ""
    args: tuple[Any, ...] = ()


Answer = Callable[[Call], Any]
"""Answers a statement: returns its result (rows for ``fetch``, a value for ``fetchval``, a status for
``execute``, byte chunks for ``copy_from_query``) or raises to make it fail."""


def no_answer(call: Call) -> Any:
    return {"fetch": [], "fetchval": None, "fetchrow": None}.get(call.method, "OK")


class FakeConn:
    """An asyncpg connection that records every statement and answers with ``answer``.

    Transactions nest like asyncpg's (the inner ones are savepoints): when a block exits with an exception, the
    statements sent inside it are rolled back, i.e. they stay in ``calls`` but leave ``committed``. As in
    Postgres, a statement that fails inside a transaction aborts it: every later statement (and the COMMIT)
    fails with ``InFailedSQLTransactionError`` until that block (or savepoint) is rolled back."""

    def __init__(self, answer: Answer = no_answer) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self.committed: list[Call] = []
        self._depth = 0
        self._aborted = False

    def _check_aborted(self) -> None:
        if self._aborted:
            raise asyncpg.InFailedSQLTransactionError(
                "current transaction is aborted, commands ignored until end of transaction block")

    def _run(self, call: Call) -> Any:
        self.calls.append(call)
        self._check_aborted()
        try:
            result = self.answer(call)
        except BaseException:
            self._aborted = self._depth > 0
            raise
        self.committed.append(call)
        return result

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        self._check_aborted()
        self.calls.append(Call("begin"))
        self._depth += 1
        mark = len(self.committed)
        try:
            yield
            self._check_aborted()
        except BaseException:
            self.calls.append(Call("rollback"))
            del self.committed[mark:]
            self._aborted = False
            raise
        finally:
            self._depth -= 1
        self.calls.append(Call("commit"))

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()

    async def execute(self, sql: str, *args: Any) -> Any:
        return self._run(Call("execute", sql, args))

    async def fetch(self, sql: str, *args: Any) -> Any:
        return self._run(Call("fetch", sql, args))

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        self._run(Call("executemany", sql, (list(args),)))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return self._run(Call("fetchval", sql, args))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return self._run(Call("fetchrow", sql, args))

    async def copy_records_to_table(self, table_name: str, *, records: Iterable[Any],
                                    columns: Sequence[str] | None = None, **_: Any) -> str:
        rows = list(records)
        self._run(Call("copy_records_to_table", table_name, (rows, tuple(columns or ()))))
        return f"COPY {len(rows)}"

    async def copy_from_query(self, sql: str, *args: Any, output: Callable[[bytes], Awaitable[Any]],
                              **options: Any) -> str:
        chunks = self._run(Call("copy_from_query", sql, (*args, options)))
        for chunk in chunks:
            await output(chunk)
        return "COPY"

    async def close(self) -> None:
        self.calls.append(Call("close"))

    def statements(self, method: str | None = None) -> list[str]:
        """The SQL of every call (of one method), in order."""
        return [c.sql for c in self.calls if c.sql and (method is None or c.method == method)]
