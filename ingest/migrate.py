"""Versioned, idempotent schema migrations, serialised across processes by an advisory lock."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)
_LOCK_KEY = 0x1E57_0001


async def create_database_if_missing(url: str) -> bool:
    """Create the database named in ``url`` when it does not exist; return True if it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f"CREATE DATABASE {ident(name)}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True


async def apply(conn: Conn, migrations: Sequence[tuple[int, str, str]]) -> list[int]:
    """Apply ``(version, name, sql)`` migrations not yet recorded; return the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS ingest_schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM ingest_schema_migrations")}
        for version, name, sql in sorted(migrations):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO ingest_schema_migrations (version, name) VALUES ($1, $2)",
                                   version, name)
            log.info("migration applied", extra={"version": version, "migration": name})
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
