"""Quota stage interface. ``admit`` gets the tenants of a batch's new events, in order, and answers per event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Quota(Protocol):
    """Rule: one call per batch, never per event; raise on infrastructure failure (the batch is retried)."""

    async def admit(self, tenants: Sequence[str]) -> list[bool]: ...


class Unlimited:
    """No limits: every event is admitted without any I/O."""

    async def admit(self, tenants: Sequence[str]) -> list[bool]:
        return [True] * len(tenants)
