"""ingest.quota.gcra in Python: the GCRA + daily-cap arithmetic (``judge``), state expiry and parsing, the
per-process ``LocalLimiter``, and the ARGV layout of the Lua script. (The Lua script itself runs against a real
Redis in tests/integration/test_quota.py, which checks it agrees with ``judge``.)"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.quota.gcra import DAY_US, LocalLimiter, State, judge, parse_state, script_args, state_ttl_ms
from ingest.quota.limits import US, Limits
from tests.ingest.quota.helpers import T0


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


def test_default_burst_is_one_second_of_rate() -> None:
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


def test_cap_only_and_unlimited() -> None:
    assert run(Limits(per_day=3), [(0, 2), (0, 2), (5, 2)]) == [2, 1, 0]
    assert run(Limits(), [(0, 10**6), (0, 10**6)]) == [10**6, 10**6]  # the script is never sent these; still sane


def test_state_is_kept_until_its_tat_and_its_utc_day_have_passed_plus_an_hour() -> None:
    noon = int(datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()) * US
    midnight = int(datetime(2024, 3, 2, tzinfo=UTC).timestamp()) * US
    _, s = judge(None, noon, 1, Limits(per_day=5))
    assert state_ttl_ms(s, noon) == (midnight - noon) // 1000 + 3_600_000
    _, s = judge(None, noon, 10, Limits(per_second=1e-4, burst=10))  # TAT 10 * 10,000 s ahead: past midnight
    assert s.tat == noon + 10 * 10_000 * US
    assert state_ttl_ms(s, noon) == 10 * 10_000 * 1000 + 3_600_000


def test_parse_state() -> None:
    assert parse_state(None) is None
    assert parse_state(b"1700000000000000 19675 3 4") == State(1.7e15, 19675, 3, 4)
    assert parse_state("1700000000000000 19675 3 4") == State(1.7e15, 19675, 3, 4)


def test_local_limiter_matches_judge() -> None:
    local = LocalLimiter()
    lim = Limits(per_second=100, burst=200)
    assert local.decide([("a", 250, lim), ("b", 10, lim)], T0) == [200, 10]
    assert local.decide([("a", 100, lim)], T0 + US // 2) == [50]


def test_local_limiter_forgets_expired_states_beyond_100000_keys() -> None:
    local = LocalLimiter()
    lim = Limits(per_day=1)
    local.decide([(f"t{i}", 1, lim) for i in range(100_001)], T0)
    assert len(local.states) == 100_001  # all still today's
    local.decide([("late", 1, lim)], T0 + 3 * DAY_US)
    assert list(local.states) == ["late"]


def test_script_args_share_profiles_and_send_exact_floats() -> None:
    a, b = Limits(per_second=3, burst=7), Limits(per_day=9)
    args = script_args(T0, [(4, a), (1, b), (2, a)])
    assert args == [str(T0), "4 1 2", "1 2 1", "", "0", b"", repr(US / 3), repr(7 * (US / 3)), "0", "0.0", "0.0", "9"]
    judged = script_args(T0, [(2, b)], ("ingest:qj:webhook:", 60, [b"a" * 16, b"b" * 16]))
    assert judged[3:6] == ["ingest:qj:webhook:", "60", b"a" * 16 + b"b" * 16]
    assert float(args[6]) == a.interval_us and float(args[7]) == a.tolerance_us  # repr round-trips exactly
    assert script_args(None, [(1, b)])[0] == ""  # the script then reads Redis TIME


# -- properties ------------------------------------------------------------------------------------------------
rates = st.sampled_from([0.5, 1, 3, 7, 100, 1000, 12_345.6])
steps = st.lists(st.tuples(st.integers(0, 5 * US), st.integers(0, 500)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(per_second=rates, burst=st.integers(0, 300), steps=steps)
def test_never_more_than_the_burst_plus_the_rate_since_the_first_event(
        per_second: float, burst: int, steps: list[tuple[int, int]]) -> None:
    lim = Limits(per_second=per_second, burst=burst)
    state: State | None = None
    now, admitted = T0, 0
    for gap, count in steps:
        now += gap
        k, state = judge(state, now, count, lim)
        assert 0 <= k <= count
        admitted += k
        assert admitted <= math.floor(lim.effective_burst + (now - T0) / US * per_second + 1e-6)


@settings(max_examples=300, deadline=None)
@given(per_second=rates, burst=st.integers(0, 300), steps=steps)
def test_a_full_burst_is_back_once_the_tat_has_passed(per_second: float, burst: int,
                                                      steps: list[tuple[int, int]]) -> None:
    lim = Limits(per_second=per_second, burst=burst)
    state: State | None = None
    now = T0
    for gap, count in steps:
        now += gap
        _, state = judge(state, now, count, lim)
    assert state is not None
    later = max(now, math.ceil(state.tat))
    assert judge(state, later, 10 * lim.effective_burst, lim)[0] == lim.effective_burst


@settings(max_examples=300, deadline=None)
@given(per_day=st.integers(1, 1000), steps=st.lists(st.tuples(st.integers(0, DAY_US // 3), st.integers(0, 400)),
                                                    min_size=1, max_size=30))
def test_the_daily_cap_holds_and_every_event_of_the_day_is_counted(per_day: int,
                                                                   steps: list[tuple[int, int]]) -> None:
    lim = Limits(per_day=per_day)
    state: State | None = None
    now, asked = T0, 0
    for gap, count in steps:
        day = now // DAY_US
        now += gap
        asked = count if now // DAY_US != day else asked + count
        _, state = judge(state, now, count, lim)
        assert state.used <= per_day
        assert state.used + state.denied == asked
