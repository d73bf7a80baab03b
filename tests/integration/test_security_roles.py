"""Least-privilege roles and tenant isolation against the real Postgres (docs/security.md).

``ingest migrate --roles`` creates an owner, a writer and a reader with a per-test prefix (roles are
cluster-global); every test drops them afterwards. The consumer runs as the writer, maintenance as the owner,
and the reader is checked by every path we know of: parent, partitions, DEFAULT, archive, no tenant, a setting
left over from an earlier transaction, RESET, SET ROLE, row_security=off, a leaky WHERE, statistics, COPY TO,
prepared statements.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from consumers import quotas, run, streams
from ingest import partitions, roles
from ingest.config import Config
from ingest.maintenance import Maintenance
from ingest.services import create_pool
from ingest.sql import ident
from tests.integration.conftest import PG_ADMIN
from tests.integration.helpers import drain, kill9, publish, publish_raw, spawn_consumer

NOW = datetime.now(UTC)
TABLES = [s.table for s in streams.STREAMS.values()]
PRIVATE = ["dead_letters", "dedupe_ledger", "dedupe_ledger_epochs", "consumer_offsets", "offset_changes", "quota_overrides",
           "quota_overrides_version", "ingest_schema_migrations"]


def as_user(url: str, user: str) -> str:
    """``url`` with its user replaced (the test cluster trusts 127.0.0.1, so no password is needed)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))


@dataclass
class Secured:
    """A migrated database with roles; ``config``/``env`` run the consumer as the writer, maintenance as the owner."""

    roles: roles.Roles
    admin: Config  # root (superuser), as the fixture migrated it
    config: Config
    env: dict[str, str]

    def url(self, role: str) -> str:
        return as_user(self.admin.database_url, role)

    async def connect(self, role: str) -> asyncpg.Connection:
        return await asyncpg.connect(self.url(role))


