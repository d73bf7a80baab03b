"""ingest.migrate without services: migrations applied once each, in version order, one transaction each, under
an advisory lock that is always released; the database created only when missing (fake asyncpg.connect)."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from ingest import migrate
from tests.fakes import Call, FakeConn

MIGRATIONS = [(3, "quotas", "CREATE TABLE q ()"), (1, "base", "CREATE TABLE a ()"), (2, "ledger", "CREATE TABLE l ()")]


def database(done: set[int], failing: str | None = None) -> FakeConn:
    """A connection to a database where versions ``done`` are recorded; executing ``failing`` fails."""

    def answer(call: Call) -> Any:
        if call.sql == failing:
            raise asyncpg.exceptions.DuplicateTableError(f'relation "{failing}" already exists')
        if call.method == "fetch" and "FROM ingest_schema_migrations" in call.sql:
            return [(v,) for v in sorted(done)]
        return "OK"

    return FakeConn(answer)


def steps(conn: FakeConn) -> list[str]:
    out = []
    for c in conn.calls:
        if c.method in ("begin", "commit", "rollback"):
            out.append(c.method)
        elif "pg_advisory_lock" in c.sql or "pg_advisory_unlock" in c.sql:
            out.append(f"{c.sql.split('(')[0].split()[-1]} {c.args[0]:#x}")
        elif "CREATE TABLE IF NOT EXISTS ingest_schema_migrations" in c.sql:
            out.append("create ledger")
        elif "INSERT INTO ingest_schema_migrations" in c.sql:
            out.append(f"record {c.args}")
        elif c.method == "fetch":
            out.append("read versions")
        else:
            out.append(c.sql)
    return out


async def test_pending_migrations_run_in_version_order_one_transaction_each_under_the_lock(
        caplog: pytest.LogCaptureFixture) -> None:
    conn = database(done={1})
    caplog.set_level(logging.INFO, logger="ingest.migrate")
    assert await migrate.apply(conn, MIGRATIONS) == [2, 3]  # type: ignore[arg-type]
    assert steps(conn) == [
        "pg_advisory_lock 0x1e570001", "create ledger", "read versions",
        "begin", "CREATE TABLE l ()", "record (2, 'ledger')", "commit",
        "begin", "CREATE TABLE q ()", "record (3, 'quotas')", "commit",
        "pg_advisory_unlock 0x1e570001"]
    assert [(r.getMessage(), r.version) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("migration applied", 2), ("migration applied", 3)]


async def test_nothing_to_do_takes_and_releases_the_lock_only() -> None:
    conn = database(done={1, 2, 3})
    assert await migrate.apply(conn, MIGRATIONS) == []  # type: ignore[arg-type]
    assert steps(conn) == ["pg_advisory_lock 0x1e570001", "create ledger", "read versions",
                           "pg_advisory_unlock 0x1e570001"]


async def test_a_failing_migration_is_rolled_back_alone_and_the_lock_released() -> None:
    conn = database(done=set(), failing="CREATE TABLE l ()")
    with pytest.raises(asyncpg.exceptions.DuplicateTableError):
        await migrate.apply(conn, MIGRATIONS)  # type: ignore[arg-type]
    assert steps(conn)[3:] == ["begin", "CREATE TABLE a ()", "record (1, 'base')", "commit",
                               "begin", "CREATE TABLE l ()", "rollback", "pg_advisory_unlock 0x1e570001"]
    recorded = [c.args for c in conn.committed if "INSERT INTO ingest_schema_migrations" in c.sql]
    assert recorded == [(1, "base")]


# -- create_database_if_missing ---------------------------------------------------------------------------------
class Server:
    """Stands in for ``asyncpg.connect``: databases in ``existing`` accept connections, others do not exist."""

    def __init__(self, existing: set[str], create_error: BaseException | None = None) -> None:
        self.existing, self.create_error = existing, create_error
        self.connections: list[tuple[str, FakeConn]] = []

    def answer(self, call: Call) -> Any:
        if call.sql.startswith("CREATE DATABASE") and self.create_error is not None:
            raise self.create_error
        return "OK"

    async def connect(self, url: str) -> FakeConn:
        name = url.split("?")[0].rsplit("/", 1)[1]
        if name not in self.existing:
            raise asyncpg.InvalidCatalogNameError(f'database "{name}" does not exist')
        conn = FakeConn(self.answer)
        self.connections.append((url, conn))
        return conn


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Server:
    server = Server({"postgres"})
    monkeypatch.setattr(asyncpg, "connect", server.connect)
    return server


URL = "postgresql://ingest:pw@db.internal:5432/ingest-test?sslmode=require"


async def test_an_existing_database_is_left_alone(server: Server) -> None:
    server.existing.add("ingest-test")
    assert await migrate.create_database_if_missing(URL) is False
    [(url, conn)] = server.connections
    assert url == URL and conn.statements() == [] and conn.calls[-1].method == "close"


async def test_a_missing_database_is_created_from_the_postgres_database(server: Server) -> None:
    assert await migrate.create_database_if_missing(URL) is True
    [(url, admin)] = server.connections
    assert url == "postgresql://ingest:pw@db.internal:5432/postgres?sslmode=require"
    assert admin.statements() == ['CREATE DATABASE "ingest-test"']
    assert admin.calls[-1].method == "close"


async def test_a_database_created_concurrently_is_not_an_error(server: Server) -> None:
    server.create_error = asyncpg.DuplicateDatabaseError('database "ingest-test" already exists')
    assert await migrate.create_database_if_missing(URL) is False
    [(_, admin)] = server.connections
    assert admin.calls[-1].method == "close"


async def test_other_creation_errors_propagate_and_close_the_admin_connection(server: Server) -> None:
    server.create_error = asyncpg.InsufficientPrivilegeError("permission denied to create database")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await migrate.create_database_if_missing(URL)
    [(_, admin)] = server.connections
    assert admin.calls[-1].method == "close"


async def test_a_url_without_a_database_name_connects_nowhere(server: Server) -> None:
    assert await migrate.create_database_if_missing("postgresql://ingest:pw@db.internal:5432") is False
    assert await migrate.create_database_if_missing("postgresql://ingest:pw@db.internal:5432/") is False
    assert server.connections == []
