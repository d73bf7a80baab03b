"""The values that flow through a stream: Kafka records in, candidate rows and dead letters out.

Named types at no runtime cost: ``DeadLetter`` is a NamedTuple (binary COPY takes it as it is), ``Candidate`` a
slotted dataclass that builds its dead letter only if it is ever refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

Key = tuple[str, str]
"""(tenant_id, idempotency_key): the dedupe key within a stream."""


class Record(Protocol):
    """What a stage needs of a Kafka record (aiokafka's ConsumerRecord satisfies it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SimpleRecord:
    """A ``Record`` built in memory (bench, tools, tests)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


class DeadLetter(NamedTuple):
    """One row of the dead-letter table, in its column order (``DEAD_LETTER_COLUMNS``)."""

    stream: str
    reason: str
    detail: str | None
    raw: bytes | None
    tenant_id: str | None
    idempotency_key: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    kafka_key: bytes | None
    kafka_timestamp: datetime

    def with_reason(self, reason: str, detail: str) -> DeadLetter:
        """The same dead letter with another ``reason`` and ``detail``."""
        return self._replace(reason=str(reason), detail=detail)


DEAD_LETTER_COLUMNS: tuple[str, ...] = DeadLetter._fields


@dataclass(slots=True)
class Candidate:
    """A valid event not seen in its batch: its dedupe key, its event-table row (the contract's columns, then
    kafka_timestamp, source_partition, source_offset), and the record it came from."""

    key: Key
    row: tuple[Any, ...]
    record: Record
    kafka_time: datetime

    def dead_letter(self, stream: str, reason: str, detail: str) -> DeadLetter:
        """The dead letter to write when this event cannot be stored (quota, a value Postgres refuses)."""
        r = self.record
        return DeadLetter(stream, str(reason), detail, r.value, self.key[0], self.key[1], r.topic, r.partition,
                          r.offset, r.key, self.kafka_time)
