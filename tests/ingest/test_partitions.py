"""ingest.partitions (pure): period math, plan() around existing partitions, coverage and retention selection."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import settings as env_settings
from consumers.streams import STREAMS, policies
from ingest.maintenance import Maintenance, TablePolicy
from ingest.partitions import (
    GRANULARITIES,
    Partition,
    coverage,
    cutoff,
    expired,
    midnight,
    next_period,
    partition_name,
    period_start,
    plan,
)


def d(text: str) -> date:
    return date.fromisoformat(text)


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def parts(ranges: list[tuple[datetime, datetime]], table: str = "ev") -> list[Partition]:
    return [Partition(f"public.{partition_name(table, s)}", s, e) for s, e in ranges]


def assert_tiles(have: list[Partition]) -> None:
    """No two partitions overlap."""
    ordered = sorted(have, key=lambda p: p.start)
    for a, b in itertools.pairwise(ordered):
        assert a.end <= b.start, (a, b)


# -- period math ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("day", "granularity", "start", "after"), [
    ("2024-03-15", "day", "2024-03-15", "2024-03-16"),
    ("2024-12-31", "day", "2024-12-31", "2025-01-01"),
    ("2024-02-28", "day", "2024-02-28", "2024-02-29"),  # leap year
    ("2023-02-28", "day", "2023-02-28", "2023-03-01"),
    ("2024-03-15", "week", "2024-03-11", "2024-03-18"),  # weeks start on Monday
    ("2024-03-11", "week", "2024-03-11", "2024-03-18"),
    ("2024-03-17", "week", "2024-03-11", "2024-03-18"),  # Sunday
    ("2025-01-01", "week", "2024-12-30", "2025-01-06"),  # across the year
    ("2024-02-29", "week", "2024-02-26", "2024-03-04"),  # across a leap-day month end
    ("2024-03-15", "month", "2024-03-01", "2024-04-01"),
    ("2024-01-31", "month", "2024-01-01", "2024-02-01"),
    ("2024-02-29", "month", "2024-02-01", "2024-03-01"),
    ("2023-02-28", "month", "2023-02-01", "2023-03-01"),
    ("2024-12-31", "month", "2024-12-01", "2025-01-01"),
])
def test_period_boundaries(day: str, granularity: str, start: str, after: str) -> None:
    assert period_start(d(day), granularity) == d(start)
    assert next_period(d(start), granularity) == d(after)


def test_unknown_granularity_is_refused() -> None:
    with pytest.raises(ValueError, match="granularity"):
        period_start(d("2024-01-01"), "hour")
    with pytest.raises(ValueError, match="granularity"):
        next_period(d("2024-01-01"), "year")
    with pytest.raises(ValueError, match="granularity"):
        Maintenance(None, [TablePolicy("ev", "hour")])  # type: ignore[arg-type]


def test_partition_names_come_from_the_start_date() -> None:
    assert partition_name("webhook_events", t("2024-02-29T00:00:00")) == "webhook_events_p20240229"


# -- plan -------------------------------------------------------------------------------------------------------

def test_plan_from_nothing_covers_whole_periods() -> None:
    assert plan([], d("2024-02-28"), d("2024-03-01"), "day") == [
        (t("2024-02-28T00:00:00"), t("2024-02-29T00:00:00")),
        (t("2024-02-29T00:00:00"), t("2024-03-01T00:00:00")),
        (t("2024-03-01T00:00:00"), t("2024-03-02T00:00:00")),
    ]
    assert plan([], d("2024-01-31"), d("2024-02-01"), "month") == [
        (t("2024-01-01T00:00:00"), t("2024-02-01T00:00:00")),
        (t("2024-02-01T00:00:00"), t("2024-03-01T00:00:00")),
    ]
    assert plan([], d("2024-12-31"), d("2025-01-01"), "week") == [
        (t("2024-12-30T00:00:00"), t("2025-01-06T00:00:00")),
    ]


def test_plan_is_empty_when_covered() -> None:
    have = parts(plan([], d("2024-03-01"), d("2024-03-31"), "day"))
    assert plan(have, d("2024-03-05"), d("2024-03-20"), "day") == []
    assert plan(have, d("2024-03-05"), d("2024-03-20"), "month") == []


def test_day_to_month_keeps_day_partitions_and_fills_the_rest_of_the_month() -> None:
    days = parts(plan([], d("2024-02-27"), d("2024-03-14"), "day"))
    gaps = plan(days, d("2024-02-27"), d("2024-04-20"), "month")
    # February is covered from the 27th only: its beginning is filled too (a whole period was asked for).
    assert gaps == [
        (t("2024-02-01T00:00:00"), t("2024-02-27T00:00:00")),
        (t("2024-03-15T00:00:00"), t("2024-04-01T00:00:00")),
        (t("2024-04-01T00:00:00"), t("2024-05-01T00:00:00")),
    ]
    after = days + parts(gaps)
    assert_tiles(after)
    assert all(p in after for p in days)  # old partitions untouched


def test_month_to_day_only_adds_days_after_the_month() -> None:
    march = parts([(t("2024-03-01T00:00:00"), t("2024-04-01T00:00:00"))])
    assert plan(march, d("2024-03-30"), d("2024-04-02"), "day") == [
        (t("2024-04-01T00:00:00"), t("2024-04-02T00:00:00")),
        (t("2024-04-02T00:00:00"), t("2024-04-03T00:00:00")),
    ]


def test_week_to_month_fills_the_partial_month() -> None:
    weeks = parts(plan([], d("2024-04-01"), d("2024-04-14"), "week"))  # Mon 1 Apr .. Sun 14 Apr
    assert plan(weeks, d("2024-04-01"), d("2024-05-03"), "month") == [
        (t("2024-04-15T00:00:00"), t("2024-05-01T00:00:00")),
        (t("2024-05-01T00:00:00"), t("2024-06-01T00:00:00")),
    ]


@settings(max_examples=200, deadline=None)
@given(first=st.dates(date(2023, 1, 1), date(2025, 12, 31)), span=st.integers(0, 80),
       g1=st.sampled_from(GRANULARITIES), g2=st.sampled_from(GRANULARITIES),
       shift=st.integers(-60, 60), span2=st.integers(0, 80))
def test_plan_never_overlaps_and_covers(first: date, span: int, g1: str, g2: str, shift: int, span2: int) -> None:
    have = parts(plan([], first, first + timedelta(days=span), g1))
    first2 = first + timedelta(days=shift)
    last2 = first2 + timedelta(days=span2)
    after = have + parts(plan(have, first2, last2, g2))
    assert_tiles(after)
    # every day of the second window is inside some partition
    day = first2
    while day <= last2:
        assert any(p.start <= midnight(day) < p.end for p in after), day
        day += timedelta(days=1)
    assert plan(after, first2, last2, g2) == []


# -- coverage and retention with a moved clock -------------------------------------------------------------------

def test_coverage_window_in_whole_utc_days() -> None:
    now = t("2024-03-01T23:30:00")
    assert coverage(now, timedelta(days=1), timedelta(days=7)) == (d("2024-02-29"), d("2024-03-08"))
    # an aware non-UTC clock is converted first
    assert coverage(t("2024-03-02T00:30:00+02:00"), timedelta(0), timedelta(0)) == (d("2024-03-01"), d("2024-03-01"))


def test_retention_selects_partitions_ending_at_or_before_the_cutoff() -> None:
    daily = parts(plan([], d("2024-01-01"), d("2024-04-30"), "day"))
    now = t("2024-04-30T10:00:00")
    assert cutoff(now, timedelta(days=90)) == t("2024-01-31T00:00:00")
    gone = expired(daily, now, timedelta(days=90))
    assert [p.relname for p in gone] == [f"ev_p202401{n:02d}" for n in range(1, 31)]
    # the clock moves 10 days: 10 more go
    later = expired(daily, now + timedelta(days=10), timedelta(days=90))
    assert len(later) == 40 and later[-1].relname == "ev_p20240209"
    # across the leap day
    assert [p.relname for p in expired(daily, t("2024-05-30T01:00:00"), timedelta(days=90))][-2:] == [
        "ev_p20240228", "ev_p20240229"]


def test_retention_keeps_a_month_until_it_ends_before_the_cutoff() -> None:
    months = parts(plan([], d("2024-01-01"), d("2024-04-30"), "month"))
    assert expired(months, t("2024-04-30T00:00:00"), timedelta(days=90)) == []  # cutoff 2024-01-31
    assert [p.relname for p in expired(months, t("2024-05-01T00:00:00"), timedelta(days=90))] == ["ev_p20240101"]


@settings(max_examples=200, deadline=None)
@given(now=st.datetimes(datetime(2023, 1, 1), datetime(2026, 1, 1), timezones=st.just(UTC)),
       retention=st.integers(1, 400), premake=st.integers(0, 30), g=st.sampled_from(GRANULARITIES))
def test_what_is_created_is_never_pruned_in_the_same_round(now: datetime, retention: int, premake: int,
                                                           g: str) -> None:
    ret = timedelta(days=retention)
    first, last = coverage(now, ret, timedelta(days=premake))
    have = parts(plan([], first, last, g))
    assert expired(have, now, ret) == []
    # and the oldest instant the validator accepts (now - retention) is inside a partition
    assert any(p.start <= now - ret < p.end for p in have)


def test_default_settings_give_every_accepted_event_a_partition() -> None:
    """The validator window [now - max_age, now + max_ahead] lies inside the partition coverage."""
    for env in ({}, {"INGEST_ACCEPT_MAX_AGE_SECONDS": str(200 * 86400)}, {"INGEST_PARTITION_GRANULARITY": "month"},
                {"INGEST_PARTITION_PREMAKE_DAYS": "1", "INGEST_ACCEPT_MAX_AHEAD_SECONDS": str(3 * 86400)}):
        cfg = env_settings.from_env(env)
        now = t("2024-02-29T23:59:59")
        for pol in policies(cfg, list(STREAMS.values())):
            first, last = coverage(now, pol.retention, pol.premake)
            have = parts(plan([], first, last, pol.granularity))
            for instant in (now - cfg.window.max_age, now + cfg.window.max_ahead):
                assert any(p.start <= instant < p.end for p in have), (env, instant)
