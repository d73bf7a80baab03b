"""Which failures are retried. Rule: every failure in the write path is retried with backoff, never
dead-lettered; only Postgres data errors (isolated row by row in ``ingest.writer``) reject records."""

from __future__ import annotations

import random
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
