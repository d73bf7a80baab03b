"""ingest.quota without services: the GCRA + daily-cap arithmetic, limit resolution and refresh, the zero-cost
skip, verdict order, failure modes (with a fake Redis), cluster slot grouping, and the settings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from consumers.settings import SettingsError, from_env
from ingest.metrics import Metrics
from ingest.quota import (
    DAY_US,
    US,
    LimitBook,
    Limits,
    LimitTable,
    LocalLimiter,
    Override,
    RedisQuota,
    State,
    group_by_slot,
    judge,
    parse_key,
    parse_state,
    state_key,
    usage,
)

UNLIMITED = Limits()
T0 = 1_700_000_000 * US  # a whole second, in µs


def run(limits: Limits, steps: Sequence[tuple[float, int]]) -> list[int]:
    """Admitted counts for (seconds since T0, events) steps, carrying the state like Redis does."""
    state: State | None = None
    out = []
    for at, count in steps:
        k, state = judge(state, T0 + round(at * US), count, limits)
        out.append(k)
    return out


def test_burst_then_rate() -> None:
    lim = Limits(per_second=100, burst=200)
    # 250 at once: the burst; then nothing more at the same instant; then 100/s refills.
    assert run(lim, [(0, 250), (0, 1), (0.5, 100), (1.0, 100), (1.01, 1), (10, 1000)]) == [200, 0, 50, 50, 1, 200]


def test_burst_defaults_to_one_second_of_rate() -> None:
    assert Limits(per_second=10).effective_burst == 10
    assert Limits(per_second=0.5).effective_burst == 1
    assert run(Limits(per_second=0.5), [(0, 5), (1, 1), (2, 1), (2, 1)]) == [1, 0, 1, 0]


def test_denied_events_consume_nothing() -> None:
    lim = Limits(per_second=10, burst=10, per_day=15)
    state: State | None = None
    k, state = judge(state, T0, 10, lim)
    assert k == 10
    before = state
    for _ in range(5):  # a tenant hammering while empty: TAT and daily count do not move
        k, state = judge(state, T0, 1000, lim)
        assert k == 0
    assert (state.tat, state.used) == (before.tat, before.used)
    assert state.denied == 5000
    k, state = judge(state, T0 + US, 100, lim)
    assert k == 5  # rate would allow 10, the daily cap leaves 5


def test_daily_cap_resets_at_utc_midnight() -> None:
    last_second = int(datetime(2024, 3, 1, 23, 59, 59, tzinfo=UTC).timestamp()) * US
    lim = Limits(per_day=1000)
    k, s = judge(None, last_second, 1200, lim)
    assert k == 1000 and s.denied == 200
    k, s = judge(s, last_second + US // 2, 1, lim)
    assert k == 0
    k, s = judge(s, last_second + US, 1200, lim)  # 00:00:00 the next UTC day
    assert k == 1000 and (s.used, s.denied) == (1000, 200)
    assert s.day == last_second // DAY_US + 1


def test_unlimited_and_rate_only_and_cap_only() -> None:
    assert Limits().unlimited and Limits(burst=5).unlimited
    assert not Limits(per_second=1).unlimited and not Limits(per_day=1).unlimited
    assert run(Limits(per_day=3), [(0, 2), (0, 2), (5, 2)]) == [2, 1, 0]


def test_usage_reports_today_and_burst_left() -> None:
    lim = Limits(per_second=100, burst=200, per_day=10_000)
    _, s = judge(None, T0, 150, lim)
    u = usage(s, lim, T0)
    assert (u.used_today, u.denied_today, u.burst_left) == (150, 0, 50)
    assert usage(s, lim, T0 + 10 * US).burst_left == 200
    assert usage(s, lim, T0 + DAY_US).used_today == 0
    assert usage(None, Limits(per_day=5), T0).burst_left is None


def test_resolution_stream_override_beats_tenant_override_beats_default() -> None:
    default = Limits(per_second=10, burst=20, per_day=1000)
    rows = [Override("a", "", per_second=50), Override("a", "webhook", burst=99),
            Override("b", "audit", per_second=0, per_day=0), Override("c", "", per_day=0)]
    web = LimitTable.build("webhook", default, rows)
    audit = LimitTable.build("audit", default, rows)
    assert web.limits_for("a") == Limits(50, 99, 1000)
    assert audit.limits_for("a") == Limits(50, 20, 1000)
    assert audit.limits_for("b").unlimited and web.limits_for("b") == default
    assert web.limits_for("c") == Limits(10, 20, 0)
    assert web.limits_for("zzz") == default


def test_any_limited() -> None:
    assert not LimitTable.build("webhook", Limits(), []).any_limited
    assert LimitTable.build("webhook", Limits(), [Override("a", "webhook", per_day=5)]).any_limited
    assert not LimitTable.build("audit", Limits(), [Override("a", "webhook", per_day=5)]).any_limited


class Source:
    def __init__(self) -> None:
        self.rows: list[Override] = []
        self.ver = 1
        self.version_calls = self.loads = 0
        self.fail = False

    async def version(self) -> int:
        self.version_calls += 1
        if self.fail:
            raise OSError("postgres down")
        return self.ver

    async def load(self) -> tuple[int, list[Override]]:
        self.loads += 1
        if self.fail:
            raise OSError("postgres down")
        return self.ver, list(self.rows)


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_book_refreshes_at_most_once_per_interval_and_only_reloads_on_change() -> None:
    src, mono = Source(), Mono()
    book = LimitBook("webhook", Limits(), src, refresh_s=2, monotonic=mono)
    assert not (await book.get()).any_limited
    assert src.loads == 1
    src.rows, src.ver = [Override("a", "", per_second=1)], 2
    for _ in range(100):  # many batches inside one interval: no query at all
        assert not (await book.get()).any_limited
    assert (src.version_calls, src.loads) == (0, 1)
    mono.t += 2
    assert (await book.get()).limits_for("a") == Limits(1, 0, 0)
    assert (src.version_calls, src.loads) == (1, 2)
    mono.t += 2
    await book.get()  # version unchanged: no reload
    assert (src.version_calls, src.loads) == (2, 2)


async def test_book_keeps_last_limits_when_refresh_fails_but_first_load_must_succeed() -> None:
    src, mono = Source(), Mono()
    src.fail = True
    book = LimitBook("webhook", Limits(), src, refresh_s=2, monotonic=mono)
    with pytest.raises(OSError):
        await book.get()
    src.fail = False
    src.rows = [Override("a", "", per_day=5)]
    mono.t += 2
    assert (await book.get()).limits_for("a").per_day == 5
    src.fail = True
    mono.t += 2
    assert (await book.get()).limits_for("a").per_day == 5


class FakeScript:
    """Stands in for redis-py's Script: judges like the Lua script, with the same ARGV layout."""

    def __init__(self, owner: FakeRedis) -> None:
        self.owner = owner
        self.sha = "x"

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> list[int]:
        self.owner.calls.append((list(keys), list(args)))
        if self.owner.down:
            raise RedisConnectionError("Connection refused")
        now = int(args[0])
        counts, which = args[1].split(), args[2].split()
        profiles = [args[i:i + 3] for i in range(3, len(args), 3)]
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
        self.calls: list[tuple[list[str], list[str]]] = []
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
    assert args[1:] == ["4", "1", repr(1e6), repr(2e6), "0"]  # x's four events in one entry, one profile
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


