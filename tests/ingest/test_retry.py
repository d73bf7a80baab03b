"""ingest.retry: backoff bounds (exponential, capped, full jitter) and which service an error is blamed on."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiokafka.errors
import asyncpg
import pytest
import redis.exceptions

from ingest.retry import Backoff, component_of, until_done


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


# -- until_done: the retry loop ---------------------------------------------------------------------------------

class Script:
    """An action that fails with the given exceptions in turn, then succeeds; records every callback."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.events: list[str] = []

    async def action(self) -> None:
        self.events.append("try")
        if self.failures:
            raise self.failures.pop(0)

    async def wait(self, delay: float) -> None:
        self.events.append(f"wait {delay}")

    def kw(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        return dict(stop=stop or asyncio.Event(), backoff=Backoff(initial=1.0, maximum=1.0), wait=self.wait,
                    fatal=(KeyError,), on_failure=lambda e, n, d: self.events.append(f"failed {n} {type(e).__name__}"),
                    on_recovered=lambda: self.events.append("recovered"))


async def test_until_done_retries_each_failure_and_reports_recovery_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: b)
    s = Script(OSError(), TimeoutError())
    assert await until_done(s.action, **s.kw()) is True
    assert s.events == ["try", "failed 0 OSError", "wait 1.0", "try", "failed 1 TimeoutError", "wait 1.0", "try",
                        "recovered"]


async def test_until_done_without_failure_reports_nothing() -> None:
    s = Script()
    assert await until_done(s.action, **s.kw()) is True
    assert s.events == ["try"]


async def test_until_done_gives_up_when_stopped_after_a_failure() -> None:
    stop = asyncio.Event()
    stop.set()
    s = Script(OSError(), OSError())
    assert await until_done(s.action, **s.kw(stop)) is False
    assert s.events.count("try") == 1 and "recovered" not in s.events


async def test_until_done_lets_fatal_errors_through_after_reporting_recovery() -> None:
    s = Script(OSError(), KeyError("fenced"))
    with pytest.raises(KeyError):
        await until_done(s.action, **s.kw())
    assert s.events[-2:] == ["try", "recovered"]
    s = Script(KeyError("fenced"))
    with pytest.raises(KeyError):
        await until_done(s.action, **s.kw())
    assert s.events == ["try"], "no failure before it: nothing to recover from"


async def test_until_done_starts_with_a_failure_already_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: b)
    s = Script()
    assert await until_done(s.action, failed=ConnectionError(), **s.kw()) is True
    assert s.events[:2] == ["failed 0 ConnectionError", "wait 1.0"] and s.events[-2:] == ["try", "recovered"]
