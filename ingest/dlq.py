"""Dead letters: counts, listing, one entry, selection for replay, marking replayed, and how to print raw bytes.

Rules: the table name is configuration passed in by the caller (``consumers`` knows it; this module does not);
filter values are always bound parameters. Replay selects pending entries (``replayed_at IS NULL``) in source
order (see ``select_for_replay``) up to an id fixed when the replay starts, so records that fail again during the replay (new dead letters, higher ids)
are never picked up by the same run. ``mark_replayed`` only marks entries that are still pending, so it is safe to
repeat. One replay at a time per table: ``try_replay_lock`` is a session advisory lock.

Retention (``purge_plan``, ``purge``): an entry created before the cut-off is deleted only when it was replayed or
is older than ``keep_pending_after`` (now minus the dead-letter retention); ``None`` there keeps every unreplayed
entry. So no command can delete an unreplayed entry younger than the retention. Deletion goes ``chunk`` rows per
transaction, like the ledger's expiry.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

_REPLAY_LOCK_CLASS = 0x1E57_0003
_DURATION = re.compile(r"([0-9]+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command applies to; ``None``/empty means any."""

    stream: str | None = None
    reasons: tuple[str, ...] = ()
    tenant: str | None = None
    since: datetime | None = None

    def where(self, params: list[Any]) -> str:
        """SQL conditions (joined with AND) for these filters; appends their values to ``params``."""
        clauses = ["TRUE"]
        if self.stream is not None:
            params.append(self.stream)
            clauses.append(f"stream = ${len(params)}")
        if self.reasons:
            params.append(list(self.reasons))
            clauses.append(f"reason = ANY(${len(params)}::text[])")
        if self.tenant is not None:
            params.append(self.tenant)
            clauses.append(f"tenant_id = ${len(params)}")
        if self.since is not None:
            params.append(self.since)
            clauses.append(f"created_at >= ${len(params)}")
        return " AND ".join(clauses)


