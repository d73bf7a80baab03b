"""Publish a mix with duplicates and check exactly the unique events are stored, once each."""

from __future__ import annotations

import random

import asyncpg

from consumers.cli import sample
from ingest.config import Config
from tests.integration.helpers import (
    drain,
    dumps,
    offsets_total,
    publish,
    publish_raw,
    stored_keys,
    unique_keys,
)


async def test_unique_events_stored_exactly_once(config: Config, db: asyncpg.Connection) -> None:
    webhooks = list(sample.generate("webhook", 3000, n_tenants=50, dup_rate=0.15, seed=7))
    audits = list(sample.generate("audit", 2000, n_tenants=50, dup_rate=0.15, seed=8))
    # Re-deliveries far apart in the stream (the end repeats the start) ...
    webhooks += webhooks[:200]
    # ... and across partitions: the same events keyed by another tenant land on other partitions.
    rng = random.Random(3)
    cross = [(f"org-{rng.randrange(1000, 2000)}".encode(), dumps(e)) for e in rng.sample(webhooks, 150)]
    await publish(config, "webhook", webhooks)
    await publish_raw(config, "webhook", cross)
    await publish(config, "audit", audits)

    totals = await drain(config)

    stored_w, stored_a = await stored_keys(db, "webhook"), await stored_keys(db, "audit")
    assert set(stored_w) == unique_keys(webhooks)
    assert set(stored_a) == unique_keys(audits)
    assert max(stored_w.values()) == 1 and max(stored_a.values()) == 1
    assert totals["webhook"].stored == len(stored_w)
    assert totals["webhook"].duplicates == len(webhooks) + len(cross) - len(stored_w)
    assert totals["audit"].duplicates == len(audits) - len(stored_a)
    # Offsets cover every consumed record, duplicates included.
    assert await offsets_total(db, config, "webhook") == len(webhooks) + len(cross)
    assert await offsets_total(db, config, "audit") == len(audits)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_same_key_under_another_tenant_is_another_event(config: Config, db: asyncpg.Connection) -> None:
    base = next(sample.generate("webhook", 1, seed=1))
    events = [{**base, "tenant_id": t} for t in ("org-a", "org-b", "org-c")] + [{**base, "tenant_id": "org-a"}]
    await publish(config, "webhook", events)
    totals = await drain(config, "webhook")
    assert sorted(await stored_keys(db, "webhook")) == sorted(unique_keys(events))
    assert totals["webhook"].duplicates == 1


async def test_restart_resumes_where_it_stopped(config: Config, db: asyncpg.Connection) -> None:
    first = list(sample.generate("audit", 500, seed=11, dup_rate=0))
    await publish(config, "audit", first)
    await drain(config, "audit")
    stored_after_first = await offsets_total(db, config, "audit")
    assert stored_after_first == 500

    second = list(sample.generate("audit", 700, seed=12, dup_rate=0))
    second = [{**e, "idempotency_key": "second-" + e["idempotency_key"]} for e in second]
    await publish(config, "audit", second)
    totals = await drain(config, "audit")

    # The restarted consumer read only the new records: nothing was re-read from offset 0.
    assert totals["audit"].stored == 700
    assert totals["audit"].duplicates == 0
    assert await offsets_total(db, config, "audit") == 1200
    assert set(await stored_keys(db, "audit")) == unique_keys(first) | unique_keys(second)
