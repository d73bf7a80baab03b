"""ingest.retry: backoff bounds (exponential, capped, full jitter) and which service an error is blamed on."""

from __future__ import annotations

import random

import aiokafka.errors
import asyncpg
import pytest
import redis.exceptions

from ingest.retry import Backoff, component_of


def test_delay_bounds_double_per_attempt_up_to_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        bounds.append((a, b))
        return b

    monkeypatch.setattr(random, "uniform", uniform)
    delays = [Backoff(initial=0.1, maximum=1.0).delay(n) for n in range(6)]
    assert bounds == [(0.05, 0.1), (0.05, 0.2), (0.05, 0.4), (0.05, 0.8), (0.05, 1.0), (0.05, 1.0)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_delays_are_jittered_within_the_bounds() -> None:
    backoff = Backoff()
    for attempt in (0, 3, 10, 100):
        delays = {backoff.delay(attempt) for _ in range(200)}
        high = min(backoff.maximum, backoff.initial * 2**attempt)
        assert all(backoff.initial / 2 <= d <= high for d in delays)
        assert len(delays) > 100  # jittered, not one fixed value
    assert max(backoff.delay(1000) for _ in range(200)) > backoff.maximum * 0.9  # no overflow, reaches the cap


@pytest.mark.parametrize(("exc", "component"), [
    (asyncpg.SerializationError("could not serialize"), "postgres"),
    (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), "postgres"),
    (asyncpg.InterfaceError("pool is closing"), "postgres"),
    (redis.exceptions.ConnectionError("refused"), "redis"),
    (redis.exceptions.TimeoutError("timed out"), "redis"),
    (aiokafka.errors.KafkaConnectionError("broker down"), "kafka"),
    (aiokafka.errors.RequestTimedOutError(), "kafka"),
    (ConnectionResetError("reset by peer"), "postgres"),
    (TimeoutError(), "postgres"),
    (ValueError("bug"), "internal"),
    (KeyError(0), "internal"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v)
def test_component_of(exc: BaseException, component: str) -> None:
    assert component_of(exc) == component