async def drop_roles(database_url: str, r: roles.Roles) -> None:
    """``REASSIGN OWNED`` + ``DROP OWNED`` in the test database (also revokes database privileges), then DROP ROLE."""
    names = [r.owner, r.writer, r.reader]
    conn = await asyncpg.connect(database_url)
    try:
        present = [n for (n,) in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", names)]
        if present:
            listed = ", ".join(ident(n) for n in present)
            await conn.execute(f"REASSIGN OWNED BY {listed} TO CURRENT_USER")
            await conn.execute(f"DROP OWNED BY {listed}")
    finally:
        await conn.close()
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        for n in names:
            await admin.execute(f"DROP ROLE IF EXISTS {ident(n)}")
    finally:
        await admin.close()


@pytest.fixture
async def secured(config: Config, env: dict[str, str]) -> AsyncIterator[Secured]:
    """The fixture migrated as root (objects owned by root): ``migrate --roles`` hands them over."""
    r = roles.Roles.from_prefix(f"t{uuid.uuid4().hex[:12]}")
    try:
        await run.run_migrations(config, r)
        writer, owner = as_user(config.database_url, r.writer), as_user(config.database_url, r.owner)
        cfg = dataclasses.replace(config, database_url=writer, maintenance_database_url=owner)
        yield Secured(r, config, cfg, {**env, "INGEST_DATABASE_URL": writer,
                                       "INGEST_MAINTENANCE_DATABASE_URL": owner})
    finally:
        await drop_roles(config.database_url, r)


def webhook(tenant: str, key: str, occurred: datetime = NOW, **extra: Any) -> dict[str, Any]:
    return {"tenant_id": tenant, "idempotency_key": key, "event_type": "invoice.paid", "source": "stripe",
            "occurred_at": occurred.isoformat(), "payload": {"n": key}, **extra}


def audit(tenant: str, key: str, occurred: datetime = NOW) -> dict[str, Any]:
    return {"tenant_id": tenant, "idempotency_key": key, "action": "user.login", "actor_id": "u-1",
            "occurred_at": occurred.isoformat(), "resource": "api_key:1", "ip": "10.0.0.1", "metadata": {"k": 1}}


def row(stream: str, tenant: str, key: str, occurred: datetime) -> tuple[Any, ...]:
    """A COPY row for ``stream``'s table (jsonb as JSON bytes, see ingest.services)."""
    if stream == "webhook":
        head: tuple[Any, ...] = (tenant, key, "invoice.paid", "stripe", occurred, b'{"a": 1}', None)
    else:
        head = (tenant, key, "user.login", "u-1", occurred, "api_key:1", "10.0.0.1", b'{"m": 1}')
    return (*head, NOW, 0, 0)


async def copy_rows(pool: asyncpg.Pool, stream: str, rows: list[tuple[Any, ...]]) -> None:
    s = streams.STREAMS[stream]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(s.table, records=rows, columns=s.tables().columns)


async def denied(conn: asyncpg.Connection, sql: str, *args: Any) -> None:
    """``sql`` must fail with insufficient privilege (42501)."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(sql, *args)


# -- the roles themselves -------------------------------------------------------------------------------------

async def privileges(conn: asyncpg.Connection, r: roles.Roles) -> dict[tuple[str, str], set[str]]:
    """Effective table privileges of the writer and reader on every ingest table (column-level UPDATE shown as
    ``UPDATE(col)``)."""
    rels = [n for (n,) in await conn.fetch(
        """SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname IN ('public', 'archive') AND c.relkind IN ('r', 'p') ORDER BY 1""")]
    out: dict[tuple[str, str], set[str]] = {}
    for role in (r.writer, r.reader):
        for rel in rels:
            have = {p for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
                    if await conn.fetchval("SELECT has_table_privilege($1, $2::regclass, $3)", role, rel, p)}
            have |= {f"UPDATE({c})" for (c,) in await conn.fetch(
                """SELECT attname FROM pg_attribute WHERE attrelid = $2::regclass AND attnum > 0
                   AND NOT attisdropped AND has_column_privilege($1, attrelid, attnum, 'UPDATE')""", role, rel)
                if "UPDATE" not in have}
            if have:
                out[(role, rel)] = have
    return out


def expected_privileges(r: roles.Roles) -> dict[tuple[str, str], set[str]]:
    return {
        (r.writer, "webhook_events"): {"INSERT"},
        (r.writer, "audit_events"): {"INSERT"},
        (r.writer, "dedupe_ledger"): {"SELECT", "INSERT", "DELETE"},
        (r.writer, "dedupe_ledger_epochs"): {"SELECT", "UPDATE(opened_at)"},
        (r.writer, "dead_letters"): {"INSERT"},
        (r.writer, "consumer_offsets"): {"SELECT", "INSERT", "UPDATE(next_offset)", "UPDATE(updated_at)"},
        (r.writer, "offset_changes"): {"INSERT"},
        (r.writer, "quota_overrides"): {"SELECT"},
        (r.writer, "quota_overrides_version"): {"SELECT"},
        (r.reader, "webhook_events"): {"SELECT"},
        (r.reader, "audit_events"): {"SELECT"},
    }


async def snapshot(conn: asyncpg.Connection) -> list[Any]:
    """Owners and ACLs of the database, schemas, relations, columns and functions."""
    return [tuple(x) for x in await conn.fetch(
        """SELECT 'db', datname, pg_get_userbyid(datdba), datacl::text FROM pg_database
           WHERE datname = current_database()
           UNION ALL SELECT 'schema', nspname, pg_get_userbyid(nspowner), nspacl::text FROM pg_namespace
           WHERE nspname IN ('public', 'archive')
           UNION ALL SELECT 'rel', c.oid::regclass::text, pg_get_userbyid(c.relowner), c.relacl::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname IN ('public', 'archive') AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
           UNION ALL SELECT 'col', a.attrelid::regclass::text || '.' || a.attname, '', a.attacl::text
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           WHERE c.relnamespace = 'public'::regnamespace AND a.attacl IS NOT NULL
           UNION ALL SELECT 'fn', p.oid::regprocedure::text, pg_get_userbyid(p.proowner), p.proacl::text
           FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
           ORDER BY 1, 2""")]


async def role_attributes(conn: asyncpg.Connection, r: roles.Roles) -> dict[str, tuple[bool, ...]]:
    rows = await conn.fetch(
        """SELECT rolname, rolcanlogin, rolbypassrls, rolsuper, rolcreaterole, rolcreatedb, rolreplication
           FROM pg_roles WHERE rolname = ANY($1)""", [r.owner, r.writer, r.reader])
    return {x[0]: tuple(x[1:]) for x in rows}


async def test_migrate_roles_hands_everything_to_the_owner_grants_the_minimum_and_is_idempotent(
        secured: Secured, db: asyncpg.Connection) -> None:
    r = secured.roles
    assert await role_attributes(db, r) == {
        r.owner: (True, False, False, False, False, False),
        r.writer: (True, True, False, False, False, False),  # BYPASSRLS on the login role itself
        r.reader: (True, False, False, False, False, False),
    }
    before = await snapshot(db)
    owners = {(kind, owner) for kind, _, owner, _ in before if kind != "col"}
    assert owners <= {("db", r.owner), ("schema", "pg_database_owner"), ("rel", r.owner), ("fn", r.owner)}
    assert ("rel", r.owner) in owners and ("db", r.owner) in owners
    assert await privileges(db, r) == expected_privileges(r)
    assert not await db.fetchval("SELECT count(*) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                                 "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = ANY($1)",
                                 [r.owner, r.writer, r.reader])

    # Rerunning changes nothing.
    report = roles.RoleChanges()
    assert await run.run_migrations(secured.admin, r, None, report) == []
    assert (report.created, report.altered, report.handed_over) == ([], [], [])
    assert await snapshot(db) == before

    # Drift (an attribute, extra grants, an object created by someone else) converges back.
    await db.execute(f"ALTER ROLE {ident(r.writer)} NOBYPASSRLS CREATEDB")
    await db.execute(f"GRANT SELECT, DELETE ON webhook_events, dead_letters TO {ident(r.writer)}, {ident(r.reader)}")
    await db.execute(f"GRANT UPDATE (digest) ON dedupe_ledger TO {ident(r.writer)}")
    await db.execute("CREATE TABLE stray (a int)")  # owned by root
    report = roles.RoleChanges()
    await run.run_migrations(secured.admin, r, None, report)
    assert report.altered == [r.writer] and report.handed_over == ["table stray"]
    assert await db.fetchval("DROP TABLE stray") is None
    assert await snapshot(db) == before
    assert await privileges(db, r) == expected_privileges(r)

    # An upgrade run as the owner itself (nothing about the roles to change) works too.
    as_owner = dataclasses.replace(secured.admin, maintenance_database_url=secured.url(r.owner))
    report = roles.RoleChanges()
    await run.run_migrations(as_owner, r, None, report)
    assert (report.created, report.altered, report.handed_over) == ([], [], [])
    assert await snapshot(db) == before
    # ...but it cannot change its own attributes (that needs a superuser), and says so.
    await db.execute(f"ALTER ROLE {ident(r.owner)} CREATEDB")
    with pytest.raises(roles.RoleError, match="needs changes"):
        await run.run_migrations(as_owner, r)


async def test_migrate_roles_on_a_fresh_database_from_the_cli(env: dict[str, str], tmp_path: Path) -> None:
    """``ingest migrate --roles P --writer-password-file F`` as a superuser on a database that does not exist."""
    r = roles.Roles.from_prefix(f"t{uuid.uuid4().hex[:12]}")
    url = env["INGEST_DATABASE_URL"] + "_fresh"
    secret = tmp_path / "writer.pw"
    secret.write_text("correct horse battery staple\n")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumers.cli", "migrate", "--roles", r.owner.removesuffix("_owner"),
            "--writer-password-file", str(secret), env={**os.environ, **env, "INGEST_DATABASE_URL": url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert f"created: {r.owner}, {r.writer}, {r.reader}" in out.decode()
        conn = await asyncpg.connect(url)
        try:
            kinds = {(kind, owner) for kind, _, owner, _ in await snapshot(conn) if kind != "col"}
            assert kinds == {("db", r.owner), ("schema", "pg_database_owner"), ("rel", r.owner), ("fn", r.owner)}
            assert await privileges(conn, r) == expected_privileges(r)
            verifier = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", r.writer)
            salt = verifier.split("$")[1].split(":")[1]
            assert verifier == roles.scram_verifier("correct horse battery staple", salt=base64.b64decode(salt))
            assert await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", r.reader) is None
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {ident(url.rsplit('/', 1)[1])} WITH (FORCE)")
        finally:
            await admin.close()
        await drop_roles(PG_ADMIN, r)


# -- the writer -------------------------------------------------------------------------------------------------

async def test_consumer_as_writer_stores_dedupes_dead_letters_and_applies_quotas(
        secured: Secured, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    """Only the writer's URL (no owner credentials in the pod): partitions it would create ahead are skipped with
    a warning, everything else works."""
    owner = await create_pool(secured.url(secured.roles.owner), max_size=1)
    try:
        async with owner.acquire() as conn:  # `ingest quota set capped --per-day 2` (as the owner)
            await quotas.set_override(conn, "capped", per_day=2)
    finally:
        await owner.close()
    hooks = [webhook(t, f"k{i}") for t in ("acme", "globex") for i in range(5)]
    hooks += [webhook("capped", f"c{i}") for i in range(4)] + [webhook("acme", "k0")]  # over quota, duplicate
    await publish(secured.config, "webhook", hooks)
    await publish(secured.config, "audit", [audit("acme", f"a{i}") for i in range(3)])
    await publish_raw(secured.config, "webhook", [(b"acme", b'{"not": "valid"}')])

    before = await partitions.existing(db, "webhook_events")
    writer_only = dataclasses.replace(
        secured.config, maintenance_database_url="",
        partitions=dataclasses.replace(secured.config.partitions, premake=timedelta(days=6)))
    totals = await drain(writer_only)
    assert await partitions.existing(db, "webhook_events") == before
    assert "cannot create partitions as this role" in caplog.text
    assert totals["webhook"].quota_exceeded == 2 and totals["webhook"].duplicates >= 1
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 12
    assert await db.fetchval("SELECT count(*) FROM audit_events") == 3
    assert sorted(tuple(x) for x in await db.fetch("SELECT reason, count(*) FROM dead_letters GROUP BY 1")) == [
        ("missing_field", 1), ("quota_exceeded", 2)]
    assert await db.fetchval("SELECT count(*) FROM dedupe_ledger") == 15  # unclaimed: the 2 over quota
    assert await db.fetchval("SELECT count(*) FROM consumer_offsets WHERE next_offset > 0") > 0


async def test_writer_cannot_ddl_read_events_or_drop_partitions(secured: Secured, db: asyncpg.Connection) -> None:
    r = secured.roles
    part = (await partitions.existing(db, "webhook_events"))[0].name
    w = await secured.connect(r.writer)
    try:
        for sql in ("CREATE TABLE evil (a int)", "CREATE TEMP TABLE evil (a int)", "CREATE SCHEMA evil",
                    "CREATE FUNCTION evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                    "CREATE VIEW evil AS SELECT 1",
                    "SELECT * FROM webhook_events", "SELECT * FROM audit_events", f"SELECT * FROM {part}",
                    "SELECT * FROM webhook_events_default", "SELECT count(*) FROM dead_letters",
                    "SELECT * FROM ingest_schema_migrations", "COPY webhook_events TO STDOUT",
                    "UPDATE webhook_events SET tenant_id = 'x'", "DELETE FROM webhook_events",
                    "TRUNCATE webhook_events", f"DROP TABLE {part}", "DROP TABLE webhook_events_default",
                    f"ALTER TABLE webhook_events DETACH PARTITION {part}",
                    "ALTER TABLE webhook_events DISABLE ROW LEVEL SECURITY",
                    "DROP POLICY tenant_isolation ON webhook_events",
                    "CREATE TABLE webhook_events_p29990101 PARTITION OF webhook_events "
                    "FOR VALUES FROM ('2999-01-01') TO ('2999-01-02')",
                    "UPDATE quota_overrides SET per_day = 0", "INSERT INTO quota_overrides (tenant_id) VALUES ('x')",
                    "UPDATE consumer_offsets SET group_id = 'x'", "DELETE FROM consumer_offsets",
                    "UPDATE dead_letters SET replayed_at = now()", "DELETE FROM dead_letters",
                    "UPDATE dedupe_ledger SET epoch = 0", "UPDATE dedupe_ledger_epochs SET epoch = 0",
                    "DELETE FROM dedupe_ledger_epochs", "INSERT INTO dedupe_ledger_epochs VALUES (0, now())",
                    f"SET ROLE {ident(r.owner)}", f"SET ROLE {ident(r.reader)}",
                    f"SET SESSION AUTHORIZATION {ident(r.owner)}"):
            await denied(w, sql)
    finally:
        await w.close()

    # Partition maintenance as the writer fails and changes nothing.
    before = await partitions.existing(db, "webhook_events")
    pool = await create_pool(secured.url(r.writer), max_size=1)
    try:
        m = Maintenance(pool, streams.policies(secured.config, [streams.WEBHOOK]),
                        clock=lambda: NOW + timedelta(days=5))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await m.run_once()
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await partitions.detach(conn, "webhook_events", before[0], lock_timeout_ms=1000)
    finally:
        await pool.close()
    assert await partitions.existing(db, "webhook_events") == before


# -- maintenance as the owner ----------------------------------------------------------------------------------

async def test_maintenance_as_owner_keeps_ownership_and_privileges_of_new_partitions(
        secured: Secured, db: asyncpg.Connection) -> None:
    r = secured.roles
    owner = await create_pool(secured.url(r.owner), max_size=1)
    writer = await create_pool(secured.url(r.writer), max_size=1)
    try:
        await copy_rows(writer, "webhook", [row("webhook", "acme", "today", NOW)])
        # Five days on: partitions ahead are created, those past retention (3 days) archived.
        later = NOW + timedelta(days=5)
        m = Maintenance(owner, streams.policies(secured.config, list(streams.STREAMS.values())),
                        clock=lambda: later, archive=True)
        report = await m.run_once()
        assert report.errors == [] and report.created and report.archived
        new = partitions.partition_name("webhook_events", partitions.midnight(later.date()))
        assert new in report.created
        archived = f"archive.{partitions.partition_name('webhook_events', partitions.midnight(NOW.date()))}"
        owners = {n: o for n, o in await db.fetch(
            """SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname IN ('public', 'archive') AND c.relkind IN ('r', 'p')""")}
        assert set(owners.values()) == {r.owner} and new in owners and archived in owners
        assert await db.fetchval("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'archive'") \
            == r.owner
        assert await privileges(db, r) == expected_privileges(r)  # nothing on the new or archived tables

        # The writer COPYs into the new partition through the parent; the reader sees it only through the parent.
        await copy_rows(writer, "webhook", [row("webhook", "acme", "later", later)])
        reader = await secured.connect(r.reader)
        try:
            async with reader.transaction():
                await reader.execute("SELECT set_config('app.tenant_id', 'acme', true)")
                assert await reader.fetchval(
                    "SELECT array_agg(idempotency_key) FROM webhook_events") == ["later"]  # "today" is archived
            await denied(reader, f"SELECT * FROM {new}")
            await denied(reader, f"SELECT * FROM {archived}")
        finally:
            await reader.close()
        assert await db.fetchval(f"SELECT idempotency_key FROM {archived}") == "today"
    finally:
        await owner.close()
        await writer.close()


async def test_consumer_runs_as_writer_and_its_maintenance_as_owner(secured: Secured, db: asyncpg.Connection) -> None:
    """The real ``ingest consume``: rows arrive as the writer while its maintenance task (as the owner) drops a
    partition past retention that only the owner may drop."""
    owner = await create_pool(secured.url(secured.roles.owner), max_size=1)
    try:
        async with owner.acquire() as conn:
            start = datetime(2000, 1, 1, tzinfo=UTC)
            await partitions.create(conn, "webhook_events", start, start + timedelta(days=1), lock_timeout_ms=2000)
    finally:
        await owner.close()
    old = "webhook_events_p20000101"
    assert await db.fetchval("SELECT to_regclass($1)", old) is not None
    await publish(secured.config, "webhook", [webhook("acme", f"live{i}") for i in range(20)])
    proc = spawn_consumer({**secured.env, "INGEST_MAINTENANCE_INTERVAL_SECONDS": "1"}, "webhook")
    try:
        for _ in range(300):
            stored = await db.fetchval("SELECT count(*) FROM webhook_events")
            if stored == 20 and await db.fetchval("SELECT to_regclass($1)", old) is None:
                break
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"stored {stored}/20, old partition still there: {proc.pid}")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"permission denied" not in err and b"InsufficientPrivilege" not in err
    finally:
        kill9(proc)


# -- the reader -------------------------------------------------------------------------------------------------

@pytest.fixture
async def tenants(secured: Secured, db: asyncpg.Connection) -> dict[str, dict[str, set[str]]]:
    """Rows of tenants acme and globex in both tables: in a partition, in DEFAULT (year 2000: no partition), and
    in an archived partition (2001). Returns table -> tenant -> keys visible through the parent."""
    writer = await create_pool(secured.url(secured.roles.writer), max_size=1)
    owner = await asyncpg.connect(secured.url(secured.roles.owner))
    visible: dict[str, dict[str, set[str]]] = {}
    try:
        for stream in ("webhook", "audit"):
            rows = [row(stream, t, f"{t}-{i}", NOW) for t in ("acme", "globex") for i in range(3)]
            rows += [row(stream, t, f"{t}-default", datetime(2000, 6, 1, tzinfo=UTC)) for t in ("acme", "globex")]
            rows += [row(stream, t, f"{t}-archived", datetime(2001, 1, 1, 5, tzinfo=UTC)) for t in ("acme", "globex")]
            await copy_rows(writer, stream, rows)
            table = streams.STREAMS[stream].table
            start = datetime(2001, 1, 1, tzinfo=UTC)
            assert await partitions.create(owner, table, start, start + timedelta(days=1), lock_timeout_ms=2000) == 2
            part = next(p for p in await partitions.existing(owner, table) if p.start == start)
            await partitions.detach(owner, table, part, lock_timeout_ms=2000, archive_schema="archive")
            visible[table] = {t: {f"{t}-{i}" for i in range(3)} | {f"{t}-default"} for t in ("acme", "globex")}
        await db.execute("ANALYZE")
    finally:
        await writer.close()
        await owner.close()
    return visible


async def keys(conn: asyncpg.Connection, table: str, tenant: str | None) -> set[str]:
    """Keys visible in one transaction that sets ``app.tenant_id`` to ``tenant`` (or nothing)."""
    async with conn.transaction():
        if tenant is not None:
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
        return {k for (k,) in await conn.fetch(f"SELECT idempotency_key FROM {ident(table)}")}


async def test_reader_sees_only_its_tenant_by_every_path(secured: Secured, db: asyncpg.Connection,
                                                         tenants: dict[str, dict[str, set[str]]]) -> None:
    for table in TABLES:
        await reader_checks(secured, db, table, tenants[table])


async def reader_checks(secured: Secured, db: asyncpg.Connection, table: str, want: dict[str, set[str]]) -> None:
    r = secured.roles
    assert await db.fetchval(f"SELECT count(*) FROM {ident(table)}") == 8  # root sees both tenants
    rd = await secured.connect(r.reader)
    try:
        # The documented pattern: parent, including the DEFAULT partition's rows.
        assert await keys(rd, table, "acme") == want["acme"]
        assert await keys(rd, table, "globex") == want["globex"]
        # No tenant, an empty, unknown, differently cased or injected tenant: nothing.
        for tenant in (None, "", "ACME", "nobody", "acme' OR '1'='1", "acme%"):
            assert await keys(rd, table, tenant) == set(), tenant
        # A WHERE naming the other tenant does not widen the policy.
        async with rd.transaction():
            await rd.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            assert await rd.fetchval(f"SELECT count(*) FROM {ident(table)} WHERE tenant_id = 'globex'") == 0
            # A leaky predicate (division by zero on globex rows) runs after the policy: no error, no signal.
            assert await rd.fetchval(
                f"SELECT count(*) FROM {ident(table)} "
                "WHERE 1 / (CASE WHEN tenant_id = 'globex' THEN 0 ELSE 1 END) = 1") == len(want["acme"])
            # COPY TO applies the policy too.
            out = io.BytesIO()

            async def sink(chunk: bytes) -> None:
                out.write(chunk)

            await rd.copy_from_query(f"SELECT tenant_id FROM {ident(table)}", output=sink)
            await rd.copy_from_table(table, output=sink, columns=["tenant_id"])
            assert set(out.getvalue().decode().split()) == {"acme"}
        # The transaction-local setting is gone afterwards; one set outside a transaction lasts one statement.
        assert await keys(rd, table, None) == set()
        await rd.execute("SELECT set_config('app.tenant_id', 'acme', true)")
        assert await keys(rd, table, None) == set()
        # A session-level SET works until RESET (not the documented pattern, but it must not leak either).
        await rd.execute("SET app.tenant_id = 'globex'")
        assert await keys(rd, table, None) == want["globex"]
        await rd.execute("RESET app.tenant_id")
        assert await keys(rd, table, None) == set()
        await rd.execute("SET app.tenant_id = 'globex'")
        await rd.execute("RESET ALL")
        assert await keys(rd, table, None) == set()
        # Prepared (cached) statements re-evaluate the setting per execution.
        stmt = await rd.prepare(f"SELECT idempotency_key FROM {ident(table)}")
        for tenant in ("acme", "globex", "acme"):
            async with rd.transaction():
                await rd.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
                assert {k for (k,) in await stmt.fetch()} == want[tenant]
        # row_security = off makes the query fail instead of bypassing the policy.
        await rd.execute("SET row_security = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await keys(rd, table, "acme")
        await rd.execute("RESET row_security")

        # Partitions, DEFAULT and archived partitions cannot be read directly.
        for part in await partitions.existing(db, table):
            await denied(rd, f"SELECT * FROM {ident(part.name)}")
        await denied(rd, f"SELECT * FROM {ident(partitions.default_name(table))}")
        archived = await db.fetch("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = "
                                  "'archive'::regnamespace AND c.relname LIKE $1", table + "_p%")
        assert archived
        for (name,) in archived:
            await denied(rd, f"SELECT * FROM {name}")
        # No role switch, no writes, no private tables, no temp tables, no DDL.
        for sql in (f"SET ROLE {ident(r.writer)}", f"SET ROLE {ident(r.owner)}",
                    f"SET SESSION AUTHORIZATION {ident(r.owner)}",
                    f"DELETE FROM {ident(table)}", f"UPDATE {ident(table)} SET tenant_id = 'acme'",
                    f"TRUNCATE {ident(table)}", "CREATE TEMP TABLE t (a int)", "CREATE TABLE t (a int)",
                    f"ALTER TABLE {ident(table)} DISABLE ROW LEVEL SECURITY",
                    f"CREATE POLICY everything ON {ident(table)} USING (true)",
                    *(f"SELECT * FROM {t}" for t in PRIVATE)):
            await denied(rd, sql)
        async with rd.transaction():
            await rd.execute("SELECT set_config('app.tenant_id', 'acme', true)")
            cols = "tenant_id, idempotency_key, event_type, source, occurred_at, payload, kafka_timestamp, " \
                "source_partition, source_offset" if table == "webhook_events" else \
                "tenant_id, idempotency_key, action, actor_id, occurred_at, kafka_timestamp, source_partition, " \
                "source_offset"
            vals = "'acme', 'x', 'a', 'b', now(), '{}', now(), 0, 0" if table == "webhook_events" else \
                "'acme', 'x', 'a', 'b', now(), now(), 0, 0"
            await denied(rd, f"INSERT INTO {ident(table)} ({cols}) VALUES ({vals})")
        # Statistics do not leak tenants either (the planner's pg_statistic is hidden behind RLS and grants).
        assert await rd.fetchval("SELECT count(*) FROM pg_stats WHERE tablename LIKE $1", table + "%") == 0
        assert await db.fetchval("SELECT count(*) FROM pg_stats WHERE tablename LIKE $1", table + "%") > 0
        # No view or SECURITY DEFINER function offers another way in.
        assert await rd.fetchval("SELECT count(*) FROM pg_views WHERE schemaname = 'public'") == 0
        assert await rd.fetchval("SELECT count(*) FROM pg_proc WHERE prosecdef AND pronamespace = "
                                 "'public'::regnamespace") == 0
        with pytest.raises(asyncpg.PostgresError):
            await rd.execute("SELECT quota_overrides_bump()")
    finally:
        await rd.close()


async def _cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.cli", *argv, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_operator_commands_use_the_owner_url_and_name_the_role_that_lacks_a_privilege(
        secured: Secured) -> None:
    """In a consumer's container (writer URL only) an operator command fails with one line naming the writer
    and the table; with the owner's URL as INGEST_MAINTENANCE_DATABASE_URL the same command works."""
    writer_only = {k: v for k, v in secured.env.items() if k != "INGEST_MAINTENANCE_DATABASE_URL"}
    for argv in (("dlq", "list"), ("summary",), ("dlq", "purge", "--before", "2000-01-01")):
        code, _, err = await _cli(writer_only, *argv)
        assert code == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f'role "{secured.roles.writer}" (from INGEST_DATABASE_URL) lacks a privilege on table' in err, err
        assert "INGEST_MAINTENANCE_DATABASE_URL" in err
        code, out, err = await _cli(secured.env, *argv)
        assert code == 0, (argv, out, err)
