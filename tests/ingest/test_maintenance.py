"""ingest.maintenance without services: one round against a fake catalog (a connection that records SQL and
answers the catalog queries of ingest.partitions). The lock, the order and transaction of each DDL statement,
lock timeouts and errors per step, dry runs, archive, export and the ledger's roll.
tests/integration/test_partitions.py runs the same module against a real Postgres."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest import ledger
from ingest.maintenance import LOCK_KEY, LedgerPolicy, Maintenance, MaintenanceReport, TablePolicy
from ingest.metrics import Metrics
from tests.fakes import Call, FakeConn, FakePool

TABLE = "ev"
NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
POLICY = TablePolicy(TABLE, "day", retention=timedelta(days=3), premake=timedelta(days=2))
# Covered: 2024-03-07 .. 2024-03-12; past retention: partitions ending at or before 2024-03-07 00:00.
HAVE = [date(2024, 3, d) for d in range(5, 11)]
CREATED = ["ev_p20240311", "ev_p20240312"]
EXPIRED = ["ev_p20240305", "ev_p20240306"]
LOCK_TIMEOUT = asyncpg.LockNotAvailableError("canceling statement due to lock timeout")


def bound(day: date) -> str:
    return f"FOR VALUES FROM ('{day} 00:00:00+00') TO ('{day + timedelta(days=1)} 00:00:00+00')"


class Catalog:
    """Answers like a database holding table ``ev`` partitioned by day, with a DEFAULT partition.

    ``fail`` maps a pattern to an exception: the first statement (or COPY query) matching it raises it."""

    def __init__(self, have: list[date] = HAVE) -> None:
        self.parts = {f"ev_p{d:%Y%m%d}": d for d in have}
        self.lock_free = [True]  # answers to pg_try_advisory_lock, in turn (the last one repeats)
        self.default_rows = 0
        self.moved = 0
        self.export = [b"id,received_at\n", b"1,2024-03-05\n"]
        self.fail: dict[str, BaseException] = {}
        self.conn = FakeConn(self.answer)
        self.metrics = Metrics()  # the metrics of every Maintenance made by ``maintenance``

    def answer(self, call: Call) -> Any:
        sql = call.sql
        for pattern, exc in list(self.fail.items()):
            if re.search(pattern, sql):
                del self.fail[pattern]
                raise exc
        if "pg_try_advisory_lock" in sql:
            return self.lock_free.pop(0) if len(self.lock_free) > 1 else self.lock_free[0]
        if "FROM pg_inherits" in sql:
            return [(f"public.{name}", bound(day)) for name, day in self.parts.items()]
        if "FROM pg_partitioned_table" in sql:
            return "received_at"
        if "FROM pg_attribute" in sql:
            return [("id",), ("received_at",)]
        if "to_regclass" in sql:
            return "ev_default"
        if sql.startswith("SELECT count(*) FROM") and "ev_default" in sql:
            return self.default_rows
        if sql.startswith("WITH moved AS"):
            return f"INSERT 0 {self.moved}"
        if m := re.search(r'ATTACH PARTITION "(\w+)" FOR VALUES FROM \(\'(\d{4}-\d\d-\d\d)', sql):
            self.parts[m.group(1)] = date.fromisoformat(m.group(2))
        if m := re.search(r'DETACH PARTITION "public"\."(\w+)"', sql):
            del self.parts[m.group(1)]
        if call.method == "copy_from_query":
            return self.export
        return "OK"


def maintenance(catalog: Catalog, **kw: Any) -> Maintenance:
    kw.setdefault("metrics", catalog.metrics)
    return Maintenance(FakePool(catalog.conn), [kw.pop("policy", POLICY)], clock=lambda: NOW,  # type: ignore[arg-type]
                       **kw)


def sample(catalog: Catalog, name: str, **labels: str) -> float | None:
    return catalog.metrics.registry.get_sample_value(name, labels)


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def ddl(conn: FakeConn) -> list[str]:
    """Statements that change the schema, in order."""
    return [s for s in conn.statements("execute") if s.startswith(("CREATE", "ALTER", "DROP"))]


def transaction_of(conn: FakeConn, index: int) -> list[Call]:
    """The statements of the innermost transaction containing ``conn.calls[index]``."""
    depth, start = 0, index
    while start > 0:
        start -= 1
        kind = conn.calls[start].method
        if kind in ("commit", "rollback"):
            depth += 1
        elif kind == "begin":
            if depth == 0:
                break
            depth -= 1
    else:
        return []
    return conn.calls[start + 1:index + 1]


# -- a round ----------------------------------------------------------------------------------------------------
async def test_a_round_creates_ahead_and_drops_past_retention() -> None:
    catalog = Catalog()
    m = maintenance(catalog)
    report = await m.run_once()
    assert report == MaintenanceReport(created=CREATED, detached=EXPIRED, dropped=EXPIRED, default_rows={TABLE: 0})
    assert sorted(catalog.parts) == [f"ev_p202403{d:02}" for d in range(7, 13)]
    assert ddl(catalog.conn) == [
        'CREATE TABLE "ev_p20240311" (LIKE "ev" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED '
        "INCLUDING STORAGE INCLUDING COMPRESSION)",
        """ALTER TABLE "ev" ATTACH PARTITION "ev_p20240311" FOR VALUES FROM ('2024-03-11T00:00:00+00:00') """
        "TO ('2024-03-12T00:00:00+00:00')",
        'CREATE TABLE "ev_p20240312" (LIKE "ev" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED '
        "INCLUDING STORAGE INCLUDING COMPRESSION)",
        """ALTER TABLE "ev" ATTACH PARTITION "ev_p20240312" FOR VALUES FROM ('2024-03-12T00:00:00+00:00') """
        "TO ('2024-03-13T00:00:00+00:00')",
        'ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240305"', 'DROP TABLE "public"."ev_p20240305"',
        'ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240306"', 'DROP TABLE "public"."ev_p20240306"']


async def test_the_round_runs_under_the_advisory_lock_and_a_session_lock_timeout() -> None:
    catalog = Catalog()
    await maintenance(catalog, lock_timeout_ms=1500).run_once()
    calls = catalog.conn.calls
    assert (calls[0].sql, calls[0].args) == ("SELECT pg_try_advisory_lock($1)", (LOCK_KEY,))
    assert calls[1].sql == "SET lock_timeout = 1500"
    assert (calls[-1].sql, calls[-1].args) == ("SELECT pg_advisory_unlock($1)", (LOCK_KEY,))


async def test_each_ddl_statement_and_the_default_count_run_in_a_transaction_under_a_local_lock_timeout() -> None:
    catalog = Catalog()
    await maintenance(catalog, lock_timeout_ms=1500).run_once()
    calls = catalog.conn.calls
    ddl_at = [i for i, c in enumerate(calls) if c.method == "execute" and c.sql.startswith(("CREATE", "ALTER", "DROP"))]
    assert len(ddl_at) == 8
    for i in ddl_at:
        block = transaction_of(catalog.conn, i)
        assert block and block[0].sql == "SET LOCAL lock_timeout = 1500", calls[i].sql
    count = next(i for i, c in enumerate(calls) if c.sql == 'SELECT count(*) FROM "ev_default"')
    assert transaction_of(catalog.conn, count)[0].sql == "SET LOCAL lock_timeout = 1500"  # reads wait no longer
    # one transaction per partition: created, or detached and dropped, together
    assert [c.method for c in calls].count("begin") == len(CREATED) + len(EXPIRED) + 1  # + the DEFAULT count


async def test_metrics_of_a_round() -> None:
    catalog = Catalog()
    await maintenance(catalog).run_once()
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") == 1
    assert sample(catalog, "ingest_partition_changes_total", table=TABLE, action="created") == 2
    assert sample(catalog, "ingest_partition_changes_total", table=TABLE, action="dropped") == 2
    assert sample(catalog, "ingest_partition_coverage_ahead_seconds", table=TABLE) == 2.5 * 86400  # 03-13 00:00 - now
    assert (sample(catalog, "ingest_partition_maintenance_last_success_timestamp_seconds") or 0) > 0


async def test_nothing_to_do_changes_nothing() -> None:
    catalog = Catalog(have=[date(2024, 3, d) for d in range(7, 13)])
    report = await maintenance(catalog).run_once()
    assert report == MaintenanceReport(default_rows={TABLE: 0})
    assert ddl(catalog.conn) == []


# -- the lock ---------------------------------------------------------------------------------------------------
async def test_a_round_is_skipped_while_another_process_holds_the_lock() -> None:
    catalog = Catalog()
    catalog.lock_free = [False]
    m = maintenance(catalog)
    report = await m.run_once()
    assert report.skipped and report.created == [] and report.detached == []
    assert catalog.conn.statements() == ["SELECT pg_try_advisory_lock($1)"]  # and no unlock of a lock not held
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="skipped") == 1
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") is None


async def test_wait_lock_keeps_trying_the_lock() -> None:
    catalog = Catalog()
    catalog.lock_free = [False, False, True]
    report = await maintenance(catalog).run_once(wait_lock=5)
    assert not report.skipped and report.created == CREATED
    assert catalog.conn.statements().count("SELECT pg_try_advisory_lock($1)") == 3


# -- lock timeouts and errors -----------------------------------------------------------------------------------
async def test_a_lock_timeout_while_creating_stops_creating_and_the_round_goes_on() -> None:
    catalog = Catalog()
    catalog.fail["^ALTER TABLE .* ATTACH"] = LOCK_TIMEOUT
    m = maintenance(catalog)
    report = await m.run_once()
    assert report.lock_timeouts == 1 and report.created == [] and report.errors == []
    assert [s.split(" (")[0] for s in ddl(catalog.conn) if "ev_p2024031" in s] == [  # the next one is not tried
        'CREATE TABLE "ev_p20240311"', 'ALTER TABLE "ev" ATTACH PARTITION "ev_p20240311" FOR VALUES FROM']
    assert report.dropped == EXPIRED  # pruning still ran
    assert sample(catalog, "ingest_partition_lock_timeouts_total", table=TABLE) == 1
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") == 1


async def test_a_lock_timeout_while_detaching_stops_pruning_and_the_round_goes_on() -> None:
    catalog = Catalog()
    catalog.fail["DETACH PARTITION"] = LOCK_TIMEOUT
    report = await maintenance(catalog).run_once()
    assert report.lock_timeouts == 1 and report.detached == [] and report.dropped == []
    assert [s for s in ddl(catalog.conn) if "DETACH" in s] == ['ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240305"']
    assert report.created == CREATED and report.default_rows == {TABLE: 0}


async def test_a_lock_timeout_while_counting_default_rows_is_counted() -> None:
    catalog = Catalog()
    catalog.fail[r"SELECT count\(\*\) FROM \"ev_default\""] = LOCK_TIMEOUT
    report = await maintenance(catalog).run_once()
    assert report.lock_timeouts == 1 and report.default_rows == {}


async def test_another_error_skips_one_partition_and_is_reported() -> None:
    catalog = Catalog()
    catalog.fail['^CREATE TABLE "ev_p20240311"'] = asyncpg.DuplicateTableError('relation "ev_p20240311" already exists')
    catalog.fail[r'DROP TABLE "public"\."ev_p20240305"'] = asyncpg.InsufficientPrivilegeError("must be owner")
    report = await maintenance(catalog).run_once()
    assert report.created == ["ev_p20240312"]
    assert report.detached == report.dropped == ["ev_p20240306"]
    assert report.errors == ['create ev_p20240311: 42P07 relation "ev_p20240311" already exists',
                             "detach ev_p20240305: 42501 must be owner"]


@pytest.mark.parametrize("error", [asyncpg.AdminShutdownError("terminating connection"),
                                   asyncpg.exceptions.ConnectionFailureError("connection lost"),
                                   asyncpg.exceptions.DiskFullError("no space left on device")],
                         ids=lambda e: e.sqlstate)
async def test_losing_the_server_ends_the_round_and_releases_the_lock(error: asyncpg.PostgresError) -> None:
    catalog = Catalog()
    catalog.fail["^CREATE TABLE"] = error
    m = maintenance(catalog)
    with pytest.raises(type(error)):
        await m.run_once()
    assert catalog.conn.statements()[-1] == "SELECT pg_advisory_unlock($1)"
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") is None


async def test_a_failing_unlock_is_not_an_error() -> None:
    catalog = Catalog()
    catalog.fail["pg_advisory_unlock"] = ConnectionResetError("gone")
    report = await maintenance(catalog).run_once()
    assert report.created == CREATED


# -- dry run, archive, DEFAULT ----------------------------------------------------------------------------------
async def test_dry_run_reports_without_locking_or_changing_anything(rolls: list[dict[str, Any]]) -> None:
    catalog = Catalog()
    m = maintenance(catalog, ledger=LedgerPolicy("led", window=timedelta(days=30)))
    report = await m.run_once(dry_run=True)
    assert report == MaintenanceReport(created=[*CREATED, "led_e2"], detached=EXPIRED, dropped=[*EXPIRED, "led_e0"],
                                       default_rows={TABLE: 0}, ledger_pruned=12, dry_run=True)
    assert [r["dry_run"] for r in rolls] == [True]
    assert ddl(catalog.conn) == []
    assert not any("advisory" in s or "DELETE" in s for s in catalog.conn.statements())
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") is None


async def test_archive_moves_expired_partitions_to_the_archive_schema() -> None:
    catalog = Catalog()
    m = maintenance(catalog, archive=True, archive_schema="old")
    report = await m.run_once()
    assert report.archived == report.detached == EXPIRED and report.dropped == []
    assert ddl(catalog.conn)[4:] == [
        'ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240305"', 'CREATE SCHEMA IF NOT EXISTS "old"',
        'ALTER TABLE "public"."ev_p20240305" SET SCHEMA "old"',
        'ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240306"', 'CREATE SCHEMA IF NOT EXISTS "old"',
        'ALTER TABLE "public"."ev_p20240306" SET SCHEMA "old"']
    assert sample(catalog, "ingest_partition_changes_total", table=TABLE, action="archived") == 2


async def test_rows_in_default_are_counted_and_moved_into_new_partitions(caplog: pytest.LogCaptureFixture) -> None:
    catalog = Catalog()
    catalog.default_rows, catalog.moved = 3, 4
    caplog.set_level(logging.WARNING, logger="ingest.maintenance")
    report = await maintenance(catalog).run_once()
    assert report.default_rows == {TABLE: 3}
    assert report.moved_from_default == {"ev_p20240311": 4, "ev_p20240312": 4}
    assert sample(catalog, "ingest_default_partition_rows", table=TABLE) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "rows in the DEFAULT partition (a missing partition or an out-of-window row)" in messages
    assert messages.count("moved rows from the DEFAULT partition into a new partition") == 2


# -- the dedupe ledger ------------------------------------------------------------------------------------------
# What a roll does to a real ledger is tested in tests/integration/test_ledger.py; here, how a round uses it.
@pytest.fixture
def rolls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    async def roll(conn: Any, table: str, **kw: Any) -> ledger.Roll:
        calls.append({"table": table, **kw})
        return ledger.Roll(created=["led_e2"], dropped=["led_e0"], keys_dropped=12)

    monkeypatch.setattr(ledger, "roll", roll)
    return calls


async def test_a_round_rolls_the_ledger_with_its_policy_and_counts_the_dropped_keys(
        rolls: list[dict[str, Any]]) -> None:
    catalog = Catalog()
    report = await maintenance(catalog, ledger=LedgerPolicy("led", window=timedelta(days=30), epochs=3)).run_once()
    assert rolls == [{"table": "led", "window": timedelta(days=30), "epochs": 3, "now": NOW,
                      "lock_timeout_ms": 2000, "dry_run": False}]
    assert "led_e2" in report.created and "led_e0" in report.dropped and report.ledger_pruned == 12
    assert sample(catalog, "ingest_ledger_pruned_total") == 12


async def test_the_ledger_is_not_rolled_without_prune_and_a_lock_timeout_waits_for_the_next_round(
        rolls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = Catalog()
    policy = LedgerPolicy("led", window=timedelta(days=30))
    assert (await maintenance(catalog, ledger=policy).run_once(prune=False)).ledger_pruned == 0
    assert rolls == []

    async def timeout(conn: Any, table: str, **kw: Any) -> ledger.Roll:
        raise LOCK_TIMEOUT

    monkeypatch.setattr(ledger, "roll", timeout)
    report = await maintenance(catalog, ledger=policy).run_once()
    assert report.lock_timeouts == 1 and report.ledger_pruned == 0 and report.dropped == EXPIRED


# -- export -----------------------------------------------------------------------------------------------------
async def test_export_writes_a_gzip_csv_before_detaching(tmp_path: Path) -> None:
    catalog = Catalog()
    report = await maintenance(catalog, export_dir=tmp_path / "exports").run_once()
    files = [tmp_path / "exports" / f"{name}.csv.gz" for name in EXPIRED]
    assert report.exported == [str(f) for f in files] and report.dropped == EXPIRED
    assert listing(tmp_path / "exports") == [f.name for f in files]  # no .partial file left
    assert gzip.decompress(files[0].read_bytes()) == b"id,received_at\n1,2024-03-05\n"
    statements = catalog.conn.statements()
    copy = statements.index('SELECT * FROM "public"."ev_p20240305"')
    assert copy < statements.index('ALTER TABLE "ev" DETACH PARTITION "public"."ev_p20240305"')
    call = next(c for c in catalog.conn.calls if c.method == "copy_from_query")
    assert call.args == ({"format": "csv", "header": True},)
    assert transaction_of(catalog.conn, catalog.conn.calls.index(call))[0].sql == "SET LOCAL lock_timeout = 2000"


def assert_kept(report: MaintenanceReport, catalog: Catalog, export_dir: Path) -> None:
    assert report.detached == ["ev_p20240306"] and "ev_p20240305" in catalog.parts
    assert len(report.errors) == 1 and report.errors[0].startswith(f"export ev_p20240305 to {export_dir}")
    assert report.errors[0].endswith("; kept")
    assert listing(export_dir) == ["ev_p20240306.csv.gz"]  # no partial file left


async def test_a_partition_whose_copy_fails_is_kept(tmp_path: Path) -> None:
    catalog = Catalog()
    catalog.fail[r'^SELECT \* FROM "public"\."ev_p20240305"'] = asyncpg.InsufficientPrivilegeError("permission denied")
    report = await maintenance(catalog, export_dir=tmp_path).run_once()
    assert_kept(report, catalog, tmp_path)


async def test_a_partition_whose_file_cannot_be_written_is_kept(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = Catalog()
    real, writes = gzip.GzipFile.write, 0

    def write(self: gzip.GzipFile, data: Any) -> int:
        nonlocal writes
        writes += 1
        if writes == 2:  # the first partition's second chunk
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", write)
    report = await maintenance(catalog, export_dir=tmp_path).run_once()
    assert_kept(report, catalog, tmp_path)


# -- run_forever ------------------------------------------------------------------------------------------------
async def test_run_forever_counts_failed_rounds_and_goes_on_until_stopped() -> None:
    catalog = Catalog()
    stop = asyncio.Event()
    rounds = 0

    def answer(call: Call) -> Any:
        nonlocal rounds
        if "pg_try_advisory_lock" in call.sql:
            rounds += 1
            if rounds == 3:
                stop.set()
            if rounds < 3:
                raise ConnectionResetError("connection reset")
        return catalog.answer(call)

    catalog.conn.answer = answer
    m = maintenance(catalog, interval=0.01)
    await asyncio.wait_for(m.run_forever(stop), 5)
    assert rounds == 3
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="failed") == 2
    assert sample(catalog, "ingest_partition_maintenance_runs_total", result="ok") == 1
