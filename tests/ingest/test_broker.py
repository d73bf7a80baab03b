"""ingest.broker.ensure_topics: what it asks the brokers for (replication factor, min.insync.replicas)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest

from consumers.settings import from_env
from ingest import broker


class FakeAdmin:
    created: ClassVar[list[Any]] = []

    def __init__(self, **options: Any) -> None:
        self.options = options

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return ["present"]

    async def create_topics(self, topics: list[Any]) -> None:
        FakeAdmin.created.extend(topics)


async def test_missing_topics_get_the_replication_factor_and_min_insync_replicas(
        monkeypatch: pytest.MonkeyPatch) -> None:
    FakeAdmin.created = []
    monkeypatch.setattr(broker, "AIOKafkaAdminClient", FakeAdmin)
    config = from_env({})
    created = await broker.ensure_topics(config, ["present", "new"], 12, replication_factor=3, min_insync_replicas=2)
    assert created == ["new"]
    [topic] = FakeAdmin.created
    assert (topic.name, topic.num_partitions, topic.replication_factor) == ("new", 12, 3)
    assert topic.topic_configs == {"min.insync.replicas": "2"}


async def test_the_streams_topics_use_the_configured_durability(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers import run

    FakeAdmin.created = []
    monkeypatch.setattr(broker, "AIOKafkaAdminClient", FakeAdmin)
    config = dataclasses.replace(from_env({}), topic_replication_factor=5, topic_min_insync_replicas=3)
    await run.ensure_all_topics(config)
    assert {(t.replication_factor, t.topic_configs["min.insync.replicas"]) for t in FakeAdmin.created} == {(5, "3")}
    assert len(FakeAdmin.created) == 2
