"""The per-partition workflow: assign -> position -> accept/advance -> reposition/revoke, with epochs."""

from __future__ import annotations

from ingest.partition_state import UNSET, Partitions, Status


def test_assigned_partitions_wait_for_a_position() -> None:
    parts = Partitions()
    assert parts.assign({0, 1}) == {0, 1}
    assert parts.positioned() == {} and parts.assigned() == {0, 1}
    assert parts.accept(0, parts.epoch(0), [0, 1]) == [], "nothing is read before the partition is positioned"


def test_position_sets_stored_cursor_and_a_new_epoch() -> None:
    parts = Partitions()
    parts.assign({0, 1})
    assert parts.position(0, 10, start=0) and parts.position(1, UNSET, start=7)
    s0, s1 = parts.positioned()[0], parts.positioned()[1]
    assert (s0.stored, s0.cursor, s0.position, s0.epoch) == (10, 10, 10, 1)
    assert (s1.stored, s1.cursor, s1.position) == (UNSET, 7, 7), "nothing stored yet: read from the log start"
    assert not parts.position(0, 99, start=0), "an already positioned partition is not moved by position()"
    assert parts.positioned()[0].stored == 10


def test_accept_takes_records_at_or_past_the_cursor_and_moves_it() -> None:
    parts = Partitions()
    parts.assign({0})
    parts.position(0, 10, start=0)
    assert parts.accept(0, 1, [8, 9, 10, 11]) == [2, 3]
    assert parts.positioned()[0].cursor == 12
    assert parts.accept(0, 1, [11, 12]) == [1]
    assert parts.accept(0, 0, [13]) == [], "a fetch made under an older epoch is not taken"


def test_reposition_makes_staged_records_unwritable_even_at_the_same_offset() -> None:
    parts = Partitions()
    parts.assign({0})
    parts.position(0, 10, start=0)
    assert parts.writable(0, 1, 10) and not parts.writable(0, 1, 9)
    assert parts.reposition(0)
    assert parts.unpositioned() == {0} and not parts.writable(0, 1, 10)
    parts.position(0, 10, start=0)
    assert parts.epoch(0) == 3
    assert not parts.writable(0, 1, 10), "staged before the re-positioning: its epoch is gone"
    assert parts.writable(0, 3, 10)


def test_advance_moves_stored_forward_only_while_positioned() -> None:
    parts = Partitions()
    parts.assign({0})
    parts.position(0, 10, start=0)
    parts.advance(0, 15)
    parts.advance(0, 12)
    assert parts.expected([0]) == {0: 15}
    parts.revoke(0)
    parts.advance(0, 20)
    assert parts.get(0) is None, "a partition revoked while its batch was written stays forgotten"


def test_revoke_and_reassign_keep_the_epoch_growing() -> None:
    parts = Partitions()
    parts.assign({0, 1})
    parts.position(0, 5, start=0)
    epoch = parts.epoch(0)
    assert parts.assign({1}) == {1}, "0 is revoked by the new assignment"
    assert parts.get(0) is None and parts.epoch(0) > epoch
    assert parts.assign({0, 1}) == {0, 1}
    s = parts.get(0)
    assert s is not None and s.status is Status.UNPOSITIONED and s.stored == UNSET
    assert not parts.reposition(7), "an unknown partition is not assigned"
