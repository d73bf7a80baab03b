"""In-memory stand-ins shared by the unit tests (no services).

Each fake covers the part of the real client's surface the library calls and records what it was asked to do,
so a test can assert on it. Options cover what individual tests need; the defaults are the common case.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

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

    def highwater(self, tp: TopicPartition) -> int | None:
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
