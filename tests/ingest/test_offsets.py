"""Positions against the log's bounds: which mismatches exist and what each move skips or re-reads."""

from __future__ import annotations

from ingest.offsets import UNSET, Kind, LogBounds, Move, mismatches


def test_positions_inside_the_log_and_unset_match() -> None:
    bounds = {0: LogBounds(0, 10), 1: LogBounds(5, 10), 2: LogBounds(5, 10), 3: LogBounds(0, 0)}
    assert mismatches({0: 10, 1: 5, 2: UNSET, 3: 0}, bounds) == []


def test_beyond_the_end_restarts_at_the_log_start_and_skips_nothing() -> None:
    (m,) = mismatches({0: 500}, {0: LogBounds(0, 4)})
    assert (m.kind, m.old, m.new, m.skipped, m.reread) == (Kind.BEYOND_END, 500, 0, 0, 0)


def test_below_the_start_is_a_gap_of_the_records_removed_unread() -> None:
    (m,) = mismatches({3: 100}, {3: LogBounds(250, 900)})
    assert (m.partition, m.kind, m.old, m.new, m.skipped) == (3, Kind.BELOW_START, 100, 250, 150)


def test_partitions_without_bounds_are_not_judged() -> None:
    assert mismatches({0: 500}, {}) == []


def test_reset_counts_what_is_skipped_or_read_again() -> None:
    b = LogBounds(100, 1000)
    assert (Move(0, Kind.RESET, 400, 1000, b).skipped, Move(0, Kind.RESET, 400, 1000, b).reread) == (600, 0)
    assert (Move(0, Kind.RESET, 400, 100, b).skipped, Move(0, Kind.RESET, 400, 100, b).reread) == (0, 300)
    assert Move(0, Kind.RESET, UNSET, 1000, b).skipped == 900, "nothing read yet: from the log start"
    assert Move(0, Kind.RESET, 50, 100, b).skipped == 0, "a stored offset below the start counts from the start"


def test_an_end_seen_from_another_position_does_not_judge_the_stored_one() -> None:
    # A consumer saw the log end at 300 while reading at 250; meanwhile another owner stored 500 (the log grew):
    # 500 is not past the end, the observation is simply stale.
    assert mismatches({0: 500}, {0: LogBounds(0, 300, seen_at=250)}) == []
    (m,) = mismatches({0: 500}, {0: LogBounds(0, 4, seen_at=500)})  # a fetch at 500 saw the log end at 4
    assert m.kind is Kind.BEYOND_END
