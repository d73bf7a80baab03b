"""One Postgres transaction per batch: fence, dedupe claim, quota, COPY rows, COPY dead letters, offsets.

Rules: nothing here touches Redis hints or Kafka; the caller does that after ``write`` returns (after COMMIT).
Rows Postgres refuses (data or constraint errors) are isolated by bisection under savepoints and dead-lettered
with reason ``db_rejected``; the rest of the batch is still written with binary COPY. Any other error propagates
and the whole transaction rolls back, so the caller can retry the batch as a unit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg

from ingest import ledger, offsets
from ingest.quota import Quota
from ingest.reject import Reason
from ingest.rows import DEAD_LETTER_COLUMNS, Candidate, DeadLetter, Key

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class StreamTables:
    """Where a stream's data goes (the wiring names them; ``ingest`` knows no table name). Names are
    configuration, never input."""

    events: str
    columns: tuple[str, ...]
    dead_letters: str
    ledger: str
    offsets: str
    offset_changes: str


@dataclass(slots=True)
class WriteResult:
    stored: list[Candidate] = field(default_factory=list)
    duplicates: list[Candidate] = field(default_factory=list)
    over_quota: list[Candidate] = field(default_factory=list)
    refused: list[DeadLetter] = field(default_factory=list)
    splits: int = 0


def _is_data_error(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in ("22", "23") or state == "54000"


class Writer:
    """Writes batches for one stream; safe to share between batches, not between concurrent transactions."""

    IDLE_TIMEOUT_MS = 60_000
    """A batch transaction left idle this long (its process died, hung or lost its network) is ended by the
    server, so it cannot hold its partitions' offset rows, and with them the next owner, for hours."""

    EPOCH_CHECK_S = 60.0
    """How often a writer looks for a ledger epoch that is due to open (maintenance opens them too)."""

    def __init__(self, *, stream: str, group: str, topic: str, tables: StreamTables, window: timedelta,
                 quota: Quota, idle_timeout_ms: int = IDLE_TIMEOUT_MS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.group, self.topic = stream, group, topic
        self.tables, self.window, self.quota = tables, window, quota
        self.idle_timeout = str(int(idle_timeout_ms))
        self._monotonic = monotonic
        self._epoch_check_at = monotonic() + self.EPOCH_CHECK_S  # at start, ``ensure_partitions`` opened them

    async def _open_due_epoch(self, conn: Conn) -> None:
        """At most every ``EPOCH_CHECK_S``: open a ledger epoch whose start has passed (a failure only delays it)."""
        if self._monotonic() < self._epoch_check_at:
            return
        self._epoch_check_at = self._monotonic() + self.EPOCH_CHECK_S
        try:
            await ledger.open_due(conn, self.tables.ledger)
        except asyncpg.LockNotAvailableError:
            log.warning("dedupe ledger epoch not opened: lock timeout; retrying later", extra={"stream": self.stream})

    async def write(
        self, conn: Conn, candidates: Sequence[Candidate], dead_letters: Sequence[DeadLetter],
        expected: dict[int, int], advance: dict[int, int],
    ) -> WriteResult:
        """Commit one batch or raise (``offsets.Fenced`` when another owner moved a partition).

        Quota verdicts are asked once per event: the careful replay after a data error reuses them, and the quota
        keeps them across attempts (a retry after a failed COMMIT is not charged again) until ``settle``."""
        await self._open_due_epoch(conn)
        verdicts: dict[Key, bool] = {}
        try:
            result = await self._attempt(conn, candidates, dead_letters, expected, advance, verdicts, careful=False)
        except asyncpg.PostgresError as exc:
            if not _is_data_error(exc):
                raise
            result = await self._attempt(conn, candidates, dead_letters, expected, advance, verdicts, careful=True)
        if verdicts:  # committed: the quota's per-event verdicts are no longer needed (see Quota)
            await self.quota.settle(list(verdicts))
        return result

    async def _attempt(
        self, conn: Conn, candidates: Sequence[Candidate], dead_letters: Sequence[DeadLetter],
        expected: dict[int, int], advance: dict[int, int], verdicts: dict[Key, bool], *, careful: bool,
    ) -> WriteResult:
        result = WriteResult()
        async with conn.transaction():
            # Transaction-scoped (safe behind a transaction-mode pooler); see IDLE_TIMEOUT_MS.
            # The shared epoch lock (ingest.ledger's rule) is taken before the claim reads the open epoch.
            await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', $1, true),"
                               " pg_advisory_xact_lock_shared($2)", self.idle_timeout, ledger.EPOCH_LOCK)
            await offsets.fence_and_advance(conn, self.tables.offsets, self.group, self.topic, expected, advance)
            new = await ledger.claim(conn, self.tables.ledger, self.stream, [c.key for c in candidates], self.window)
            fresh: list[Candidate] = []
            for c in candidates:
                (fresh if c.key in new else result.duplicates).append(c)
            if fresh:
                unjudged = [c for c in fresh if c.key not in verdicts]
                if unjudged:
                    answers = await self.quota.admit([c.key[0] for c in unjudged], [c.key for c in unjudged])
                    verdicts.update(zip((c.key for c in unjudged), answers, strict=True))
                admitted: list[Candidate] = []
                for c in fresh:
                    (admitted if verdicts[c.key] else result.over_quota).append(c)
                if result.over_quota:
                    await ledger.unclaim(conn, self.tables.ledger, self.stream, [c.key for c in result.over_quota])
                if careful:
                    await self._isolate(conn, admitted, result)
                else:
                    await self._copy(conn, admitted)
                    result.stored = admitted
            rejected = list(dead_letters)
            rejected += [c.dead_letter(self.stream, Reason.QUOTA_EXCEEDED, "tenant over its quota")
                         for c in result.over_quota]
            rejected += result.refused
            if rejected:
                await conn.copy_records_to_table(
                    self.tables.dead_letters, records=rejected, columns=DEAD_LETTER_COLUMNS)
        return result

    async def _copy(self, conn: Conn, rows: Sequence[Candidate]) -> None:
        if rows:
            await conn.copy_records_to_table(
                self.tables.events, records=[c.row for c in rows], columns=self.tables.columns)

    async def _isolate(self, conn: Conn, rows: Sequence[Candidate], result: WriteResult) -> None:
        """Store what Postgres accepts of ``rows`` by bisection under savepoints; dead-letter the rest."""
        if not rows:
            return
        result.splits += 1
        pending = [rows[: len(rows) // 2], rows[len(rows) // 2:]] if len(rows) > 1 else [rows]
        while pending:
            chunk = pending.pop()
            if not chunk:
                continue
            try:
                async with conn.transaction():
                    await self._copy(conn, chunk)
                result.stored.extend(chunk)
            except asyncpg.PostgresError as exc:
                if not _is_data_error(exc):
                    raise
                if len(chunk) == 1:
                    c = chunk[0]
                    detail = f"Postgres refused the row: {exc.sqlstate} {str(exc)[:300]}"
                    result.refused.append(c.dead_letter(self.stream, Reason.DB_REJECTED, detail))
                    await ledger.unclaim(conn, self.tables.ledger, self.stream, [c.key])
                else:
                    result.splits += 1
                    mid = len(chunk) // 2
                    pending += [chunk[:mid], chunk[mid:]]
