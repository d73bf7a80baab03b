"""Shared by the quota unit tests: a whole-second instant and an in-memory ``OverrideSource``."""

from __future__ import annotations

from ingest.quota.limits import US, Override

T0 = 1_700_000_000 * US  # a whole second, in µs


class Source:
    """An ``OverrideSource`` in memory that counts its queries and can fail like an unreachable Postgres."""

    def __init__(self) -> None:
        self.rows: list[Override] = []
        self.ver = 1
        self.version_calls = self.loads = 0
        self.fail = False

    async def version(self) -> int:
        self.version_calls += 1
        if self.fail:
            raise OSError("postgres down")
        return self.ver

    async def load(self) -> tuple[int, list[Override]]:
        self.loads += 1
        if self.fail:
            raise OSError("postgres down")
        return self.ver, list(self.rows)
