"""Positioning inside the consumer loop: a partition moved by another owner meanwhile is read again, not fatal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from consumers.settings import from_env
from ingest import offsets
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from tests.fakes import TOPIC, FakeKafka, FakePool


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
