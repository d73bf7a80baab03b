"""Redis hints degrade to "no information" on failure, then stay off for a cool-down (no call per batch)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.dedupe import DIGEST_SIZE, RedisHints
from ingest.metrics import Metrics


class FlakyRedis:
    """Stands in for the client: its scripts fail while ``down``, else answer "seen" for every digest."""

    def __init__(self, error: BaseException) -> None:
        self.calls = 0
        self.down = True
        self.error = error

    def register_script(self, _source: str) -> Any:
        async def call(*, keys: list[Any], args: list[Any]) -> bytes:
            self.calls += 1
            if self.down:
                raise self.error
            return b"1" * (sum(len(blob) for blob in args[:len(keys)]) // DIGEST_SIZE)  # one blob per bucket
        return call


@pytest.mark.parametrize("error", [
    RedisConnectionError("timed out"),
    ConnectionResetError(104, "Connection reset by peer"),
], ids=["redis-connection-error", "os-error"])
async def test_a_failure_turns_hints_off_for_the_cooldown_then_they_come_back(error: BaseException) -> None:
    now = [100.0]
    redis, metrics = FlakyRedis(error), Metrics()
    hints = RedisHints(redis, prefix="p", stream="s", ttl=timedelta(days=1), metrics=metrics,  # type: ignore[arg-type]
                       cooldown_s=5.0, monotonic=lambda: now[0])
    digests = [RedisHints.digest(("t", str(i))) for i in range(3)]
    assert await hints.seen(digests) == [False] * 3  # failed: Postgres decides
    assert redis.calls == 1
    assert metrics.registry.get_sample_value("ingest_redis_errors_total") == 1
    now[0] += 4.9
    assert await hints.seen(digests) == [False] * 3
    await hints.remember(digests)
    assert redis.calls == 1  # cooling down: no call at all
    redis.down = False
    now[0] += 0.2
    assert await hints.seen(digests) == [True] * 3
    await hints.remember(digests)
    assert redis.calls == 3


async def test_digests_are_fixed_size_and_unambiguous() -> None:
    assert len(RedisHints.digest(("a", "b"))) == DIGEST_SIZE
    assert RedisHints.digest(("a:b", "c")) != RedisHints.digest(("a", "b:c"))