@dataclass(frozen=True, slots=True)
class Count:
    """Dead letters of one stream and reason: still pending, and already replayed."""

    stream: str
    reason: str
    pending: int
    replayed: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One dead letter. ``raw`` is None for a tombstone, or when the query did not fetch the bytes."""

    id: int
    created_at: datetime
    stream: str
    reason: str
    detail: str
    tenant_id: str | None
    idempotency_key: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    kafka_key: bytes | None
    kafka_timestamp: datetime | None
    replayed_at: datetime | None
    raw_size: int | None
    raw: bytes | None = None

    @property
    def tombstone(self) -> bool:
        return self.raw_size is None


@dataclass(frozen=True, slots=True)
class PlanRow:
    """What a replay would do for one stream, reason and topic."""

    stream: str
    reason: str
    source_topic: str
    to_send: int
    tombstones_skipped: int


_ENTRY_COLUMNS = ("id, created_at, stream, reason, detail, tenant_id, idempotency_key, source_topic, "
                  "source_partition, source_offset, kafka_key, kafka_timestamp, replayed_at, "
                  "octet_length(raw) AS raw_size")


def _entry(row: Any) -> Entry:
    return Entry(**dict(row.items()))


async def counts(conn: Conn, table: str, filters: Filters) -> list[Count]:
    """Dead letters matching ``filters``, by stream and reason (most first)."""
    params: list[Any] = []
    rows = await conn.fetch(
        f"SELECT stream, reason, count(*) FILTER (WHERE replayed_at IS NULL) AS pending, "
        f"count(*) FILTER (WHERE replayed_at IS NOT NULL) AS replayed FROM {ident(table)} "
        f"WHERE {filters.where(params)} GROUP BY stream, reason ORDER BY count(*) DESC, stream, reason",
        *params)
    return [Count(r["stream"], r["reason"], int(r["pending"]), int(r["replayed"])) for r in rows]


async def recent(conn: Conn, table: str, filters: Filters, limit: int) -> list[Entry]:
    """The ``limit`` most recent dead letters matching ``filters`` (newest first), without their bytes."""
    params: list[Any] = []
    where = filters.where(params)
    params.append(limit)
    rows = await conn.fetch(
        f"SELECT {_ENTRY_COLUMNS} FROM {ident(table)} WHERE {where} ORDER BY id DESC LIMIT ${len(params)}",
        *params)
    return [_entry(r) for r in rows]


async def get(conn: Conn, table: str, entry_id: int) -> Entry | None:
    """One dead letter with its original bytes, or None."""
    row = await conn.fetchrow(f"SELECT {_ENTRY_COLUMNS}, raw FROM {ident(table)} WHERE id = $1", entry_id)
    return None if row is None else _entry(row)


async def last_id(conn: Conn, table: str) -> int:
    """The highest id so far (0 when empty): a replay covers entries up to here only."""
    return int(await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {ident(table)}"))


# A record with neither key nor value cannot be produced again: it is never selected for replay.
_SENDABLE = {False: "raw IS NOT NULL", True: "(raw IS NOT NULL OR kafka_key IS NOT NULL)"}


def _pending(filters: Filters, params: list[Any], upto_id: int) -> str:
    where = filters.where(params)
    params.append(upto_id)
    return where + f" AND replayed_at IS NULL AND id <= ${len(params)}"


async def replay_plan(conn: Conn, table: str, filters: Filters, *, upto_id: int,
                      include_tombstones: bool) -> list[PlanRow]:
    """Pending dead letters a replay would send, by stream, reason and topic, with tombstones it would skip."""
    params: list[Any] = []
    where = _pending(filters, params, upto_id)
    sendable = _SENDABLE[include_tombstones]
    rows = await conn.fetch(
        f"SELECT stream, reason, source_topic, count(*) FILTER (WHERE {sendable}) AS to_send, "
        f"count(*) FILTER (WHERE NOT {sendable}) AS skipped FROM {ident(table)} "
        f"WHERE {where} GROUP BY stream, reason, source_topic ORDER BY stream, reason, source_topic", *params)
    return [PlanRow(r["stream"], r["reason"], r["source_topic"], int(r["to_send"]), int(r["skipped"]))
            for r in rows]


Cursor = tuple[datetime, str, int, int, int]
"""Replay position: (created_at, source_topic, source_partition, source_offset, id) of the last entry sent."""

_REPLAY_ORDER = "created_at, source_topic, source_partition, source_offset, id"


def cursor_of(entry: Entry) -> Cursor:
    return (entry.created_at, entry.source_topic, entry.source_partition, entry.source_offset, entry.id)


async def select_for_replay(conn: Conn, table: str, filters: Filters, *, after: Cursor | None, upto_id: int,
                            limit: int, include_tombstones: bool) -> list[Entry]:
    """The next ``limit`` pending entries (with bytes) with ``id <= upto_id``, after ``after``, in source order.

    Source order is commit order, then topic, partition and offset: the dead letters of one batch share a
    ``created_at`` but are not inserted in offset order (poison-row bisection), so ids alone would not replay a
    partition's records in their original order."""
    params: list[Any] = []
    where = _pending(filters, params, upto_id) + f" AND {_SENDABLE[include_tombstones]}"
    if after is not None:
        params += list(after)
        n = len(params)
        where += f" AND ({_REPLAY_ORDER}) > (${n - 4}, ${n - 3}, ${n - 2}, ${n - 1}, ${n})"
    params.append(limit)
    rows = await conn.fetch(
        f"SELECT {_ENTRY_COLUMNS}, raw FROM {ident(table)} WHERE {where} ORDER BY {_REPLAY_ORDER} "
        f"LIMIT ${len(params)}", *params)
    return [_entry(r) for r in rows]


async def largest_pending(conn: Conn, table: str) -> int:
    """Size in bytes of the largest pending value (the replay producer's request size must allow it)."""
    return int(await conn.fetchval(
        f"SELECT coalesce(max(octet_length(raw)), 0) FROM {ident(table)} WHERE replayed_at IS NULL"))


async def mark_replayed(conn: Conn, table: str, ids: Sequence[int]) -> int:
    """Set ``replayed_at = now()`` on those of ``ids`` still pending; return how many changed."""
    if not ids:
        return 0
    status = await conn.execute(
        f"UPDATE {ident(table)} SET replayed_at = now() WHERE id = ANY($1::bigint[]) AND replayed_at IS NULL",
        list(ids))
    return int(status.rsplit(" ", 1)[-1])


