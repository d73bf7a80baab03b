"""SQL identifier quoting. Values are always bound parameters; identifiers come only from configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias


def ident(name: str) -> str:
    """Quote a possibly schema-qualified identifier (``a.b`` -> ``"a"."b"``)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    """A connection, or a connection borrowed from a pool."""
