"""Positioning inside the consumer loop: a partition moved by another owner meanwhile is read again, not fatal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from consumers.settings import from_env
from ingest import offsets
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from tests.fakes import PARTITION_0, TOPIC, FakeKafka, FakePool


class FencedOnce:
    """``Positions`` whose first answer is a fence (another owner moved partition 0), then 42."""

    def __init__(self) -> None:
        self.calls = 0

    async def resume_at(self, conn: Any, parts: Sequence[int], bounds: Mapping[int, offsets.LogBounds]) -> dict[int, int]:
        self.calls += 1
        if self.calls == 1:
            raise offsets.Fenced([0])
        return dict.fromkeys(parts, 42)


async def test_a_fence_while_positioning_leaves_the_partition_paused_until_the_next_turn() -> None:
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=None,  # type: ignore[arg-type]
                        pool=FakePool(), metrics=Metrics(), offsets_table="consumer_offsets",  # type: ignore[arg-type]
                        changes_table="offset_changes")
    sc.positions = FencedOnce()  # type: ignore[assignment]
    kafka = FakeKafka()
    sc.consumer = kafka  # type: ignore[assignment]
    sc.on_assigned({0})

    await sc._position(kafka)  # type: ignore[arg-type]
    assert sc.parts.unpositioned() == {0} and kafka.paused == {0} and kafka.seeks == []

    await sc._position(kafka)  # type: ignore[arg-type]
    assert sc.parts.unpositioned() == set() and kafka.paused == set()
    assert [(tp.partition, at) for tp, at in kafka.seeks] == [(0, 42)]


class Watermarks(FakeKafka):
    """A consumer whose last fetch of partition 0 reported ``high`` at poll time ``polled``."""

    def __init__(self, high: int, polled: int) -> None:
        super().__init__()
        self.high, self.polled = high, polled

    def highwater(self, tp: Any) -> int | None:
        return self.high

    def last_poll_timestamp(self, tp: Any) -> int | None:
        return self.polled


def positioned(kafka: FakeKafka, stored: int) -> StreamConsumer:
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=None,  # type: ignore[arg-type]
                        pool=FakePool(), metrics=Metrics(), offsets_table="consumer_offsets",  # type: ignore[arg-type]
                        changes_table="offset_changes")
    sc.consumer = kafka  # type: ignore[assignment]
    sc.on_assigned({0})
    sc.parts.position(0, stored, start=0, poll_mark=kafka.last_poll_timestamp(PARTITION_0))
    return sc


def test_a_high_watermark_from_before_the_positioning_is_not_evidence() -> None:
    # A stalled member comes back: its last fetch (at its old position) said 300; Postgres now holds 500.
    kafka = Watermarks(high=300, polled=1000)
    sc = positioned(kafka, 500)
    sc._refresh_lag(kafka)  # type: ignore[arg-type]
    assert set(sc.parts.positioned()) == {0}, "a stale high watermark must not re-position (or reset) it"


def test_a_high_watermark_below_the_position_from_a_fetch_there_re_positions_with_evidence() -> None:
    kafka = Watermarks(high=300, polled=1000)
    sc = positioned(kafka, 500)
    kafka.polled = 2000  # a fetch at 500 answered: the log ends at 4
    kafka.high = 4
    sc._refresh_lag(kafka)  # type: ignore[arg-type]
    s = sc.parts.get(0)
    assert s is not None and sc.parts.unpositioned() == {0} and s.end_seen == (500, 4)
