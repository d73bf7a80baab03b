"""Dead-letter circuit breaker: stop a stream instead of burying it in dead letters.

Rule: ``check`` is called with each batch's counts *before* the batch commits. When, over the last ``window``,
at least ``min_records`` records were seen and more than ``max_ratio`` of them were rejected, it raises
``CircuitOpen`` and the batch is not written. Typical causes: a producer deploying a broken schema, a contract
mismatch, a misconfigured time window. Over-quota records do not count (they are policy, not bad input).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """``max_ratio >= 1`` disables the breaker."""

    max_ratio: float
    min_records: int
    window: timedelta


class CircuitOpen(Exception):
    """The stream was stopped; ``str()`` says why, with the top reasons."""


class Breaker:
    """Sliding-window reject ratio for one stream; not shared between streams."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self._window: deque[tuple[float, int, int]] = deque()
        self._total = 0
        self._rejected = 0
        self._reasons: Counter[str] = Counter()

    def check(self, stream: str, total: int, rejected: int, reasons: Counter[str]) -> None:
        """Account for one batch about to commit; raise ``CircuitOpen`` when the ratio trips."""
        cfg = self.config
        if cfg.max_ratio >= 1 or total == 0:
            return
        now = self.clock()
        self._window.append((now, total, rejected))
        self._total += total
        self._rejected += rejected
        self._reasons.update(reasons)
        horizon = now - cfg.window.total_seconds()
        while self._window and self._window[0][0] < horizon:
            _, t, r = self._window.popleft()
            self._total -= t
            self._rejected -= r
        if not self._window:
            self._reasons.clear()
        if self._total >= cfg.min_records and self._rejected > cfg.max_ratio * self._total:
            top = ", ".join(f"{k}={v}" for k, v in self._reasons.most_common(3))
            raise CircuitOpen(
                f"{stream}: {self._rejected} of the last {self._total} records would be dead-lettered "
                f"(> {cfg.max_ratio:.0%} within {cfg.window.total_seconds():.0f} s; top reasons: {top}). "
                "Stopped consuming so the stream is not buried in dead letters; fix the producer or the "
                "configuration, then restart (INGEST_DLQ_MAX_RATIO=1 disables this check)."
            )