def test_local_limiter_matches_judge() -> None:
    local = LocalLimiter()
    lim = Limits(per_second=100, burst=200)
    assert local.decide([("a", 250, lim), ("b", 10, lim)], T0) == [200, 10]
    assert local.decide([("a", 100, lim)], T0 + US // 2) == [50]


def test_keys_carry_the_tenant_as_hash_tag() -> None:
    k = state_key("ingest", "webhook", "org:7.a-b")
    assert k == "ingest:q:webhook:{org:7.a-b}"
    assert parse_key("ingest", k) == ("webhook", "org:7.a-b")
    assert parse_key("ingest", "ingest:dd:webhook:x") is None
    groups = group_by_slot([state_key("p", "webhook", "t1"), state_key("p", "audit", "t1"),
                            state_key("p", "webhook", "t2")])
    assert sorted(map(sorted, groups.values()))[0][:2] == [0, 1]  # one tenant, one slot, whatever the stream
    assert sum(len(v) for v in groups.values()) == 3


def test_parse_state() -> None:
    assert parse_state(None) is None
    assert parse_state(b"1700000000000000 19675 3 4") == State(1.7e15, 19675, 3, 4)


def test_settings() -> None:
    cfg = from_env({})
    assert (cfg.quota.default_per_second, cfg.quota.default_burst, cfg.quota.default_per_day) == (0, 0, 0)
    assert cfg.quota.refresh == timedelta(seconds=2) and cfg.quota.fail_open is False
    cfg = from_env({"INGEST_QUOTA_DEFAULT_PER_SECOND": "2.5", "INGEST_QUOTA_DEFAULT_BURST": "10",
                    "INGEST_QUOTA_DEFAULT_PER_DAY": "1000", "INGEST_QUOTA_REFRESH_SECONDS": "0.5",
                    "INGEST_QUOTA_FAIL_OPEN": "true"})
    assert (cfg.quota.default_per_second, cfg.quota.default_burst, cfg.quota.default_per_day) == (2.5, 10, 1000)
    assert cfg.quota.refresh == timedelta(milliseconds=500) and cfg.quota.fail_open is True
    for name, value in [("INGEST_QUOTA_DEFAULT_PER_SECOND", "-1"), ("INGEST_QUOTA_DEFAULT_BURST", "x"),
                        ("INGEST_QUOTA_REFRESH_SECONDS", "0"), ("INGEST_QUOTA_FAIL_OPEN", "maybe"),
                        ("INGEST_QUOTA_DEFAULT_PER_SECOND", "inf")]:
        with pytest.raises(SettingsError, match=name):
            from_env({name: value})


def test_metrics_exist() -> None:
    m = Metrics()
    m.quota_decisions.labels("webhook", "denied").inc()
    m.quota_check.labels("webhook").observe(0.001)
    m.quota_refresh_errors.labels("webhook").inc()
    m.quota_degraded.labels("paused").set(0)
