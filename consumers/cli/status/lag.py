"""Lag arithmetic: stored positions against the log, per partition and per stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from consumers.cli.status.kafka import EndOffset, end_offsets
from consumers.cli.status.postgres import connect_postgres, stored_offsets
from consumers.streams import Stream
from ingest.config import Config, maintenance_url
from ingest.offsets import UNSET
from ingest.redaction import redact
from ingest.services import ServiceUnavailable


def mismatch_of(end: EndOffset | None, stored: int | None) -> str | None:
    """``beyond_end`` or ``below_start`` when the log no longer holds the stored next offset, else None."""
    if end is None or stored is None or stored == UNSET:
        return None
    if stored > end.end:
        return "beyond_end"
    if stored < end.beginning:
        return "below_start"
    return None


def lag_of(end: EndOffset | None, stored: int | None) -> int | None:
    """Records in the log that are still to be read: end minus the stored next offset. Nothing consumed yet
    (``-1``/missing) and a stored offset the log no longer holds (see ``mismatch_of``) count from the log start,
    where the consumer resumes: lag never reads 0 while records are unread."""
    if end is None:
        return None
    at = end.beginning if stored is None or stored == UNSET or mismatch_of(end, stored) else stored
    return max(0, end.end - at)


def partition_row(partition: int, end: EndOffset | None, stored: int | None, *,
                  known_progress: bool = True) -> dict[str, Any]:
    """One partition's line in ``lag``, ``status`` and ``offsets show``."""
    return {"partition": partition, "stored_offset": stored, "next_offset": stored,
            "log_start": end.beginning if end else None, "end_offset": end.end if end else None,
            "log_end": end.end if end else None, "lag": lag_of(end, stored) if known_progress else None,
            "mismatch": mismatch_of(end, stored)}


async def lag_report(config: Config, selected: Sequence[Stream], *,
                     conn: asyncpg.Connection | None = None) -> dict[str, Any]:
    """Per stream and partition: end offset, stored offset, lag. Raises ``ServiceUnavailable``."""
    ends = await end_offsets(config, [s.topic_for(config) for s in selected])
    own = conn is None
    db = conn or await connect_postgres(maintenance_url(config))
    try:
        out: dict[str, Any] = {}
        for s in selected:
            topic, group = s.topic_for(config), s.group_for(config)
            try:
                stored = await stored_offsets(db, s.tables().offsets, group, topic)
            except asyncpg.UndefinedTableError:
                raise ServiceUnavailable("postgres", redact(config.database_url),
                                         "schema missing: run `ingest migrate` first") from None
            rows = [partition_row(p, ends[topic].get(p), stored.get(p)) for p in sorted(set(ends[topic]) | set(stored))]
            out[s.name] = {"topic": topic, "group": group, "topic_exists": bool(ends[topic]),
                           "partitions": rows, "total_lag": sum(r["lag"] or 0 for r in rows)}
        return out
    finally:
        if own:
            await db.close()
