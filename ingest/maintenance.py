"""Partition lifecycle: create ahead, detach past retention, then drop, archive or export-then-drop.

Rules kept here:
- One process at a time: each round takes ``pg_try_advisory_lock`` on the connection it runs on and is skipped
  when another process holds it (the same key as ``ingest migrate``'s partition step).
- Every DDL statement runs in its own transaction under ``SET LOCAL lock_timeout``; a lock timeout (55P03)
  is logged, counted, and the rest of that table's work waits for the next round. Nothing queues ingestion.
- Coverage is ``[now - retention, now + premake]``; a partition is past retention when its END is
  ``<= midnight(now - retention)``. Partition names and export file names derive only from computed dates.
- Export (optional) streams ``COPY (SELECT * FROM part) TO STDOUT`` (CSV with header) into
  ``<export_dir>/<table>_pYYYYMMDD.csv.gz`` before the partition is detached; a failed export keeps it.
- Rows in the DEFAULT partition are counted every round (``MaintenanceReport.default_rows``, and the gauge with
  ``metrics``).
- The dedupe ledger (optional ``ledger``) is rolled (``ingest.ledger.roll``): the current and next epochs'
  partitions are created, epochs due are opened, and an epoch wholly older than the window is dropped. Its keys
  already count as new when they come again, so dropping it changes no verdict.
- Dead letters (optional ``dead_letters``) older than their retention are deleted the same way (``ingest.dlq.purge``:
  replayed or not, but never one younger than the retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import asyncpg

from ingest import dlq, ledger, partitions
from ingest.metrics import Metrics
from ingest.partitions import Partition
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

LOCK_KEY = 0x1E57_0002
"""Advisory lock shared by every partition-DDL actor (``ingest migrate``, consumers' start, maintenance)."""


class TablePolicy(NamedTuple):
    """Partitioning of one stream's table (a plain ``(table, granularity, retention, premake)`` tuple works)."""

    table: str
    granularity: str = "day"
    retention: timedelta = timedelta(days=90)
    premake: timedelta = timedelta(days=7)


class LedgerPolicy(NamedTuple):
    """The dedupe ledger's epochs: ``window`` cut into ``epochs`` partitions (``ingest.ledger``)."""

    table: str
    window: timedelta
    epochs: int = 2


class DeadLetterPolicy(NamedTuple):
    """Retention of dead letters: entries created more than ``retention`` ago are deleted."""

    table: str
    retention: timedelta
    chunk: int = 5000
    budget_s: float = 10.0


@dataclass(slots=True)
class MaintenanceReport:
    """What one round did (or, with ``dry_run``, would do). Names are partition table names."""

    created: list[str] = field(default_factory=list)
    moved_from_default: dict[str, int] = field(default_factory=dict)
    detached: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    default_rows: dict[str, int] = field(default_factory=dict)
    ledger_pruned: int = 0  # keys in the expired ledger partitions dropped (estimated; ``dry_run``: to drop)
    dead_letters_pruned: int = 0  # dead letters past their retention deleted (``dry_run``: how many)
    lock_timeouts: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: bool = False  # another process held the maintenance lock
    dry_run: bool = False


def utc_now() -> datetime:
    return datetime.now(UTC)


class Maintenance:
    """Keeps each table's partitions covering ``[now - retention, now + premake]``; see the module rules."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        tables: Sequence[TablePolicy | tuple[str, str, timedelta, timedelta]],
        *,
        lock_timeout_ms: int = 2000,
        interval: float = 600.0,
        clock: Callable[[], datetime] = utc_now,
        archive: bool = False,
        archive_schema: str = "archive",
        export_dir: str | os.PathLike[str] | None = None,
        metrics: Metrics | None = None,
        lock_key: int = LOCK_KEY,
        ledger: LedgerPolicy | None = None,
        dead_letters: DeadLetterPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.dead_letters = dead_letters
        self.tables = [TablePolicy(*t) for t in tables]
        for t in self.tables:
            if t.granularity not in partitions.GRANULARITIES:
                raise ValueError(f"{t.table}: granularity must be one of {partitions.GRANULARITIES}")
        self.lock_timeout_ms = int(lock_timeout_ms)
        self.interval = float(interval)
        self.clock = clock
        self.archive_schema = archive_schema if archive else None
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.metrics = metrics.maintenance if metrics is not None else None
        self.lock_key = lock_key

    # -- rounds -------------------------------------------------------------------------------------------------
    async def run_forever(self, stop: asyncio.Event) -> None:
        """A round now, then every ``interval`` seconds (±10 % jitter, so processes started together do not keep
        colliding on the lock) until ``stop``; failures are logged and retried next round."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                if self.metrics:
                    self.metrics.runs.labels("failed").inc()
                log.warning("partition maintenance failed; retrying next round",
                            extra={"error": type(exc).__name__, "detail": str(exc)[:300]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval * random.uniform(0.9, 1.1))

    async def run_once(self, *, create: bool = True, prune: bool = True, dry_run: bool = False,
                       wait_lock: float = 0.0) -> MaintenanceReport:
        """One round. ``dry_run`` only reports what would change (no lock, no DDL). ``wait_lock`` keeps trying
        the advisory lock that many seconds before skipping the round."""
        report = MaintenanceReport(dry_run=dry_run)
        async with self.pool.acquire() as conn:
            if dry_run:
                for policy in self.tables:
                    await self._table(conn, policy, report, create=create, prune=prune, dry_run=True)
                if prune and self.ledger is not None:
                    await self._prune_ledger(conn, self.ledger, report, dry_run=True)
                if prune and self.dead_letters is not None:
                    await self._prune_dead_letters(conn, self.dead_letters, report, dry_run=True)
                return report
            if not await self._lock(conn, wait_lock):
                report.skipped = True
                if self.metrics:
                    self.metrics.runs.labels("skipped").inc()
                log.info("partition maintenance skipped: another process holds the lock")
                return report
            try:
                # Every statement of the round, not only the DDL, gives up after lock_timeout.
                await conn.execute(f"SET lock_timeout = {self.lock_timeout_ms}")
                for policy in self.tables:
                    await self._table(conn, policy, report, create=create, prune=prune, dry_run=False)
                if prune and self.ledger is not None:
                    try:
                        await self._prune_ledger(conn, self.ledger, report, dry_run=False)
                    except asyncpg.LockNotAvailableError:
                        self._lock_timeout(report, self.ledger.table, "prune ledger")
                if prune and self.dead_letters is not None:
                    try:
                        await self._prune_dead_letters(conn, self.dead_letters, report, dry_run=False)
                    except asyncpg.LockNotAvailableError:
                        self._lock_timeout(report, self.dead_letters.table, "prune dead letters")
            finally:
                # A dead connection holds no lock; a live one is also reset (unlock_all) by the pool on release.
                with contextlib.suppress(Exception):
                    await conn.execute("SELECT pg_advisory_unlock($1)", self.lock_key)
        if self.metrics:
            self.metrics.runs.labels("ok").inc()
            self.metrics.last_success.set(time.time())
        if (report.created or report.detached or report.ledger_pruned or report.dead_letters_pruned
                or report.lock_timeouts or report.errors):
            log.info("partition maintenance", extra={
                "created": report.created, "dropped": report.dropped, "archived": report.archived,
                "exported": report.exported, "ledger_pruned": report.ledger_pruned,
                "dead_letters_pruned": report.dead_letters_pruned,
                "lock_timeouts": report.lock_timeouts, "errors": report.errors})
        return report

    async def _lock(self, conn: Conn, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.lock_key):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    async def _table(self, conn: Conn, policy: TablePolicy, report: MaintenanceReport, *, create: bool, prune: bool,
                     dry_run: bool) -> None:
        now = self.clock().astimezone(UTC)
        table = policy.table
        if create:
            try:
                await self._create(conn, policy, now, report, dry_run)
            except asyncpg.LockNotAvailableError:
                self._lock_timeout(report, table, "create")
        if prune:
            try:
                await self._prune(conn, policy, now, report, dry_run)
            except asyncpg.LockNotAvailableError:
                self._lock_timeout(report, table, "prune")
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")
                exists = await conn.fetchval("SELECT to_regclass($1)", ident(partitions.default_name(table)))
                rows = await partitions.default_rows(conn, table) if exists is not None else 0
        except asyncpg.LockNotAvailableError:
            self._lock_timeout(report, table, "count default")
        else:
            report.default_rows[table] = rows
            if self.metrics:
                self.metrics.default_rows.labels(table).set(rows)
            if rows:
                log.warning("rows in the DEFAULT partition (a missing partition or an out-of-window row)",
                            extra={"table": table, "rows": rows})
        if self.metrics and not dry_run:
            have = await partitions.existing(conn, table)  # catalog only: takes no table lock
            if have:
                self.metrics.ahead.labels(table).set((have[-1].end - now).total_seconds())

    async def _prune_ledger(self, conn: Conn, policy: LedgerPolicy, report: MaintenanceReport, *, dry_run: bool) -> None:
        """Roll the ledger's epochs (create ahead, open, drop past the window); names go to created/dropped."""
        done = await ledger.roll(conn, policy.table, window=policy.window, epochs=policy.epochs,
                                 now=self.clock().astimezone(UTC), lock_timeout_ms=self.lock_timeout_ms,
                                 dry_run=dry_run)
        report.created += done.created
        report.dropped += done.dropped
        report.ledger_pruned += done.keys_dropped
        if self.metrics and done.keys_dropped and not dry_run:
            self.metrics.ledger_pruned.inc(done.keys_dropped)

    async def _prune_dead_letters(self, conn: Conn, policy: DeadLetterPolicy, report: MaintenanceReport, *,
                                  dry_run: bool) -> None:
        """Delete dead letters created more than ``policy.retention`` ago, ``chunk`` per transaction."""
        cutoff = self.clock().astimezone(UTC) - policy.retention
        if dry_run:
            plan = await dlq.purge_plan(conn, policy.table, before=cutoff, keep_pending_after=cutoff)
            report.dead_letters_pruned = plan.deletable
            return
        report.dead_letters_pruned += await dlq.purge(
            conn, policy.table, before=cutoff, keep_pending_after=cutoff, chunk=policy.chunk,
            budget_s=policy.budget_s, lock_timeout_ms=self.lock_timeout_ms)

    def _lock_timeout(self, report: MaintenanceReport, table: str, step: str) -> None:
        report.lock_timeouts += 1
        if self.metrics:
            self.metrics.lock_timeouts.labels(table).inc()
        log.warning("partition DDL gave up on lock_timeout; retrying next round",
                    extra={"table": table, "step": step, "lock_timeout_ms": self.lock_timeout_ms})

    async def _create(self, conn: Conn, policy: TablePolicy, now: datetime, report: MaintenanceReport,
                      dry_run: bool) -> None:
        first, last = partitions.coverage(now, policy.retention, policy.premake)
        todo = partitions.plan(await partitions.existing(conn, policy.table), first, last, policy.granularity)
        for start, end in todo:
            name = partitions.partition_name(policy.table, start)
            if dry_run:
                report.created.append(name)
                continue
            try:
                moved = await partitions.create(conn, policy.table, start, end, lock_timeout_ms=self.lock_timeout_ms)
            except asyncpg.LockNotAvailableError:
                raise
            except asyncpg.PostgresError as exc:
                if _fatal(exc):
                    raise
                self._error(report, f"create {name}: {exc.sqlstate} {exc}")
                continue
            report.created.append(name)
            if moved:
                report.moved_from_default[name] = moved
                log.warning("moved rows from the DEFAULT partition into a new partition",
                            extra={"partition": name, "rows": moved})
            if self.metrics:
                self.metrics.actions.labels(policy.table, "created").inc()
        if not dry_run:
            await partitions.ensure_default(conn, policy.table, lock_timeout_ms=self.lock_timeout_ms)

    async def _prune(self, conn: Conn, policy: TablePolicy, now: datetime, report: MaintenanceReport, dry_run: bool) -> None:
        for part in partitions.expired(await partitions.existing(conn, policy.table), now, policy.retention):
            name = part.relname
            export = self._export_path(policy.table, part)
            if dry_run:
                report.detached.append(name)
                (report.archived if self.archive_schema else report.dropped).append(name)
                if export is not None:
                    report.exported.append(str(export))
                continue
            if export is not None:
                try:
                    await self._export(conn, part, export)
                except asyncpg.LockNotAvailableError:
                    raise
                except (OSError, asyncpg.PostgresError) as exc:
                    if isinstance(exc, asyncpg.PostgresError) and _fatal(exc):
                        raise
                    self._error(report, f"export {name} to {export}: {type(exc).__name__}: {exc}; kept")
                    continue
                report.exported.append(str(export))
            try:
                await partitions.detach(conn, policy.table, part, lock_timeout_ms=self.lock_timeout_ms,
                                        archive_schema=self.archive_schema)
            except asyncpg.LockNotAvailableError:
                raise
            except asyncpg.PostgresError as exc:
                if _fatal(exc):
                    raise
                self._error(report, f"detach {name}: {exc.sqlstate} {exc}")
                continue
            report.detached.append(name)
            action = "archived" if self.archive_schema else "dropped"
            getattr(report, action).append(name)
            if self.metrics:
                self.metrics.actions.labels(policy.table, action).inc()

    def _export_path(self, table: str, part: Partition) -> Path | None:
        if self.export_dir is None:
            return None
        return self.export_dir / f"{partitions.partition_name(table, part.start)}.csv.gz"

    async def _export(self, conn: Conn, part: Partition, path: Path) -> None:
        """COPY the partition as CSV (with header) into ``path`` (gzip), atomically (temporary name, fsync,
        rename). File writes run in a thread."""
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        raw: IO[bytes] = await asyncio.to_thread(open, tmp, "wb")
        try:
            gz = gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0)

            async def sink(chunk: bytes) -> None:
                await asyncio.to_thread(gz.write, chunk)

            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")
                await conn.copy_from_query(f"SELECT * FROM {ident(part.name)}", output=sink, format="csv",
                                           header=True)
            await asyncio.to_thread(_finish, gz, raw)
        except BaseException:
            await asyncio.to_thread(raw.close)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(tmp.unlink)
            raise
        await asyncio.to_thread(os.replace, tmp, path)

    def _error(self, report: MaintenanceReport, message: str) -> None:
        report.errors.append(message)
        log.error("partition maintenance step failed; retrying next round", extra={"detail": message[:500]})


def _finish(gz: gzip.GzipFile, raw: IO[bytes]) -> None:
    gz.close()
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()


def _fatal(exc: asyncpg.PostgresError) -> bool:
    """Connection loss and server shutdown end the round (retried as a whole); other errors skip one step."""
    state = exc.sqlstate or ""
    return state[:2] in ("08", "57", "53")
