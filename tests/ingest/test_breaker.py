"""The dead-letter circuit breaker trips on a sustained reject ratio, not on a few bad records."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest

from ingest.breaker import Breaker, BreakerConfig, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: object) -> Breaker:
    cfg = BreakerConfig(**{"max_ratio": 0.5, "min_records": 1000, "window": timedelta(seconds=60), **kw})  # type: ignore[arg-type]
    return Breaker(cfg, clock)


def test_trips_when_ratio_stays_high_over_enough_records() -> None:
    clock = Clock()
    b = breaker(clock)
    b.check("webhook", 500, 400, Counter(not_json=400))  # too few records yet
    clock.now += 1
    with pytest.raises(CircuitOpen, match=r"webhook: 800 of the last 1000 .*not_json=800"):
        b.check("webhook", 500, 400, Counter(not_json=400))


def test_does_not_trip_below_ratio_or_for_old_rejects() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.check("audit", 1000, 400, Counter(invalid_field=400))  # 40%: below 50%
    clock.now += 120  # the bad stretch leaves the window
    b.check("audit", 5000, 100, Counter(invalid_field=100))
    clock.now += 1
    b.check("audit", 600, 599, Counter(not_json=599))  # a burst inside mostly good traffic: 699/5600


def test_ratio_one_disables() -> None:
    b = breaker(Clock(), max_ratio=1.0)
    b.check("webhook", 100000, 100000, Counter(not_json=100000))
