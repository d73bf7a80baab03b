"""ingest.quota.overrides without Postgres: values are checked before any query, and table names are the
caller's (quoted), never literals of the library."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ingest.quota.limits import Override
from ingest.quota.overrides import OverrideTables, delete, select, upsert

TABLES = OverrideTables("my overrides", "my_version")


class Conn:
    """Records queries; answers like Postgres would for one stored row."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, tuple[Any, ...]]] = []

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...]:
        self.queries.append((sql, args))
        return args

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        self.queries.append((sql, args))
        return [("acme", "", 5.0, None, 100)]

    async def execute(self, sql: str, *args: Any) -> str:
        self.queries.append((sql, args))
        return "DELETE 1"


@pytest.mark.parametrize("field", ["per_second", "burst", "per_day"])
@pytest.mark.parametrize("value", [-1, math.inf, math.nan])
async def test_negative_infinite_or_nan_values_are_refused_before_any_query(field: str, value: float) -> None:
    conn = Conn()
    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0"):
        await upsert(conn, TABLES, Override("acme", **{field: value}))  # type: ignore[arg-type]
    assert conn.queries == []


async def test_queries_use_the_callers_tables() -> None:
    conn = Conn()
    stored = await upsert(conn, TABLES, Override("acme", "webhook", per_second=0))  # type: ignore[arg-type]
    assert stored == Override("acme", "webhook", 0, None, None)
    assert await select(conn, TABLES, "acme") == [Override("acme", "", 5.0, None, 100)]  # type: ignore[arg-type]
    assert await delete(conn, TABLES, "acme", "") is True  # type: ignore[arg-type]
    assert all('"my overrides"' in sql for sql, _ in conn.queries)
    assert "quota_overrides" not in str(conn.queries)
