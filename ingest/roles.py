"""Least-privilege roles: an owner that owns every object and runs DDL and partition maintenance, a writer for the
consumers' hot path, and a reader for applications (row-level security by tenant). See docs/security.md.

Rules:
- Role names are ``<prefix>_owner``, ``<prefix>_writer`` and ``<prefix>_reader``; a prefix that does not match
  ``[a-z_][a-z0-9_]{0,40}`` is refused before anything is sent, and the names are still quoted wherever they
  appear. Table and column names come from the caller's configuration, never from input.
- Everything here is idempotent: missing roles are created, attributes converge (changing one needs a
  superuser), objects not owned by the owner are handed over, and the writer's and reader's table privileges are
  revoked and granted again, in one transaction, to exactly what ``grants`` lists.
- Role attributes are not inherited through membership: the consumer must log in as the writer role itself,
  whose BYPASSRLS lets COPY into tables with row-level security (it has no SELECT on them).
- Passwords never travel in clear text: a SCRAM-SHA-256 verifier is computed here and sent instead; a role
  without a password file keeps its password (none for a new role: only trust, peer or certificate auth).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

from ingest import ledger
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
KINDS = ("owner", "writer", "reader")
SCHEMAS = ("public", "archive")  # where ingest's objects live (``archive``: partitions moved out by retention)
_VERIFIER = re.compile(r"SCRAM-SHA-256\$[0-9]{4,7}:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+")
_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
_KEYWORDS = {"rolsuper": "SUPERUSER", "rolcreaterole": "CREATEROLE", "rolcreatedb": "CREATEDB",
             "rolreplication": "REPLICATION", "rolcanlogin": "LOGIN", "rolbypassrls": "BYPASSRLS",
             "rolinherit": "INHERIT"}


class RoleError(ValueError):
    """A role setting that cannot be used (bad prefix or password, a role that must not be touched)."""


@dataclass(frozen=True, slots=True)
class Roles:
    """The three role names; build with ``from_prefix`` so they are validated."""

    owner: str
    writer: str
    reader: str

    @classmethod
    def from_prefix(cls, prefix: str) -> Roles:
        """``<prefix>_owner|_writer|_reader``; raises ``RoleError`` unless the prefix matches ``PREFIX``."""
        if not PREFIX.fullmatch(prefix) or f"{prefix}_".startswith("pg_"):
            raise RoleError(f"invalid role prefix {prefix!r}: 1-41 of [a-z0-9_], not starting with a digit "
                            "or pg_")
        return cls(f"{prefix}_owner", f"{prefix}_writer", f"{prefix}_reader")

    def items(self) -> list[tuple[str, str]]:
        return [("owner", self.owner), ("writer", self.writer), ("reader", self.reader)]


@dataclass(frozen=True, slots=True)
class GrantTables:
    """The tables the roles are granted on (names from configuration, never input)."""

    events: tuple[str, ...]
    dead_letters: str
    ledger: str
    offsets: str
    offset_changes: str
    quota: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Grant:
    privilege: str  # SELECT, INSERT, UPDATE or DELETE
    table: str
    role: str
    columns: tuple[str, ...] = ()

    def sql(self) -> str:
        if self.privilege not in _PRIVILEGES:
            raise RoleError(f"unexpected privilege {self.privilege!r}")
        cols = f" ({', '.join(ident(c) for c in self.columns)})" if self.columns else ""
        return f"GRANT {self.privilege}{cols} ON TABLE {ident(self.table)} TO {ident(self.role)}"


def grants(roles: Roles, tables: GrantTables) -> list[Grant]:
    """Everything the writer and the reader may do; the owner owns the objects and needs no grant.

    The writer's list mirrors the hot path's statements (``offsets``, ``dedupe``, ``writer``, the quota
    overrides reader): COPY into the event tables (never SELECT), claim/unclaim keys in the ledger and open its due epoch, COPY dead
    letters, read and advance offsets, record position changes, read quota overrides. The reader may SELECT the event tables only,
    filtered by the tenant policy."""
    w, r = roles.writer, roles.reader
    out = [Grant("INSERT", t, w) for t in tables.events]
    epochs = ledger.epochs_table(tables.ledger)
    out += [Grant("SELECT", tables.ledger, w), Grant("INSERT", tables.ledger, w), Grant("DELETE", tables.ledger, w),
            Grant("SELECT", epochs, w), Grant("UPDATE", epochs, w, ("opened_at",))]
    out += [Grant("INSERT", tables.dead_letters, w)]
    out += [Grant("SELECT", tables.offsets, w), Grant("INSERT", tables.offsets, w),
            Grant("UPDATE", tables.offsets, w, ("next_offset", "updated_at")),
            Grant("INSERT", tables.offset_changes, w)]
    out += [Grant("SELECT", t, w) for t in tables.quota]
    out += [Grant("SELECT", t, r) for t in tables.events]
    return out


@dataclass(slots=True)
class RoleChanges:
    """What ``ensure_roles`` and ``hand_over`` changed (names of roles and objects)."""

    created: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    passwords: list[str] = field(default_factory=list)
    handed_over: list[str] = field(default_factory=list)


# -- passwords ------------------------------------------------------------------------------------------------

def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for ``password`` (printable ASCII only, so SASLprep is the
    identity and the verifier matches what a client computes)."""
    if not password or any(not " " <= ch <= "~" for ch in password):
        raise RoleError("a password must be non-empty printable ASCII (e.g. `openssl rand -base64 32`)")
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def read_password_file(path: str) -> str:
    """A password file's content without its trailing newline; raises ``RoleError`` when it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise RoleError(f"cannot read password file {path}: {exc}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    scram_verifier(text, iterations=1)  # validates
    return text


# -- roles ----------------------------------------------------------------------------------------------------

def _wanted(kind: str) -> dict[str, bool]:
    return {"rolsuper": False, "rolcreaterole": False, "rolcreatedb": False, "rolreplication": False,
            "rolcanlogin": True, "rolbypassrls": kind == "writer", "rolinherit": True}


def _options(attrs: Mapping[str, bool]) -> str:
    return " ".join(("" if on else "NO") + _KEYWORDS[name] for name, on in attrs.items())


def _quote_one(name: str) -> str:
    """Quote one identifier taken from the catalog (may contain dots, unlike configuration names)."""
    return '"' + name.replace('"', '""') + '"'


async def ensure_roles(conn: Conn, roles: Roles, passwords: Mapping[str, str] | None = None,
                       report: RoleChanges | None = None) -> RoleChanges:
    """Create missing roles and converge their attributes (LOGIN; only the writer BYPASSRLS; nothing else);
    set the passwords given (by kind). Refuses to change a superuser, or the attributes of the role this session
    runs as. Creating a role needs CREATEROLE, and BYPASSRLS a superuser: run this as a superuser once; later
    runs with nothing to change work as the owner too."""
    report = report or RoleChanges()
    passwords = passwords or {}
    me = await conn.fetchrow("SELECT session_user, current_user")
    assert me is not None
    for kind, name in roles.items():
        wanted = _wanted(kind)
        row = await conn.fetchrow(f"SELECT {', '.join(_KEYWORDS)} FROM pg_roles WHERE rolname = $1", name)
        if row is None:
            try:
                await conn.execute(f"CREATE ROLE {ident(name)} {_options(wanted)}")
                report.created.append(name)
            except asyncpg.DuplicateObjectError:  # created concurrently: converge it below
                row = await conn.fetchrow(f"SELECT {', '.join(_KEYWORDS)} FROM pg_roles WHERE rolname = $1", name)
        if row is not None:
            if row["rolsuper"]:
                raise RoleError(f"role {name} exists and is a superuser; refusing to change it")
            changes = {k: v for k, v in wanted.items() if row[k] != v}
            if changes and name in (me[0], me[1]):
                raise RoleError(f"role {name} is the role this session runs as and needs changes "
                                f"({_options(changes)}); run ingest migrate --roles as a superuser")
            if changes:
                await conn.execute(f"ALTER ROLE {ident(name)} {_options(changes)}")
                report.altered.append(name)
        if kind in passwords:
            verifier = scram_verifier(passwords[kind])
            if not _VERIFIER.fullmatch(verifier):  # only base64, digits and separators may reach the literal
                raise RoleError("internal error: malformed SCRAM verifier")
            await conn.execute(f"ALTER ROLE {ident(name)} PASSWORD '{verifier}'")
            report.passwords.append(name)
    return report


async def hand_over(conn: Conn, owner: str, schemas: Sequence[str] = SCHEMAS,
                    report: RoleChanges | None = None) -> RoleChanges:
    """Make ``owner`` own the database, the schemas, and every table, view, sequence and function in them
    (objects created before the roles existed). Needs a superuser unless ``owner`` owns them already."""
    report = report or RoleChanges()
    owner_q = ident(owner)
    database = str(await conn.fetchval("SELECT current_database()"))
    if await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database) != owner:
        await conn.execute(f"ALTER DATABASE {_quote_one(database)} OWNER TO {owner_q}")
        report.handed_over.append(f"database {database}")
    oid = await conn.fetchval("SELECT oid FROM pg_roles WHERE rolname = $1", owner)
    for (name,) in await conn.fetch(
            """SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])
               AND nspowner NOT IN ($2, 'pg_database_owner'::regrole)""", list(schemas), oid):
        await conn.execute(f"ALTER SCHEMA {_quote_one(name)} OWNER TO {owner_q}")
        report.handed_over.append(f"schema {name}")
    # regclass/regprocedure output is quoted by Postgres itself; extension members and identity sequences
    # (which follow their table) are skipped.
    rows = await conn.fetch(
        """SELECT c.oid::regclass::text, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                  WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND c.relowner <> $2
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                             AND (d.deptype = 'e' OR (c.relkind = 'S' AND d.deptype IN ('a', 'i'))))
           ORDER BY 1""", list(schemas), oid)
    rows += await conn.fetch(
        """SELECT p.oid::regprocedure::text, 'ROUTINE' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = ANY($1::text[]) AND p.proowner <> $2
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')""", list(schemas), oid)
    for name, kind in rows:
        await conn.execute(f"ALTER {kind} {name} OWNER TO {owner_q}")
        report.handed_over.append(f"{kind.lower()} {name}")
    return report


