"""Per-partition state of one stream consumer: one object per partition, one set of transitions.

Workflow of a partition (``Status``)::

    assign ──► UNPOSITIONED ──position(stored, start)──► POSITIONED ──accept/advance──► POSITIONED
                    ▲                                         │
                    └───────────── reposition() ◄─────────────┘  (fenced, out of range, write abandoned)
    revoke (from any status) ──► REVOKED  (kept only so that its epoch keeps growing)

- An UNPOSITIONED partition is paused in Kafka: nothing is read before it was sought to the offset Postgres holds.
- ``stored`` is the next offset stored in Postgres as this consumer last saw it: the fence's expected value.
  ``UNSET`` (-1) means nothing was ever stored; reading then starts at the log start.
- ``cursor`` is the next offset accepted from Kafka (records below it were already taken into a batch).
- ``end_seen`` is evidence that the log ends before the position: ``(offset, end)`` where ``offset`` is the
  position a fetch was made at and ``end`` the log end that fetch reported (None: the broker refused the offset
  as out of range; ask it for the end). Only such evidence may judge a stored position to lie past the log end:
  a high watermark seen earlier, at another position, may be stale (another owner moved on since).
- ``poll_mark`` is the consumer's last-poll timestamp when the partition was positioned: a high watermark
  reported after it comes from a fetch at this position.
- ``epoch`` grows at every change of position or ownership. A batch remembers the epoch of each partition it read;
  its records are written only if the epoch is unchanged, so nothing staged before a re-positioning is written
  past the records it would skip.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

UNSET = -1


class Status(Enum):
    UNPOSITIONED = "unpositioned"
    POSITIONED = "positioned"
    REVOKED = "revoked"


@dataclass(slots=True)
class PartitionState:
    """One partition's state; change it only through ``Partitions``."""

    partition: int
    status: Status = Status.UNPOSITIONED
    stored: int = UNSET
    cursor: int = UNSET
    epoch: int = 0
    end_seen: tuple[int, int | None] | None = None
    poll_mark: int | None = None

    @property
    def position(self) -> int:
        """The next offset to be stored: ``stored``, or the cursor while nothing was ever stored."""
        return self.stored if self.stored != UNSET else self.cursor


class Partitions:
    """The partitions of one topic as one consumer sees them. Every transition of the workflow above is a method
    here; callers never edit a ``PartitionState`` themselves."""

    def __init__(self) -> None:
        self._states: dict[int, PartitionState] = {}

    def get(self, partition: int) -> PartitionState | None:
        """The state of ``partition`` if it is assigned (positioned or not), else None."""
        s = self._states.get(partition)
        return s if s is not None and s.status is not Status.REVOKED else None

    def positioned(self) -> dict[int, PartitionState]:
        """Assigned partitions that are being read."""
        return {p: s for p, s in self._states.items() if s.status is Status.POSITIONED}

    def unpositioned(self) -> set[int]:
        """Assigned partitions waiting for a position from Postgres (paused in Kafka)."""
        return {p for p, s in self._states.items() if s.status is Status.UNPOSITIONED}

    def assigned(self) -> set[int]:
        return {p for p, s in self._states.items() if s.status is not Status.REVOKED}

    def epoch(self, partition: int) -> int:
        s = self._states.get(partition)
        return s.epoch if s is not None else 0

    # -- transitions ---------------------------------------------------------------------------------------------
    def assign(self, parts: Iterable[int]) -> set[int]:
        """The assignment is now ``parts``: others are revoked, new ones wait to be positioned. Returns the
        partitions that are unpositioned afterwards."""
        wanted = set(parts)
        for p in list(self._states):
            if p not in wanted:
                self.revoke(p)
        for p in wanted:
            s = self._states.get(p)
            if s is None:
                self._states[p] = PartitionState(p)
            elif s.status is Status.REVOKED:
                s.status = Status.UNPOSITIONED
        return self.unpositioned()

    def revoke(self, partition: int) -> None:
        """No longer ours: whatever was staged from it is never written."""
        s = self._states.get(partition)
        if s is not None:
            s.status, s.stored, s.cursor, s.epoch = Status.REVOKED, UNSET, UNSET, s.epoch + 1

    def reposition(self, partition: int, *, end_seen: tuple[int, int | None] | None = None) -> bool:
        """Forget the position of an assigned partition: it is paused and read again from Postgres's position
        (``end_seen``: because a fetch showed the log ending before it; see the module note). Returns False when
        it is not assigned."""
        s = self.get(partition)
        if s is None:
            return False
        s.status, s.stored, s.cursor, s.epoch = Status.UNPOSITIONED, UNSET, UNSET, s.epoch + 1
        s.end_seen = end_seen
        return True

    def position(self, partition: int, stored: int, start: int, poll_mark: int | None = None) -> bool:
        """Position an unpositioned partition at ``stored`` (``UNSET``: at ``start``, the log start). Returns
        False, changing nothing, when it is no longer waiting for a position (revoked meanwhile)."""
        s = self._states.get(partition)
        if s is None or s.status is not Status.UNPOSITIONED:
            return False
        s.status, s.stored, s.epoch, s.end_seen = Status.POSITIONED, stored, s.epoch + 1, None
        s.poll_mark = poll_mark
        s.cursor = stored if stored != UNSET else start
        return True

    def accept(self, partition: int, epoch: int, offsets: Iterable[int]) -> list[int]:
        """The indexes of ``offsets`` (one fetch of ``partition``, ascending) to take into a batch: those at or
        past the cursor, while the partition is still positioned as at ``epoch``. Moves the cursor past them."""
        s = self._states.get(partition)
        if s is None or s.status is not Status.POSITIONED or s.epoch != epoch:
            return []
        offsets = list(offsets)
        cursor = s.cursor
        if not offsets:
            return []
        if offsets[0] >= cursor and all(map(operator.lt, offsets, offsets[1:])):  # the usual fetch, in C
            s.cursor = offsets[-1] + 1
            return list(range(len(offsets)))
        taken = []
        for i, offset in enumerate(offsets):
            if offset >= cursor:
                taken.append(i)
                cursor = offset + 1
        s.cursor = cursor
        return taken

    def writable(self, partition: int, epoch: int | None, offset: int) -> bool:
        """True if a record read at ``epoch`` may still be written: same epoch, at or past the stored offset."""
        s = self._states.get(partition)
        return (s is not None and s.status is Status.POSITIONED and s.epoch == epoch
                and offset >= s.stored)

    def expected(self, parts: Iterable[int]) -> dict[int, int]:
        """The fence's expected stored offsets of ``parts`` (all positioned)."""
        return {p: self._states[p].stored for p in parts}

    def advance(self, partition: int, next_offset: int) -> None:
        """Postgres now stores ``next_offset``; a partition revoked or re-positioned meanwhile stays as it is."""
        s = self._states.get(partition)
        if s is not None and s.status is Status.POSITIONED:
            s.stored = max(s.stored, next_offset)
