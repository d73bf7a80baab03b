"""consumers.streams names every topic, group, table and stream once; the rest of the code asks it."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from consumers import streams


def test_shared_tables_are_every_streams() -> None:
    shared = streams.shared_tables()
    for s in streams.STREAMS.values():
        t = s.tables()
        assert (t.dead_letters, t.ledger, t.offsets, t.offset_changes) == (
            shared.dead_letters, shared.ledger, shared.offsets, shared.offset_changes)


def test_streams_that_disagree_on_a_shared_table_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = dataclasses.replace(streams.AUDIT.tables(), ledger="other_ledger")
    monkeypatch.setattr(streams, "STREAMS", {**streams.STREAMS, "odd": SimpleNamespace(tables=lambda: odd)})
    with pytest.raises(RuntimeError, match="other_ledger"):
        streams.shared_tables()


def test_select_and_choices() -> None:
    assert (*streams.STREAMS, streams.ALL) == streams.CHOICES
    assert streams.select(streams.ALL) == list(streams.STREAMS.values())
    assert streams.select("audit") == [streams.AUDIT]
    with pytest.raises(ValueError, match="choose webhook, audit or all"):
        streams.select("billing")
