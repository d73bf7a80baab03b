"""Progress lives in Postgres: the next offset per (group, topic, partition), advanced only with the rows.

A stored value of -1 means "nothing consumed yet: start at the beginning of the partition".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

UNSET = -1


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
