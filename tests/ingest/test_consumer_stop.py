"""Stopping must always leave the group and close the Kafka client, whatever became of the best-effort Kafka
offset commit: found by the fault suite, where aiokafka cancelled a pending commit after the broker was
unreachable and the cancellation escaped ``run`` (exit code 1, "Unclosed AIOKafkaConsumer")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from consumers.settings import from_env
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from tests.fakes import FakeKafka

TOPIC = "events.webhook"


class FakePipeline:
    async def aclose(self) -> None: ...


async def _cancelled_by_itself() -> None:
    """A commit whose own await is cancelled from inside (not by the consumer)."""
    inner: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    inner.cancel()
    await inner


async def _raises() -> None:
    raise ConnectionResetError("coordinator gone")


async def _hangs() -> None:
    await asyncio.sleep(3600)


def consumer_with(commit: Callable[[], Coroutine[Any, Any, None]]) -> tuple[StreamConsumer, FakeKafka]:
    kafka = FakeKafka(assigned=())
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=FakePipeline(),  # type: ignore[arg-type]
                        pool=None, metrics=Metrics(), offsets_table="consumer_offsets",
                        changes_table="offset_changes")  # type: ignore[arg-type]
    sc.build_consumer = lambda: kafka  # type: ignore[assignment, return-value, method-assign]
    sc._kafka_commit = asyncio.get_running_loop().create_task(commit())
    return sc, kafka


@pytest.mark.parametrize("commit", [_cancelled_by_itself, _raises], ids=["cancelled-inside", "failed"])
async def test_stop_closes_kafka_whatever_the_pending_commit_did(
        commit: Callable[[], Coroutine[Any, Any, None]]) -> None:
    sc, kafka = consumer_with(commit)
    await asyncio.sleep(0)  # the commit task ends before the stop
    stop = asyncio.Event()
    stop.set()
    totals = await sc.run(stop)
    assert totals is sc.totals
    assert kafka.stopped, "the Kafka client must be stopped (group left, connections closed)"


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pending commit's 5 s grace, shortened to 50 ms."""
    import ingest.consumer as mod

    real = mod._finish_quietly

    async def short(task: asyncio.Task[None], grace_s: float) -> None:
        await real(task, 0.05)

    monkeypatch.setattr(mod, "_finish_quietly", short)


@pytest.mark.usefixtures("short_grace")
async def test_a_hanging_commit_is_cancelled_after_its_grace() -> None:
    sc, kafka = consumer_with(_hangs)
    stop = asyncio.Event()
    stop.set()
    await sc.run(stop)
    assert kafka.stopped
    assert sc._kafka_commit is not None and sc._kafka_commit.cancelled()


@pytest.mark.usefixtures("short_grace")
async def test_cancelling_the_consumer_still_propagates_after_closing_kafka() -> None:
    sc, kafka = consumer_with(_hangs)
    task = asyncio.create_task(sc.run(asyncio.Event()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert kafka.stopped
