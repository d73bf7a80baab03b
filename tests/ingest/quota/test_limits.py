"""ingest.quota.limits: limit properties, resolution of overrides, and the refresh rules of ``LimitBook``."""

from __future__ import annotations

import pytest

from ingest.quota.limits import LimitBook, Limits, LimitTable, Override
from tests.ingest.quota.helpers import Source


def test_burst_defaults_to_one_second_of_rate() -> None:
    assert Limits(per_second=10).effective_burst == 10
    assert Limits(per_second=0.5).effective_burst == 1


def test_unlimited() -> None:
    assert Limits().unlimited and Limits(burst=5).unlimited
    assert not Limits(per_second=1).unlimited and not Limits(per_day=1).unlimited


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