async def grant(conn: Conn, roles: Roles, tables: GrantTables, schemas: Sequence[str] = SCHEMAS) -> None:
    """In one transaction: revoke every privilege the writer and reader hold on objects in ``schemas``, grant
    exactly ``grants(roles, tables)``, let only them CONNECT (PUBLIC loses CONNECT and TEMP) and nobody but the
    owner CREATE in ``public``. Partitions get no grants: the writer reaches them through the parent only."""
    w, r = ident(roles.writer), ident(roles.reader)
    database = str(await conn.fetchval("SELECT current_database()"))
    present = [n for (n,) in await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[]) ORDER BY 1", list(schemas))]
    async with conn.transaction():
        for schema in present:
            s = _quote_one(schema)
            await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {w}, {r}")
            await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {w}, {r}")
            await conn.execute(f"REVOKE ALL ON SCHEMA {s} FROM {w}, {r}")
        await conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {w}, {r}")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {w}, {r}")
        for g in grants(roles, tables):
            await conn.execute(g.sql())
        db = _quote_one(database)
        await conn.execute(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC, {w}, {r}")
        await conn.execute(f"GRANT CONNECT ON DATABASE {db} TO {w}, {r}")


async def act_as(conn: Conn, role: str | None) -> None:
    """``SET ROLE role`` (so objects created next are owned by it), or ``RESET ROLE`` for None."""
    await conn.execute("RESET ROLE" if role is None else f"SET ROLE {ident(role)}")
