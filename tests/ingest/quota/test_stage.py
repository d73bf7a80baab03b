"""ingest.quota.stage with a fake Redis: the zero-cost skip, verdict order, one script call per batch, and the
failure modes (Redis down: pause or fail open)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.metrics import Metrics
from ingest.quota.gcra import State, judge
from ingest.quota.keys import state_key
from ingest.quota.limits import US, LimitBook, Limits, Override
from ingest.quota.stage import RedisQuota
from tests.ingest.quota.helpers import T0, Source

UNLIMITED = Limits()


class FakeScript:
    """Stands in for redis-py's Script: judges like the Lua script, with the same ARGV layout."""

    def __init__(self, owner: FakeRedis) -> None:
        self.owner = owner
        self.sha = "x"

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> list[int]:
        self.owner.calls.append((list(keys), list(args)))
        if self.owner.down:
            raise RedisConnectionError("Connection refused")
        now = int(args[0])
        counts, which = args[1].split(), args[2].split()
        profiles = [args[i:i + 3] for i in range(6, len(args), 3)]  # after now, counts, which, 3 judged fields
        out = []
        for key, count, p in zip(keys, counts, which, strict=True):
            interval, tau, cap = profiles[int(p) - 1]
            per_second = US / float(interval) if float(interval) else 0.0
            burst = round(float(tau) / float(interval)) if float(interval) else 0
            k, self.owner.states[key] = judge(self.owner.states.get(key), now, int(count),
                                              Limits(per_second, burst, int(cap)))
            out.append(k)
        return out


class FakeRedis:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Any]]] = []
        self.states: dict[str, State] = {}
        self.down = False
        self.pings = 0

    def register_script(self, script: str) -> FakeScript:
        return FakeScript(self)

    async def ping(self) -> bool:
        self.pings += 1
        if self.down:
            raise RedisConnectionError("Connection refused")
        return True


class Clock:
    def __init__(self) -> None:
        self.t = T0 / US

    def __call__(self) -> float:
        return self.t


def quota(redis: FakeRedis, table_rows: list[Override], default: Limits = UNLIMITED, **kw: Any) -> RedisQuota:
    src = Source()
    src.rows = table_rows
    book = LimitBook("webhook", default, src, refresh_s=3600)
    return RedisQuota(redis, prefix="p", stream="webhook", book=book, clock=kw.pop("clock", Clock()),  # type: ignore[arg-type]
                      **kw)


async def test_unlimited_batches_never_touch_redis() -> None:
    redis = FakeRedis()
    redis.down = True
    q = quota(redis, [])
    assert await q.admit(["a", "b", "a"] * 1000) == [True] * 3000
    q2 = quota(redis, [Override("x", "webhook", per_second=1)])
    assert await q2.admit(["a", "b"]) == [True, True]  # x is limited, but not in this batch
    assert redis.calls == []
    assert q.metrics.registry.get_sample_value(
        "ingest_quota_decisions_total", {"stream": "webhook", "decision": "unlimited"}) == 3000


async def test_only_limited_tenants_are_sent_and_verdicts_follow_batch_order() -> None:
    redis = FakeRedis()
    q = quota(redis, [Override("x", "", per_second=1, burst=2)])
    verdicts = await q.admit(["x", "a", "x", "b", "x", "x", "a"])
    assert verdicts == [True, True, True, True, False, False, True]
    assert len(redis.calls) == 1
    keys, args = redis.calls[0]
    assert keys == [state_key("p", "webhook", "x")]
    assert args[1:] == ["4", "1", "", "0", b"", repr(1e6), repr(2e6), "0"]  # x's four events in one entry, one profile
    m = q.metrics.registry
    assert m.get_sample_value("ingest_quota_decisions_total", {"stream": "webhook", "decision": "denied"}) == 2
    assert m.get_sample_value("ingest_quota_decisions_total", {"stream": "webhook", "decision": "admitted"}) == 2


async def test_redis_down_raises_by_default_and_flags_paused() -> None:
    redis = FakeRedis()
    q = quota(redis, [], default=Limits(per_second=1))
    redis.down = True
    for _ in range(3):
        with pytest.raises(RedisConnectionError):
            await q.admit(["a"])
    g = q.metrics.registry.get_sample_value
    assert g("ingest_quota_degraded", {"mode": "paused"}) == 1
    redis.down = False
    assert await q.admit(["a"]) == [True]
    assert g("ingest_quota_degraded", {"mode": "paused"}) == 0


async def test_fail_open_uses_local_limits_then_returns_to_redis() -> None:
    redis = FakeRedis()
    q = quota(redis, [], default=Limits(per_second=1, burst=3), fail_open=True, probe_interval_s=0.0)
    redis.down = True
    assert await q.admit(["a"] * 5) == [True] * 3 + [False] * 2  # the same algorithm, in this process
    assert q.metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "fail_open"}) == 1
    assert await q.admit(["a"]) == [False]
    calls = len(redis.calls)
    redis.down = False
    await q.admit(["b"])  # still local: a probe is started in the background
    assert len(redis.calls) == calls
    assert q._probe is not None
    await q._probe
    assert redis.pings >= 1
    await q.admit(["b"])
    assert len(redis.calls) == calls + 1
    assert q.metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "fail_open"}) == 0
    await q.aclose()


def test_metrics_exist() -> None:
    m = Metrics()
    m.quota_decisions.labels("webhook", "denied").inc()
    m.quota_check.labels("webhook").observe(0.001)
    m.quota_refresh_errors.labels("webhook").inc()
    m.quota_degraded.labels("paused").set(0)