async def try_replay_lock(conn: Conn, table: str) -> bool:
    """Take the session lock that lets one replay run per table; False if another session holds it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", _REPLAY_LOCK_CLASS, table))


async def replay_unlock(conn: Conn, table: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _REPLAY_LOCK_CLASS, table)


# -- parsing and presentation (pure) -----------------------------------------------------------------------------

def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``1h``, ``30m``, ``2d``, ``1w``, ``45s`` (ago), or an ISO 8601 date/time (UTC when it has no offset)."""
    text = text.strip()
    m = _DURATION.fullmatch(text)
    if m is not None:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30m, 1h, 2d, 1w) nor an ISO 8601 date/time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def printable(text: str | None, limit: int | None = None) -> str:
    """``text`` safe for a terminal line: control and format characters escaped, optionally truncated."""
    if text is None:
        return "-"
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return "".join(ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def as_text(raw: bytes) -> str | None:
    """``raw`` as a string when it is UTF-8 with no control characters besides tab and newlines (and no
    bidirectional overrides), else None: such bytes are shown as a hex dump, so a dead letter cannot drive or
    disguise the terminal."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for ch in text:
        if ch in _BIDI or (ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")):
            return None
    return text


def hexdump(raw: bytes, width: int = 16) -> str:
    """``hexdump -C``-style lines: offset, hex bytes, printable ASCII."""
    lines = []
    for at in range(0, len(raw), width):
        chunk = raw[at:at + width]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{at:08x}  {hexes:<{width * 3 - 1}}  |{ascii_}|")
    return "\n".join(lines)


# -- retention ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PurgePlan:
    """Entries created before the cut-off: those a purge deletes, and the unreplayed ones it must keep."""

    deletable: int
    kept_pending: int  # unreplayed and younger than the retention: never deleted


# $1 created before, $2 keep unreplayed entries created at or after this (NULL: keep every unreplayed one),
# $3 reasons (NULL: any). A NULL $2 makes "created_at < $2" NULL, so only replayed entries qualify.
_PURGEABLE = ("created_at < $1 AND (replayed_at IS NOT NULL OR created_at < $2) "
              "AND ($3::text[] IS NULL OR reason = ANY($3::text[]))")


async def purge_plan(conn: Conn, table: str, *, before: datetime, keep_pending_after: datetime | None,
                     reasons: Sequence[str] = ()) -> PurgePlan:
    """What ``purge`` with the same arguments would delete, and what it would keep."""
    row = await conn.fetchrow(
        f"SELECT count(*) FILTER (WHERE {_PURGEABLE}) AS deletable, "
        f"count(*) AS matched FROM {ident(table)} "
        f"WHERE created_at < $1 AND ($3::text[] IS NULL OR reason = ANY($3::text[]))",
        before, keep_pending_after, list(reasons) or None)
    assert row is not None  # an aggregate without GROUP BY returns one row
    return PurgePlan(int(row["deletable"]), int(row["matched"]) - int(row["deletable"]))


async def purge(conn: Conn, table: str, *, before: datetime, keep_pending_after: datetime | None,
                reasons: Sequence[str] = (), chunk: int = 5000, budget_s: float | None = None,
                lock_timeout_ms: int | None = None) -> int:
    """Delete the entries ``purge_plan`` counts as deletable, ``chunk`` per transaction, for at most ``budget_s``
    seconds (None: until done); return how many were deleted."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    deleted = 0
    while True:
        async with conn.transaction():
            if lock_timeout_ms is not None:
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            gone = int(await conn.fetchval(
                f"""WITH gone AS (
                        DELETE FROM {ident(table)} WHERE id = ANY(ARRAY(
                            SELECT id FROM {ident(table)} WHERE {_PURGEABLE} ORDER BY created_at LIMIT $4))
                        RETURNING 1)
                    SELECT count(*) FROM gone""",
                before, keep_pending_after, list(reasons) or None, chunk))
        deleted += gone
        if gone < chunk or (deadline is not None and time.monotonic() >= deadline):
            return deleted
