"""ingest.quota.admin: what ``ingest quota get/list`` shows, computed from a state without changing it."""

from __future__ import annotations

from ingest.quota.admin import usage
from ingest.quota.gcra import DAY_US, judge
from ingest.quota.limits import US, Limits
from tests.ingest.quota.helpers import T0


def test_usage_reports_today_and_burst_left() -> None:
    lim = Limits(per_second=100, burst=200, per_day=10_000)
    _, s = judge(None, T0, 150, lim)
    u = usage(s, lim, T0)
    assert (u.used_today, u.denied_today, u.burst_left) == (150, 0, 50)
    assert usage(s, lim, T0 + 10 * US).burst_left == 200
    assert usage(s, lim, T0 + DAY_US).used_today == 0
    assert usage(None, Limits(per_day=5), T0).burst_left is None
