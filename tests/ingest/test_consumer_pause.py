"""A retried write that ends fenced (its first attempt committed but the answer was lost) must lift the pause
the retry set: ``ingest_paused`` and the /healthz ``paused`` field must not stay on after recovery."""

from __future__ import annotations

import asyncio
from typing import Any

from consumers.settings import from_env
from ingest import offsets
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from ingest.pipeline import Prepared, Staged
from ingest.rows import SimpleRecord
from tests.fakes import FakeKafka, FakePool

TOPIC = "events.webhook"


def consumer_with_a_batch(pipeline: Any, metrics: Metrics) -> tuple[StreamConsumer, FakeKafka, Staged]:
    """A webhook consumer owning partition 0 at offset 10, and a staged batch of offsets 10-14."""
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=pipeline,
                        pool=FakePool(), metrics=metrics, offsets_table="consumer_offsets",  # type: ignore[arg-type]
                        changes_table="offset_changes")
    sc.parts.assign({0})
    sc.parts.position(0, 10, start=0)
    sc.parts.accept(0, 1, range(10, 15))
    prepared = Prepared()
    prepared.advance = {0: 15}
    return sc, FakeKafka(), Staged([SimpleRecord(TOPIC, 0, o, None, b"{}", 0) for o in range(10, 15)], prepared, [], 0)


async def write(sc: StreamConsumer, kafka: FakeKafka, staged: Staged) -> None:
    task: asyncio.Task[None] = asyncio.create_task(sc._write(kafka, staged, {0: 1}))  # type: ignore[arg-type]
    await sc._finish_write(kafka, asyncio.Event(), task, staged, {0: 1})  # type: ignore[arg-type]


class AmbiguousThenFenced:
    """First commit: the connection dies (the server did commit); the retry finds the offsets moved."""

    def __init__(self) -> None:
        self.calls = 0

    async def commit(self, conn: Any, staged: Staged, expected: dict[int, int]) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionResetError("connection lost during COMMIT")
        raise offsets.Fenced([0])


async def test_fenced_retry_lifts_the_pause() -> None:
    metrics = Metrics()
    pipeline = AmbiguousThenFenced()
    sc, kafka, staged = consumer_with_a_batch(pipeline, metrics)
    await write(sc, kafka, staged)

    assert pipeline.calls == 2
    assert metrics.registry.get_sample_value("ingest_fenced_batches_total", {"stream": "webhook"}) == 1
    assert sc.state.paused_reason is None
    assert metrics.registry.get_sample_value("ingest_paused", {"stream": "webhook", "reason": "postgres"}) == 0
    assert sc.parts.unpositioned() == {0} and kafka.paused == {0}  # paused only until re-positioned from Postgres


class InternalThenRedis:
    """The first failure is an odd one (a client library bug on a dead connection), then Redis is down, then up."""

    def __init__(self) -> None:
        self.calls = 0

    async def commit(self, conn: Any, staged: Staged, expected: dict[int, int]) -> Any:
        from redis.exceptions import ClusterDownError

        self.calls += 1
        if self.calls == 1:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        if self.calls <= 3:
            raise ClusterDownError("The cluster is down")
        raise offsets.Fenced([0])


async def test_the_pause_reason_follows_the_latest_failure() -> None:
    metrics = Metrics()
    pipeline = InternalThenRedis()
    sc, kafka, staged = consumer_with_a_batch(pipeline, metrics)
    seen: list[str | None] = []
    set_paused = sc._set_paused

    def record(consumer: Any, reason: str | None) -> None:
        seen.append(reason)
        set_paused(consumer, reason)

    sc._set_paused = record  # type: ignore[method-assign]
    await write(sc, kafka, staged)

    assert pipeline.calls == 4
    assert seen == ["internal", "redis", None]  # redis replaced internal once Redis was what failed
    assert metrics.registry.get_sample_value("ingest_paused", {"stream": "webhook", "reason": "internal"}) == 0
    assert metrics.registry.get_sample_value("ingest_paused", {"stream": "webhook", "reason": "redis"}) == 0
