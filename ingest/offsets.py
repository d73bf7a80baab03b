"""Progress lives in Postgres: the next offset per (group, topic, partition), advanced only with the rows.

A stored value of -1 (``UNSET``) means "nothing consumed yet: start at the beginning of the partition". Any other
move of a stored value (the log no longer holding it, an operator reset) goes through ``apply_moves``, which
records it in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ingest.partition_state import UNSET
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

__all__ = ["UNSET", "Fenced", "Kind", "LogBounds", "Move", "apply_moves", "fence_and_advance", "load",
           "mismatches"]


class Fenced(Exception):
    """Another owner advanced a partition this batch covers; roll back and re-seek."""

    def __init__(self, partitions: Sequence[int]) -> None:
        super().__init__(f"partitions {sorted(partitions)} moved under us")
        self.partitions = tuple(partitions)


async def load(conn: Conn, table: str, group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
    """Return the stored next offset of each partition, creating missing rows as ``UNSET``."""
    await conn.execute(
        f"""INSERT INTO {ident(table)} (group_id, topic, partition, next_offset)
            SELECT $1, $2, p, {UNSET} FROM unnest($3::int[]) AS p ON CONFLICT DO NOTHING""",
        group, topic, list(partitions),
    )
    rows = await conn.fetch(
        f"SELECT partition, next_offset FROM {ident(table)} WHERE group_id = $1 AND topic = $2 "
        "AND partition = ANY($3::int[])",
        group, topic, list(partitions),
    )
    return {r[0]: r[1] for r in rows}


async def fence_and_advance(
    conn: Conn, table: str, group: str, topic: str,
    expected: Mapping[int, int], advance: Mapping[int, int],
) -> None:
    """Inside the batch transaction, in one statement: move each partition from ``expected`` to ``advance``
    (compare-and-swap; the rows stay locked until COMMIT). Raises ``Fenced`` (the caller must roll back) when
    another owner moved any of them."""
    parts = sorted(advance)
    rows = await conn.fetch(
        f"""UPDATE {ident(table)} o SET next_offset = u.n, updated_at = now()
            FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS u(p, e, n)
            WHERE o.group_id = $1 AND o.topic = $2 AND o.partition = u.p AND o.next_offset = u.e
            RETURNING o.partition""",
        group, topic, parts, [expected.get(p, -2) for p in parts], [advance[p] for p in parts],
    )
    if len(rows) != len(parts):
        raise Fenced(sorted(set(parts) - {r[0] for r in rows}))


@dataclass(frozen=True, slots=True)
class LogBounds:
    """What the Kafka log of one partition holds now: offsets ``start`` (inclusive) to ``end`` (exclusive).
    ``end`` None: not known reliably (then only ``start`` is judged). ``seen_at``: the offset the end was observed
    from (a fetch there); a stored offset other than that is not judged against it."""

    start: int
    end: int | None
    seen_at: int | None = None


class Kind(StrEnum):
    """Why a stored position moved other than by a batch (``offset_changes.kind``)."""

    BEYOND_END = "beyond_end"  # stored past the log end: the topic was recreated or truncated, or the cluster changed
    BELOW_START = "below_start"  # stored below the log start: retention removed records before they were read
    RESET = "reset"  # an operator moved it (``ingest offsets reset``)


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's position moving from ``old`` (a stored value, possibly ``UNSET``) to ``new``."""

    partition: int
    kind: Kind
    old: int
    new: int
    bounds: LogBounds

    @property
    def skipped(self) -> int:
        """Records that will never be read because of this move: a retention gap, or an operator's skip."""
        if self.kind is Kind.BEYOND_END:
            return 0
        if self.kind is Kind.BELOW_START:
            return self.bounds.start - self.old
        return max(0, self.new - self._from())

    @property
    def reread(self) -> int:
        """Records that were already read and will be read again (only an operator reset re-reads)."""
        return max(0, self._from() - self.new) if self.kind is Kind.RESET else 0

    def _from(self) -> int:
        start, end = self.bounds.start, self.bounds.end
        if self.old == UNSET:
            return start
        return max(self.old, start) if end is None else min(max(self.old, start), end)


def mismatches(stored: Mapping[int, int], bounds: Mapping[int, LogBounds]) -> list[Move]:
    """The partitions whose stored position the log no longer holds, each moved to its log start. ``UNSET``
    (nothing read yet) and positions within [start, end] match; a partition without bounds is not judged."""
    out = []
    for p, at in sorted(stored.items()):
        b = bounds.get(p)
        if b is None or at == UNSET:
            continue
        if b.end is not None and at > b.end and b.seen_at in (None, at):
            out.append(Move(p, Kind.BEYOND_END, at, b.start, b))
        elif at < b.start:
            out.append(Move(p, Kind.BELOW_START, at, b.start, b))
    return out


async def apply_moves(conn: Conn, table: str, changes_table: str, *, stream: str, group: str, topic: str,
                      moves: Sequence[Move], detail: str = "") -> None:
    """Move each partition from ``old`` to ``new`` and record it in ``changes_table``, in one transaction.
    Raises ``Fenced`` (nothing changed) when any partition no longer holds ``old``: its owner must re-read it.
    The partitions' rows must exist (``load`` creates them)."""
    if not moves:
        return
    async with conn.transaction():
        await fence_and_advance(conn, table, group, topic, {m.partition: m.old for m in moves},
                                {m.partition: m.new for m in moves})
        await conn.executemany(
            f"""INSERT INTO {ident(changes_table)} (stream, group_id, topic, partition, kind, from_offset,
                    to_offset, log_start, log_end, skipped, reread, detail)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            [(stream, group, topic, m.partition, str(m.kind), m.old, m.new, m.bounds.start, m.bounds.end,
              m.skipped, m.reread, detail) for m in moves])
