"""Lag arithmetic (consumers.cli.status.lag): lag never reads 0 while records are unread."""

from __future__ import annotations

from consumers.cli import status


def test_lag_counts_from_the_beginning_when_nothing_was_consumed() -> None:
    end = status.EndOffset(beginning=5, end=50, highwater=50, listed=12)
    assert status.lag_of(end, -1) == 45
    assert status.lag_of(end, None) == 45
    assert status.lag_of(end, 50) == 0
    assert status.lag_of(end, 48) == 2
    assert status.lag_of(None, 10) is None


def test_lag_never_reads_zero_for_a_position_outside_the_log() -> None:
    end = status.EndOffset(beginning=5, end=50, highwater=50, listed=50)
    # Past the end (topic recreated): everything in the log is unread.
    assert status.mismatch_of(end, 500) == "beyond_end" and status.lag_of(end, 500) == 45
    # Below the start (expired unread): what is left of the log is unread; the gap itself is gone.
    assert status.mismatch_of(end, 2) == "below_start" and status.lag_of(end, 2) == 45
    assert status.mismatch_of(end, 50) is None and status.mismatch_of(end, 5) is None
    assert status.mismatch_of(end, -1) is None
    row = status.partition_row(3, end, 500)
    assert (row["next_offset"], row["log_start"], row["log_end"], row["lag"], row["mismatch"]) == \
        (500, 5, 50, 45, "beyond_end")
