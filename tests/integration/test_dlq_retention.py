"""Dead-letter retention: `ingest dlq purge` and the maintenance task never delete an unreplayed entry younger
than INGEST_DLQ_RETENTION_DAYS; older entries and replayed ones before the cut-off go."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from consumers import run, streams
from consumers.cli import build_parser
from ingest.config import Config
from ingest.maintenance import Maintenance

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
# name -> (age, replayed, reason)
ENTRIES = {
    "old_pending": (40 * DAY, False, "invalid_schema"),
    "old_replayed": (40 * DAY, True, "invalid_schema"),
    "recent_pending": (5 * DAY, False, "invalid_schema"),
    "recent_replayed": (5 * DAY, True, "invalid_schema"),
    "recent_replayed_quota": (5 * DAY, True, "quota_exceeded"),
    "fresh_replayed": (DAY / 24, True, "invalid_schema"),
}


async def seed(db: asyncpg.Connection) -> None:
    table = streams.shared_tables().dead_letters
    for name, (age, replayed, reason) in ENTRIES.items():
        created = NOW - age
        await db.execute(
            f'INSERT INTO "{table}" (stream, reason, detail, raw, source_topic, source_partition, source_offset, '
            "idempotency_key, created_at, replayed_at) VALUES ('webhook', $1, 'seeded', '\\x7b7d', 't', 0, 0, $2, "
            "$3, $4)", reason, name, created, created + timedelta(minutes=1) if replayed else None)


async def remaining(db: asyncpg.Connection) -> set[str]:
    table = streams.shared_tables().dead_letters
    return {r[0] for r in await db.fetch(f'SELECT idempotency_key FROM "{table}"')}


async def purge(config: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["dlq", "purge", *argv, "--json"])
    capsys.readouterr()
    assert await args.handler(args, config) == 0
    return dict(json.loads(capsys.readouterr().out))


async def test_purge_plans_then_deletes_but_keeps_unreplayed_entries_within_the_retention(
        config: Config, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    await seed(db)
    config = dataclasses.replace(config, dlq_retention=timedelta(days=30))
    before = (NOW - 2 * DAY).date().isoformat()

    plan = await purge(config, capsys, "--before", before)
    assert (plan["deletable"], plan["kept_pending"], plan["deleted"]) == (4, 1, 0)
    assert await remaining(db) == set(ENTRIES), "without --execute nothing changes"

    only_quota = await purge(config, capsys, "--before", before, "--reason", "quota_exceeded", "--execute")
    assert (only_quota["deletable"], only_quota["deleted"]) == (1, 1)
    assert "recent_replayed_quota" not in await remaining(db)

    done = await purge(config, capsys, "--before", before, "--execute")
    assert done["deleted"] == 3
    # recent_pending: unreplayed and younger than 30 days; fresh_replayed: after the cut-off.
    assert await remaining(db) == {"recent_pending", "fresh_replayed"}

    # Even a cut-off in the future never takes the unreplayed entry inside the retention.
    done = await purge(config, capsys, "--before", (NOW + DAY).isoformat(), "--execute")
    assert (done["deleted"], done["kept_pending"]) == (1, 1)
    assert await remaining(db) == {"recent_pending"}


async def test_purge_with_retention_off_deletes_only_replayed_entries(
        config: Config, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    await seed(db)
    config = dataclasses.replace(config, dlq_retention=timedelta(0))
    done = await purge(config, capsys, "--before", (NOW + DAY).isoformat(), "--execute")
    assert (done["deleted"], done["kept_pending"]) == (4, 2)
    assert await remaining(db) == {"old_pending", "recent_pending"}


async def test_maintenance_deletes_dead_letters_past_the_retention(config: Config, db: asyncpg.Connection) -> None:
    await seed(db)
    config = dataclasses.replace(config, dlq_retention=timedelta(days=30))
    policy = run.dead_letter_policy(config)
    assert policy is not None and run.dead_letter_policy(dataclasses.replace(config, dlq_retention=timedelta(0))) is None
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=1)
    try:
        m = Maintenance(pool, [], dead_letters=policy._replace(chunk=1))
        assert (await m.run_once(create=False, dry_run=True)).dead_letters_pruned == 2
        report = await m.run_once(create=False)
    finally:
        await pool.close()
    assert report.dead_letters_pruned == 2
    assert await remaining(db) == set(ENTRIES) - {"old_pending", "old_replayed"}
