"""Quota limits: what a tenant may do on a stream, and how the current limits are kept up to date.

Rules:
- ``Limits`` 0 means unlimited; ``burst`` 0 means one second's worth of ``per_second`` (at least 1).
- Per field, a stream override beats a tenant-wide override (``stream`` ``ALL_STREAMS``) beats the default.
- ``LimitBook`` re-reads overrides at most once per refresh interval (never per event), and only when their
  version moved; a failed re-read keeps the last limits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.config import QuotaConfig
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

US = 1_000_000
ALL_STREAMS = ""  # the ``stream`` of an override that applies to every stream


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits on one stream. 0 = unlimited; ``burst`` 0 = one second's worth (at least 1)."""

    per_second: float = 0.0
    burst: int = 0
    per_day: int = 0

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0 and self.per_day <= 0

    @property
    def effective_burst(self) -> int:
        if self.per_second <= 0:
            return 0
        return self.burst if self.burst > 0 else max(1, math.ceil(self.per_second))

    @property
    def interval_us(self) -> float:
        """GCRA emission interval T: microseconds per event (0 = no rate limit)."""
        return US / self.per_second if self.per_second > 0 else 0.0

    @property
    def tolerance_us(self) -> float:
        """GCRA tolerance tau = burst * T: how far ahead of now the theoretical arrival time may run."""
        return self.effective_burst * self.interval_us


def default_limits(quota: QuotaConfig) -> Limits:
    """The limits of a tenant without overrides."""
    return Limits(quota.default_per_second, quota.default_burst, quota.default_per_day)


@dataclass(frozen=True, slots=True)
class Override:
    """One tenant's override: ``stream`` ``ALL_STREAMS`` applies to every stream; a None field inherits."""

    tenant: str
    stream: str = ALL_STREAMS
    per_second: float | None = None
    burst: int | None = None
    per_day: int | None = None


@dataclass(frozen=True, slots=True)
class LimitTable:
    """Resolved limits of one stream: per field, stream override > tenant-wide override > default."""

    default: Limits
    tenants: Mapping[str, Limits] = field(default_factory=dict)
    any_limited: bool = field(init=False)
    """False when no tenant can be limited: ``admit`` then costs nothing (computed once per reload)."""

    def __post_init__(self) -> None:
        limited = not self.default.unlimited or any(not lim.unlimited for lim in self.tenants.values())
        object.__setattr__(self, "any_limited", limited)

    @classmethod
    def build(cls, stream: str, default: Limits, overrides: Iterable[Override]) -> LimitTable:
        wide: dict[str, Override] = {}
        own: dict[str, Override] = {}
        for o in overrides:
            if o.stream == ALL_STREAMS:
                wide[o.tenant] = o
            elif o.stream == stream:
                own[o.tenant] = o
        return cls(default, {t: resolve(default, own.get(t), wide.get(t)) for t in wide.keys() | own.keys()})

    def limits_for(self, tenant: str) -> Limits:
        return self.tenants.get(tenant, self.default)


def resolve(default: Limits, *overrides: Override | None) -> Limits:
    """Each field from the first override (most specific first) that sets it, else the default."""
    def pick(name: str) -> Any:
        for o in overrides:
            if o is not None and getattr(o, name) is not None:
                return getattr(o, name)
        return getattr(default, name)
    return Limits(float(pick("per_second")), int(pick("burst")), int(pick("per_day")))


class OverrideSource(Protocol):
    """Where overrides come from. ``version`` is cheap and changes whenever the overrides do."""

    async def version(self) -> int: ...
    async def load(self) -> tuple[int, list[Override]]: ...


class LimitBook:
    """The current ``LimitTable`` of one stream, re-read from ``source`` at most once per ``refresh_s``.

    Rule: call ``get`` once per batch. The first load must succeed (it raises); later failures keep the last
    table and are logged, so a Postgres hiccup never changes limits."""

    def __init__(self, stream: str, default: Limits, source: OverrideSource | None = None, *,
                 refresh_s: float = 2.0, monotonic: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.stream, self.default, self.source, self.refresh_s = stream, default, source, refresh_s
        self._monotonic, self._metrics = monotonic, metrics
        self._table: LimitTable | None = None if source is not None else LimitTable(default)
        self._version: int | None = None
        self._next = 0.0

    async def get(self) -> LimitTable:
        if self.source is None:
            assert self._table is not None
            return self._table
        now = self._monotonic()
        if self._table is None or now >= self._next:
            self._next = now + self.refresh_s
            try:
                await self._refresh(self.source)
            except Exception as exc:
                if self._table is None:
                    raise
                if self._metrics is not None:
                    self._metrics.quota_refresh_errors.labels(self.stream).inc()
                log.warning("quota overrides refresh failed; keeping the last limits",
                            extra={"stream": self.stream, "error": type(exc).__name__})
        assert self._table is not None
        return self._table

    async def _refresh(self, source: OverrideSource) -> None:
        if self._table is not None and await source.version() == self._version:
            return
        version, rows = await source.load()
        self._table = LimitTable.build(self.stream, self.default, rows)
        self._version = version
        log.info("quota limits loaded", extra={"stream": self.stream, "overrides": len(self._table.tenants),
                                               "version": version})
