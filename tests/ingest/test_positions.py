"""Where partitions resume: stored offsets checked against the log, the policy, the first store, the fence."""

from __future__ import annotations

import pytest

from ingest import offsets
from ingest.metrics import Metrics
from ingest.offsets import UNSET, LogBounds
from ingest.positions import LogMismatch, Positions
from tests.fakes import Call, FakeConn


class OffsetsTable:
    """Answers the offsets statements from a dict, as Postgres would (compare-and-swap included)."""

    def __init__(self, stored: dict[int, int]) -> None:
        self.stored = dict(stored)
        self.changes: list[tuple[object, ...]] = []

    def answer(self, call: Call) -> object:
        if call.method == "fetch" and call.sql.lstrip().startswith("SELECT partition, next_offset"):
            return [(p, self.stored[p]) for p in call.args[2]]
        if call.method == "fetch" and "UPDATE" in call.sql:  # fence_and_advance: (group, topic, parts, old, new)
            moved = []
            for p, old, new in zip(call.args[2], call.args[3], call.args[4], strict=True):
                if self.stored.get(p) == old:
                    self.stored[p] = new
                    moved.append((p,))
            return moved
        if call.method == "executemany":
            self.changes += call.args[0]
        return [] if call.method == "fetch" else "OK"


def positions(policy: str = "reset", metrics: Metrics | None = None) -> Positions:
    return Positions(stream="webhook", group="g", topic="t", offsets_table="consumer_offsets",
                     changes_table="offset_changes", policy=policy, metrics=metrics or Metrics())


async def test_matching_positions_resume_where_stored_and_nothing_is_recorded() -> None:
    table = OffsetsTable({0: 5, 1: 10})
    got = await positions().resume_at(FakeConn(table.answer), [0, 1], {0: LogBounds(0, 10), 1: LogBounds(0, None)})
    assert got == {0: 5, 1: 10} and table.changes == []


async def test_nothing_stored_resumes_at_the_log_start_and_stores_it() -> None:
    table = OffsetsTable({0: UNSET})
    got = await positions().resume_at(FakeConn(table.answer), [0], {0: LogBounds(7, 20)})
    assert got == {0: 7} and table.stored == {0: 7}, "later expiry of 7.. unread is then a recorded gap"
    assert table.changes == []


async def test_reset_moves_to_the_log_start_records_and_counts() -> None:
    m = Metrics()
    table = OffsetsTable({0: 500, 1: 3})
    got = await positions(metrics=m).resume_at(FakeConn(table.answer), [0, 1],
                                               {0: LogBounds(0, 4), 1: LogBounds(9, 30)})
    assert got == {0: 0, 1: 9} and table.stored == {0: 0, 1: 9}
    kinds = {(c[3], c[4], c[5], c[6], c[9]) for c in table.changes}  # partition, kind, from, to, skipped
    assert kinds == {(0, "beyond_end", 500, 0, 0), (1, "below_start", 3, 9, 6)}
    sample = m.registry.get_sample_value
    assert sample("ingest_log_mismatches_total", {"stream": "webhook", "kind": "beyond_end", "action": "reset"}) == 1
    assert sample("ingest_log_gap_records_total", {"stream": "webhook"}) == 6


async def test_stop_moves_nothing_and_names_the_fix() -> None:
    table = OffsetsTable({2: 500})
    with pytest.raises(LogMismatch) as err:
        await positions("stop").resume_at(FakeConn(table.answer), [2], {2: LogBounds(0, 4)})
    assert table.stored == {2: 500} and table.changes == []
    assert "ingest offsets reset --stream webhook --to-earliest --partition 2 --execute" in str(err.value)


async def test_a_position_moved_meanwhile_is_fenced_and_nothing_is_recorded() -> None:
    table = OffsetsTable({0: 500})
    conn = FakeConn(table.answer)
    original = table.answer

    def racing(call: Call) -> object:  # another owner moves partition 0 between the read and the move
        if call.method == "fetch" and "UPDATE" in call.sql:
            table.stored[0] = 0
        return original(call)

    conn.answer = racing
    with pytest.raises(offsets.Fenced):
        await positions().resume_at(conn, [0], {0: LogBounds(0, 4)})
    assert table.changes == [], "the move is refused before anything is recorded"


def test_series_exist_at_zero_and_policies_are_checked() -> None:
    m = Metrics()
    positions(metrics=m)
    assert m.registry.get_sample_value("ingest_log_gap_records_total", {"stream": "webhook"}) == 0
    assert m.registry.get_sample_value(
        "ingest_log_mismatches_total", {"stream": "webhook", "kind": "below_start", "action": "reset"}) == 0
    with pytest.raises(ValueError):
        positions("skip")
