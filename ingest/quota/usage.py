"""Quota usage as operators see it (``ingest quota get/list``): today's counts and the burst left now."""

from __future__ import annotations

from dataclasses import dataclass

from ingest.quota.gcra import DAY_US, State, judge
from ingest.quota.limits import Limits


@dataclass(frozen=True, slots=True)
class Usage:
    """What ``ingest quota list`` shows: today's admitted and denied events, and the burst available now."""

    used_today: int
    denied_today: int
    burst_left: int | None  # None = no rate limit


def usage(state: State | None, limits: Limits, now_us: int) -> Usage:
    """``state``'s counts if they are today's (UTC), and how many events would be admitted at once now."""
    day = now_us // DAY_US
    used, denied = (state.used, state.denied) if state is not None and state.day == day else (0, 0)
    burst_left: int | None = None
    if limits.interval_us > 0:
        burst_left, _ = judge(state, now_us, limits.effective_burst, Limits(limits.per_second, limits.burst))
    return Usage(used, denied, burst_left)
