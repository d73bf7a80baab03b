"""Where each partition resumes: the offset Postgres stores, checked against what the Kafka log still holds.

Rules:
- ``UNSET`` (nothing stored yet) resumes at the log start, and that start is stored at once: records that expire
  unread after this are a detectable gap, never a silent jump of the log start.
- A stored offset the log no longer holds (``offsets.mismatches``) is counted and logged, then, by the policy,
  either moved to the log start with an ``offset_changes`` row in the same transaction (``reset``), or refused
  with ``LogMismatch`` (``stop``: nothing moves).
- Any move is a compare-and-swap: a partition moved meanwhile by another owner raises ``offsets.Fenced``; the
  caller positions it again from what Postgres holds then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingest import offsets
from ingest.metrics import Metrics

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

POLICIES = ("reset", "stop")


class LogMismatch(Exception):
    """Stored positions the log no longer holds, under the ``stop`` policy; ``str()`` names the partitions and
    the command that fixes them."""

    def __init__(self, stream: str, moves: Sequence[offsets.Move]) -> None:
        parts = ", ".join(f"{m.partition} (stored {m.old}, log {m.bounds.start}-{m.bounds.end}: {m.kind})"
                          for m in moves)
        super().__init__(
            f"{stream}: stored positions the Kafka log no longer holds: partitions {parts}; choose where to "
            f"resume with `ingest offsets reset --stream {stream} --to-earliest "
            f"{' '.join(f'--partition {m.partition}' for m in moves)} --execute` (or --to-latest, --to-datetime)")
        self.moves = list(moves)


@dataclass(frozen=True, slots=True)
class Positions:
    """Resolves where one stream's partitions resume (see the module rules)."""

    stream: str
    group: str
    topic: str
    offsets_table: str
    changes_table: str
    policy: str  # one of POLICIES
    metrics: Metrics

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"log mismatch policy must be one of {POLICIES}, not {self.policy!r}")
        # Series that alerts take increase() of exist from the start at 0, so that their first event counts.
        for kind in (offsets.Kind.BEYOND_END, offsets.Kind.BELOW_START):
            self.metrics.log_mismatches.labels(self.stream, str(kind), self.policy)
        self.metrics.log_gap_records.labels(self.stream)
        self.metrics.log_mismatch_stopped.labels(self.stream).set(0)

    async def resume_at(self, conn: Conn, parts: Sequence[int],
                        bounds: Mapping[int, offsets.LogBounds]) -> dict[int, int]:
        """The offset each of ``parts`` resumes at (never ``UNSET``). Raises ``LogMismatch`` or
        ``offsets.Fenced``."""
        stored = await offsets.load(conn, self.offsets_table, self.group, self.topic, parts)
        moves = offsets.mismatches(stored, bounds)
        if moves:
            self._report(moves)
            if self.policy == "stop":
                raise LogMismatch(self.stream, moves)
            await offsets.apply_moves(conn, self.offsets_table, self.changes_table, stream=self.stream,
                                      group=self.group, topic=self.topic, moves=moves,
                                      detail="detected by the consumer on positioning")
            for m in moves:
                if m.skipped:
                    self.metrics.log_gap_records.labels(self.stream).inc(m.skipped)
            stored.update({m.partition: m.new for m in moves})
        first = {p: bounds[p].start for p, at in stored.items() if at == offsets.UNSET}
        if first:
            async with conn.transaction():
                await offsets.fence_and_advance(conn, self.offsets_table, self.group, self.topic,
                                                dict.fromkeys(first, offsets.UNSET), first)
            stored.update(first)
        return stored

    def _report(self, moves: Sequence[offsets.Move]) -> None:
        for m in moves:
            self.metrics.log_mismatches.labels(self.stream, str(m.kind), self.policy).inc()
            log.error("stored position outside the kafka log", extra={
                "stream": self.stream, "topic": self.topic, "partition": m.partition, "kind": str(m.kind),
                "stored": m.old, "log_start": m.bounds.start, "log_end": m.bounds.end, "lost": m.skipped,
                "action": "stop" if self.policy == "stop" else f"resume at {m.new}"})
