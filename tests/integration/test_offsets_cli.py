"""``ingest offsets show`` and ``ingest offsets reset`` against real Postgres, Redis and the broker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import pytest

from consumers import streams
from consumers.cli import sample, status
from ingest import offsets
from ingest.config import Config
from tests.conftest import stop_process
from tests.integration.helpers import drain, offsets_total, publish, spawn_consumer, stored_keys, unique_keys
from tests.integration.test_log_mismatch import cli, fresh, stored_positions

W = streams.WEBHOOK
# The embedded broker keeps listing a member after it left the group (Apache Kafka drops it), so commands run
# after a drain skip the live-member check; the refusal test runs without it against a live consumer.
FORCE = ("--force",)


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(cli, env, *args)
    return done.returncode, done.stdout, done.stderr


async def consumed(config: Config, db: asyncpg.Connection, n: int, seed: int, tag: str) -> list[dict[str, object]]:
    events = fresh(list(sample.generate("webhook", n, n_tenants=20, dup_rate=0, seed=seed)), tag)
    await publish(config, "webhook", events)
    await drain(config, "webhook")
    return events  # type: ignore[return-value]


async def test_show_lists_every_partition_as_json(config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 100, 31, "a")
    code, out, err = await run_cli(env, "offsets", "show", "--stream", "webhook", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert sorted(r["partition"] for r in rows) == [0, 1, 2, 3]
    for r in rows:
        assert {"stream", "topic", "partition", "next_offset", "log_start", "log_end", "lag"} <= set(r)
        assert r["stream"] == "webhook" and r["topic"] == W.topic_for(config)
        assert r["next_offset"] == r["log_end"] and r["lag"] == 0 and r["mismatch"] is None
    assert sum(r["log_end"] for r in rows) == 100


async def test_dry_run_changes_nothing_and_earliest_replays_as_duplicates(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    events = await consumed(config, db, 150, 32, "b")
    before = await stored_positions(db, config, "webhook")

    code, out, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-earliest")
    assert code == 0, err
    assert "dry run: nothing changed (150 records would be re-read" in out
    assert await stored_positions(db, config, "webhook") == before
    assert await db.fetchval("SELECT count(*) FROM offset_changes") == 0

    code, out, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-earliest", "--execute", *FORCE)
    assert code == 0, err
    assert set((await stored_positions(db, config, "webhook")).values()) == {0}
    rows = await db.fetch("SELECT kind, reread, skipped, detail FROM offset_changes")
    assert len(rows) == sum(1 for v in before.values() if v) and {r["kind"] for r in rows} == {"reset"}
    assert sum(r["reread"] for r in rows) == 150 and all(r["skipped"] == 0 for r in rows)
    assert all("--to-earliest" in r["detail"] for r in rows)

    totals = await drain(config, "webhook")
    assert totals["webhook"].stored == 0 and totals["webhook"].duplicates == 150
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(events) and max(stored.values()) == 1  # type: ignore[arg-type]


async def test_latest_skips_and_records_what_it_skipped(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 50, 33, "c")
    unread = fresh(list(sample.generate("webhook", 80, n_tenants=20, dup_rate=0, seed=34)), "d")
    await publish(config, "webhook", unread)
    code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-latest", "--execute", *FORCE)
    assert code == 0, err
    assert await db.fetchval("SELECT sum(skipped) FROM offset_changes WHERE kind = 'reset'") == 80
    totals = await drain(config, "webhook")
    assert totals["webhook"].stored == 0
    assert len(await stored_keys(db, "webhook")) == 50
    assert await offsets_total(db, config, "webhook") == 130


async def test_to_offset_moves_one_partition_and_refuses_offsets_outside_the_log(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 120, 35, "e")
    before = await stored_positions(db, config, "webhook")
    p = max(before, key=lambda k: before[k])
    code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-offset", str(before[p] + 1),
                                 "--partition", str(p), "--execute", *FORCE)
    assert code == 2 and "outside the log" in err and len(err.strip().splitlines()) == 1
    code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-offset", "1",
                                 "--partition", str(p), "--execute", *FORCE)
    assert code == 0, err
    assert await stored_positions(db, config, "webhook") == {**before, p: 1}
    totals = await drain(config, "webhook")
    assert totals["webhook"].duplicates == before[p] - 1 and totals["webhook"].stored == 0


async def test_to_datetime_seeks_to_the_first_record_at_or_after_the_time(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 60, 36, "f")
    ends_before = (await status.end_offsets(config, [W.topic_for(config)]))[W.topic_for(config)]
    await asyncio.sleep(1.2)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.2)
    await consumed(config, db, 60, 37, "g")
    code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-datetime",
                                 cut.isoformat(), "--execute", *FORCE)
    assert code == 0, err
    after = await stored_positions(db, config, "webhook")
    assert after == {p: e.end for p, e in ends_before.items()}, "the first offset of each partition after the cut"
    totals = await drain(config, "webhook")
    assert totals["webhook"].duplicates == 60 and totals["webhook"].stored == 0


async def test_execute_is_refused_while_the_group_has_live_members(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 40, 38, "h")
    before = await stored_positions(db, config, "webhook")
    proc = spawn_consumer(env, "webhook")
    try:
        group = W.group_for(config)
        for _ in range(150):
            members = (await status.group_members(config, [group])).get(group, {})
            if members.get("members"):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the consumer never joined")
        code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-earliest", "--execute")
        assert code == 1 and "live member" in err and len(err.strip().splitlines()) == 1, err
        assert await stored_positions(db, config, "webhook") == before
    finally:
        stop_process(proc)


async def test_a_consumer_holding_the_old_position_is_fenced_by_a_reset(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    await consumed(config, db, 40, 39, "i")
    before = await stored_positions(db, config, "webhook")
    p = max(before, key=lambda k: before[k])
    code, _, err = await run_cli(env, "offsets", "reset", "--stream", "webhook", "--to-earliest", "--execute", *FORCE)
    assert code == 0, err
    # A consumer that loaded ``before[p]`` now tries to commit a batch past it: the fence refuses it.
    async with db.transaction():
        with pytest.raises(offsets.Fenced):
            await offsets.fence_and_advance(db, W.tables().offsets, W.group_for(config), W.topic_for(config),
                                            {p: before[p]}, {p: before[p] + 5})
    assert (await stored_positions(db, config, "webhook"))[p] == 0
