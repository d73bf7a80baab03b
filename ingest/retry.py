"""Which failures are retried. Rule: every failure in the write path is retried with backoff, never
dead-lettered; only Postgres data errors (isolated row by row in ``ingest.writer``) reject records."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter."""

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return random.uniform(self.initial / 2, min(self.maximum, self.initial * 2**attempt))


def component_of(exc: BaseException) -> str:
    """Which service an error came from, for logs and the ``ingest_retries_total`` label."""
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        return "postgres"
    if module.startswith("redis"):
        return "redis"
    if module.startswith("aiokafka") or module.startswith("kafka"):
        return "kafka"
    return "postgres" if isinstance(exc, OSError | TimeoutError) else "internal"


async def until_done(action: Callable[[], Awaitable[object]], *, stop: asyncio.Event, backoff: Backoff,
                     wait: Callable[[float], Awaitable[object]], fatal: tuple[type[BaseException], ...],
                     on_failure: Callable[[BaseException, int, float], object],
                     on_recovered: Callable[[], object], failed: BaseException | None = None) -> bool:
    """Run ``action`` until it succeeds (True), or until ``stop`` is set after a failed attempt (False).

    Each failure calls ``on_failure(exc, attempt, delay)`` (attempt 0-based), then ``wait(delay)``; the caller's
    ``wait`` must keep the process alive (a consumer keeps polling). Exceptions in ``fatal`` are not retried:
    they propagate. After one or more failures, success or a fatal exception first calls ``on_recovered()``.
    ``failed``: the first attempt already failed with this exception."""
    attempt = 0
    while True:
        try:
            if failed is not None:
                exc, failed = failed, None
                raise exc
            await action()
        except fatal:
            if attempt:
                on_recovered()
            raise
        except Exception as exc:
            delay = backoff.delay(attempt)
            on_failure(exc, attempt, delay)
            attempt += 1
            await wait(delay)
            if stop.is_set():
                return False
            continue
        if attempt:
            on_recovered()
        return True
