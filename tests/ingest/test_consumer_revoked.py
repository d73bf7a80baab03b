"""A write that lands after its partitions were revoked (the bounded wait in ``on_revoked`` ran out, e.g. a COPY
slower than the rebalance) must complete quietly: no KeyError reported as a transient failure and retried."""

from __future__ import annotations

import asyncio
from typing import Any

from consumers.settings import from_env
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from ingest.pipeline import Outcome, Prepared, Staged
from ingest.rows import SimpleRecord
from tests.fakes import FakeKafka, FakePool

TOPIC = "events.webhook"


class RevokedDuringCommit:
    """Commits, but the partitions are forgotten meanwhile (what ``on_revoked`` does after its wait timed out)."""

    def __init__(self, sc: StreamConsumer) -> None:
        self.sc = sc

    async def commit(self, conn: Any, staged: Staged, expected: dict[int, int]) -> Outcome:
        for p in expected:
            self.sc._forget(p)
        return Outcome(stored=5, duplicates=0, rejected=0, quota_exceeded=0, write_seconds=0.0)


async def test_write_landing_after_revocation_does_not_fail() -> None:
    sc = StreamConsumer(config=from_env({}), stream="webhook", topic=TOPIC, group="g", pipeline=None,  # type: ignore[arg-type]
                        pool=FakePool(), metrics=Metrics(), offsets_table="consumer_offsets",
                        changes_table="offset_changes")  # type: ignore[arg-type]
    sc.pipeline = RevokedDuringCommit(sc)  # type: ignore[assignment]
    sc.parts.assign({0})
    sc.parts.position(0, 10, start=0)
    sc.parts.accept(0, 1, range(10, 15))
    records = [SimpleRecord(TOPIC, 0, o, None, b"{}", 0) for o in range(10, 15)]
    prepared = Prepared()
    prepared.advance = {0: 15}

    await sc._write(FakeKafka(assigned=()), Staged(records, prepared, [], 0), {0: 1})  # type: ignore[arg-type]

    assert sc.parts.get(0) is None, "a revoked partition must stay forgotten (its next owner positions it)"
    assert sc.totals.stored == 5 and sc.totals.batches == 1
    await asyncio.sleep(0)
