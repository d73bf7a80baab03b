"""Batch closing: at the limits, or as soon as it has records while no write is in flight (group commit)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from aiokafka import TopicPartition

from consumers.settings import from_env
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from ingest.rows import SimpleRecord

TOPIC = "events.webhook"


class TrickleKafka:
    """Every ``getmany`` returns the next 10 records of partition 0 after 5 ms."""

    def __init__(self) -> None:
        self.next = 0
        self.calls = 0

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        await asyncio.sleep(0.005)
        self.calls += 1
        n = min(10, max_records or 10)
        msgs = [SimpleRecord(TOPIC, 0, o, None, b"{}", 0) for o in range(self.next, self.next + n)]
        self.next += n
        return {TopicPartition(TOPIC, 0): msgs}


def consumer(max_rows: int = 5000, max_age_ms: int = 200) -> StreamConsumer:
    config = from_env({})
    config = dataclasses.replace(config, batch=dataclasses.replace(
        config.batch, max_rows=max_rows, max_age=timedelta(milliseconds=max_age_ms)))
    sc = StreamConsumer(config=config, stream="webhook", topic=TOPIC, group="g", pipeline=None,  # type: ignore[arg-type]
                        pool=None, metrics=Metrics(), offsets_table="consumer_offsets",
                        changes_table="offset_changes")  # type: ignore[arg-type]
    sc.parts.assign({0})
    sc.parts.position(0, 0, start=0)
    return sc


async def test_no_write_in_flight_closes_the_batch_at_once() -> None:
    kafka, done = TrickleKafka(), asyncio.get_running_loop().create_future()
    done.set_result(None)
    for in_flight in (None, done):
        records, epochs = await consumer()._collect(kafka, asyncio.Event(), in_flight)  # type: ignore[arg-type]
        assert len(records) == 10 and epochs == {0: 1}


async def test_records_accumulate_while_a_write_is_in_flight_until_it_ends() -> None:
    kafka, sc = TrickleKafka(), consumer()
    write = asyncio.create_task(asyncio.sleep(0.06))
    records, _ = await sc._collect(kafka, asyncio.Event(), write)  # type: ignore[arg-type]
    assert write.done()
    assert 30 <= len(records) < 200  # closed when the write ended, long before the 200 ms age
    assert [r.offset for r in records] == list(range(len(records)))


async def test_limits_still_close_a_batch_while_a_write_is_in_flight() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    records, _ = await consumer(max_rows=35)._collect(TrickleKafka(), asyncio.Event(), never)  # type: ignore[arg-type]
    assert len(records) == 35
    records, _ = await consumer(max_age_ms=40)._collect(TrickleKafka(), asyncio.Event(), never)  # type: ignore[arg-type]
    assert 10 <= len(records) <= 100
