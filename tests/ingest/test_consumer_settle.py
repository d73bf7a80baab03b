"""A write abandoned (stop during retries) or fenced must never let a later staged batch skip its records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumers.settings import from_env
from ingest import offsets
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from ingest.pipeline import Prepared, Staged
from ingest.rows import SimpleRecord
from tests.fakes import FakeKafka, FakePool

TOPIC = "events.webhook"


class FakePipeline:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.commits: list[dict[int, int]] = []

    async def commit(self, conn: Any, staged: Staged, expected: dict[int, int]) -> Any:
        if self.error is not None:
            raise self.error
        self.commits.append(expected)
        raise AssertionError("a later batch was written past unwritten records")

    def stage_subset(self, records: Any) -> Staged:
        return staged(list(records))


def staged(records: list[SimpleRecord]) -> Staged:
    prepared = Prepared()
    prepared.advance = {0: records[-1].offset + 1}
    return Staged(records, prepared, [], 0)


def batch(first: int) -> Staged:
    return staged([SimpleRecord(TOPIC, 0, o, None, b"{}", 0) for o in range(first, first + 5)])


@pytest.mark.parametrize("error", [ConnectionError("postgres went away"), offsets.Fenced([0])])
async def test_failed_write_invalidates_batches_staged_after_it(error: BaseException) -> None:
    pipeline = FakePipeline(error)
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=pipeline,  # type: ignore[arg-type]
                        pool=FakePool(), metrics=Metrics(), offsets_table="consumer_offsets",
                        changes_table="offset_changes")  # type: ignore[arg-type]
    kafka = FakeKafka()
    sc.parts.assign({0})
    sc.parts.position(0, 10, start=0)
    assert sc.parts.accept(0, 1, range(10, 20)) == list(range(10))  # positioned at 10, read to 20, epoch 1
    epochs = {0: 1}
    first, second = batch(10), batch(15)

    stop = asyncio.Event()
    stop.set()  # the operator stops while batch N is failing: it is abandoned after one retry round
    failed: asyncio.Task[None] = asyncio.create_task(sc._write(kafka, first, epochs))  # type: ignore[arg-type]
    await sc._finish_write(kafka, stop, failed, first, epochs)  # type: ignore[arg-type]

    # Batch N+1 was staged while N was in flight: it must not be written from position 10.
    pipeline.error = None
    await sc._write(kafka, second, epochs)  # type: ignore[arg-type]
    assert pipeline.commits == []
    assert sc.parts.unpositioned() == {0} and not sc.parts.positioned()  # re-read from Postgres's position instead

    # Even once the partition is positioned again at 10 (the loop seeks before N+1's write runs), N+1's
    # records belong to the old position epoch and stay unwritable: writing them would skip 10..14.
    await sc._seek(kafka, [0], {0: 10}, {0: offsets.LogBounds(0, 20)})  # type: ignore[arg-type]
    assert {p: s.stored for p, s in sc.parts.positioned().items()} == {0: 10}
    await sc._write(kafka, second, epochs)  # type: ignore[arg-type]
    assert pipeline.commits == []
