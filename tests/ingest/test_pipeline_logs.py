"""Reject logging is summarised and rate-limited, and never contains payloads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from consumers import streams
from consumers.settings import from_env
from ingest.metrics import Metrics
from ingest.pipeline import Pipeline
from ingest.rows import Candidate, SimpleRecord
from ingest.writer import WriteResult

Rec = SimpleRecord


class FakeWriter:
    async def write(self, conn: Any, candidates: Sequence[Candidate], dead_letters: Sequence[Any],
                    expected: dict[int, int], advance: dict[int, int]) -> WriteResult:
        return WriteResult(stored=list(candidates))


def pipeline() -> Pipeline:
    return Pipeline(stream="webhook", contract=streams.WEBHOOK.contract(DEFAULTS), limits=DEFAULTS.decode,
                    writer=FakeWriter(), hints=None, metrics=Metrics())  # type: ignore[arg-type]


DEFAULTS = from_env({})
SECRET = b"not json, and secret-looking: hunter2"


async def test_rejects_are_summarised_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    p = pipeline()
    caplog.set_level(logging.WARNING, logger="ingest.pipeline")
    for i in range(3):
        await p.process(None, [Rec("events.webhook", 0, i, None, SECRET, 0)], {0: i})  # type: ignore[arg-type]
    lines = [r for r in caplog.records if r.getMessage() == "records dead-lettered"]
    assert len(lines) == 1
    assert lines[0].by_reason == {"not_json": 1}  # type: ignore[attr-defined]
    assert lines[0].example == {"reason": "not_json", "topic": "events.webhook", "partition": 0,  # type: ignore[attr-defined]
                                "offset": 0}
    # After the interval, the next line sums everything since the last one.
    p._last_reject_log -= timedelta(seconds=p.REJECT_LOG_INTERVAL).total_seconds()
    await p.process(None, [Rec("events.webhook", 0, 3, None, None, 0)], {0: 3})  # type: ignore[arg-type]
    lines = [r for r in caplog.records if r.getMessage() == "records dead-lettered"]
    assert len(lines) == 2
    assert lines[1].by_reason == {"not_json": 2, "tombstone": 1}  # type: ignore[attr-defined]
    assert all(b"hunter2" not in r.getMessage().encode() and "hunter2" not in str(r.__dict__) for r in caplog.records)
