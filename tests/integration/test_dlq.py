"""`ingest dlq list | show | replay` against real dead letters written by the consumer.

Most calls go through the parsed command line and its handler in-process (fast); a few run the real
``python -m consumers.cli`` to prove the entry point. "Nothing was sent" is checked the robust way: a drain
afterwards consumes nothing new, i.e. the offsets stored in Postgres do not move.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from consumers.cli import build_parser, sample
from consumers.cli.commands import dlq as dlq_cmd
from ingest import dlq
from ingest.config import Config
from ingest.contract import TimeWindow
from tests.integration.helpers import drain, offsets_total, publish, publish_raw, stored_keys, unique_keys


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """A short session timeout: these tests drain several times, and the embedded broker only lets a new member
    in once the previous one's session expired (it does not act on LeaveGroup promptly)."""
    return {**env, "INGEST_SESSION_TIMEOUT_MS": "2000"}


def _event(name: str, now: datetime, **changes: Any) -> dict[str, Any]:
    return {"tenant_id": "org-dlq", "idempotency_key": f"dlq-{name}", "event_type": "invoice.paid",
            "source": "stripe", "occurred_at": now.isoformat(), "payload": {"id": name}, **changes}


async def cli(config: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run ``ingest dlq ARGV`` through the real parser and handler, in this event loop."""
    args = build_parser().parse_args(["dlq", *argv])
    capsys.readouterr()
    code = await args.handler(args, config)
    return code, capsys.readouterr().out


async def cli_json(config: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out = await cli(config, capsys, *argv, "--json")
    assert code == 0, out
    return json.loads(out)


async def real_cli(env: dict[str, str], *argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.cli", "dlq", *argv, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def offsets(db: asyncpg.Connection, config: Config) -> tuple[int, int]:
    return await offsets_total(db, config, "webhook"), await offsets_total(db, config, "audit")


class Seeded:
    """What ``seed`` published: the events that will be dead-lettered, by kind."""

    def __init__(self, now: datetime) -> None:
        self.valid = list(sample.generate("webhook", 300, n_tenants=10, dup_rate=0, seed=71))
        self.evil = [_event(f"evil-{i}", now, tenant_id="org-evil", source="evil") for i in range(5)]
        self.old = [_event(f"old-{i}", now - timedelta(days=5), tenant_id="org-old") for i in range(4)]
        self.not_json = [b"not json", b'{"tenant_id": "org-dlq",', b"<xml/>"]
        self.bad_utf8 = b'{"tenant_id":"org-dlq","note":"\xff\xfe\x00"}'
        self.audit = list(sample.generate("audit", 50, n_tenants=10, dup_rate=0, seed=72))
        self.audit_bad = [{k: v for k, v in a.items() if k != "actor_id"} | {"idempotency_key": f"bad-{i}"}
                          for i, a in enumerate(self.audit[:2])]


async def seed(config: Config, db: asyncpg.Connection) -> Seeded:
    """Valid traffic plus 16 records that become dead letters (5 refused by a CHECK constraint)."""
    s = Seeded(datetime.now(UTC))
    await db.execute("ALTER TABLE webhook_events ADD CONSTRAINT no_evil CHECK (source <> 'evil')")
    await publish(config, "webhook", s.valid)
    raw: list[tuple[bytes | None, bytes | None]] = [(e["tenant_id"].encode(), orjson.dumps(e))
                                                    for e in s.evil + s.old]
    raw += [(b"org-dlq", v) for v in [*s.not_json, s.bad_utf8]] + [(b"org-dlq", None)]
    await publish_raw(config, "webhook", raw)
    await publish(config, "audit", s.audit)
    await publish_raw(config, "audit", [(a["tenant_id"].encode(), orjson.dumps(a)) for a in s.audit_bad])
    await drain(config)
    return s


EXPECTED = {("webhook", "db_rejected"): 5, ("webhook", "timestamp_too_old"): 4, ("webhook", "not_json"): 3,
            ("webhook", "invalid_utf8"): 1, ("webhook", "tombstone"): 1, ("audit", "missing_field"): 2}


async def test_list_and_show(config: Config, env: dict[str, str], db: asyncpg.Connection,
                             capsys: pytest.CaptureFixture[str]) -> None:
    s = await seed(config, db)

    listed = await cli_json(config, capsys, "list")
    assert {(c["stream"], c["reason"]): c["pending"] for c in listed["counts"]} == EXPECTED
    assert all(c["replayed"] == 0 for c in listed["counts"])
    assert (listed["total"], listed["pending"], listed["replayed"]) == (16, 16, 0)
    ids = [e["id"] for e in listed["entries"]]
    assert len(ids) == 16 and ids == sorted(ids, reverse=True), "newest first"

    code, text = await cli(config, capsys, "list")
    assert code == 0
    assert "dead letters: 16 (16 pending, 0 replayed)" in text
    for stream, reason in EXPECTED:
        assert any(stream in line and reason in line for line in text.splitlines()), (stream, reason)

    only = await cli_json(config, capsys, "list", "--reason", "not_json", "--reason", "invalid_utf8")
    assert {e["reason"] for e in only["entries"]} == {"not_json", "invalid_utf8"} and only["total"] == 4
    audit = await cli_json(config, capsys, "list", "--stream", "audit")
    assert [(c["stream"], c["reason"], c["pending"]) for c in audit["counts"]] == [("audit", "missing_field", 2)]
    tenant = await cli_json(config, capsys, "list", "--tenant", "org-evil")
    assert tenant["total"] == 5 and {e["reason"] for e in tenant["entries"]} == {"db_rejected"}
    assert (await cli_json(config, capsys, "list", "--since", "1h"))["total"] == 16
    assert (await cli_json(config, capsys, "list", "--since", "2999-01-01T00:00:00Z"))["total"] == 0
    assert len((await cli_json(config, capsys, "list", "--limit", "2"))["entries"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "list", "--since", "last tuesday"])

    # show: printable UTF-8 as text, anything else as a hex dump, a tombstone as such; --json has base64.
    by_reason = {r["reason"]: r["id"] for r in await db.fetch("SELECT reason, max(id) AS id FROM dead_letters "
                                                              "GROUP BY reason")}
    not_json_id = await db.fetchval("SELECT id FROM dead_letters WHERE raw = $1", s.not_json[0])
    code, text = await cli(config, capsys, "show", str(not_json_id))
    assert code == 0 and "reason           not_json" in text
    assert "8 bytes, UTF-8:\nnot json\n" in text
    code, text = await cli(config, capsys, "show", str(by_reason["invalid_utf8"]))
    assert code == 0 and "hex dump" in text and text.rstrip().endswith('fe 00 22 7d' + " " * 38 + '|.."}|')
    code, text = await cli(config, capsys, "show", str(by_reason["tombstone"]))
    assert code == 0 and "tombstone" in text
    shown = await cli_json(config, capsys, "show", str(by_reason["invalid_utf8"]))
    assert base64.b64decode(shown["raw_base64"]) == s.bad_utf8 and shown["raw_text"] is None
    assert shown["source_topic"].endswith("events.webhook") and shown["source_offset"] >= 0
    evil = await cli_json(config, capsys, "show", str(by_reason["db_rejected"]))
    assert json.loads(evil["raw_text"])["source"] == "evil" and "23514" in evil["detail"]
    assert (await cli(config, capsys, "show", "999999"))[0] == 1

    # The real entry point, once each.
    code, text = await real_cli(env, "list", "--reason", "tombstone")
    assert code == 0 and "dead letters: 1 (1 pending, 0 replayed)" in text, text
    code, text = await real_cli(env, "show", str(not_json_id))
    assert code == 0 and "not json" in text, text


async def test_replay_after_fix_stores_once_and_never_twice(config: Config, env: dict[str, str],
                                                            db: asyncpg.Connection,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    s = await seed(config, db)
    before = await offsets(db, config)

    # --dry-run: a plan, nothing sent, nothing marked.
    plan = await cli_json(config, capsys, "replay", "--dry-run")
    assert (plan["would_send"], plan["skipped_tombstones"]) == (15, 1)
    assert {(p["stream"], p["reason"]): p["to_send"] + p["tombstones_skipped"] for p in plan["plan"]} == EXPECTED
    code, text = await cli(config, capsys, "replay", "--dry-run")
    assert code == 0 and "would re-publish 15" in text
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL") == 0
    # (That it sent nothing shows below: after the first real replay the offsets move by exactly its 9 records.)

    # The fix: drop the constraint, and accept older events (the consumer creates partitions for them).
    await db.execute("ALTER TABLE webhook_events DROP CONSTRAINT no_evil")
    wider = dataclasses.replace(config, window=TimeWindow(max_age=timedelta(days=10),
                                                          max_ahead=config.window.max_ahead))
    fixed = ("--reason", "db_rejected", "--reason", "timestamp_too_old")
    result = await cli_json(config, capsys, "replay", *fixed)
    assert (result["sent"], result["failed"]) == (9, 0)
    assert result["by_reason"] == {"db_rejected": 5, "timestamp_too_old": 4}
    marked = await db.fetch("SELECT reason FROM dead_letters WHERE replayed_at IS NOT NULL")
    assert Counter(r["reason"] for r in marked) == {"db_rejected": 5, "timestamp_too_old": 4}

    totals = await drain(wider)
    assert totals["webhook"].stored == 9 and totals["webhook"].rejected == 0
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(s.valid + s.evil + s.old) and max(stored.values()) == 1
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 16, "nothing dead-lettered again"
    # Replayed in source order: one tenant's records keep their original order (bisection inserted the
    # db_rejected dead letters out of offset order, so id order would not).
    replayed_order = await db.fetch("SELECT idempotency_key FROM webhook_events WHERE tenant_id = 'org-evil' "
                                    "ORDER BY source_offset")
    assert [r[0] for r in replayed_order] == [e["idempotency_key"] for e in s.evil]
    after_fix = await offsets(db, config)
    assert after_fix == (before[0] + 9, before[1])

    # A second replay finds nothing pending for those reasons and sends nothing (the exact offset count after
    # the next drain shows the topics did not move for it).
    again = await cli_json(config, capsys, "replay", *fixed)
    assert (again["sent"], again["failed"]) == (0, 0)

    # Replaying records that are still invalid dead-letters them again (new entries); tombstones are skipped
    # unless asked for, and then come back as tombstones.
    rest = await cli_json(config, capsys, "replay")
    assert (rest["sent"], rest["skipped_tombstones"]) == (6, 1)
    tomb = await cli_json(config, capsys, "replay", "--reason", "tombstone", "--include-tombstones")
    assert (tomb["sent"], tomb["skipped_tombstones"]) == (1, 0)
    await drain(wider)
    assert await offsets(db, config) == (after_fix[0] + 4 + 1, after_fix[1] + 2)
    rows = await db.fetch("SELECT id, reason, raw, replayed_at FROM dead_letters ORDER BY id")
    assert len(rows) == 16 + 7
    new = rows[16:]
    assert Counter(r["reason"] for r in new) == {"not_json": 3, "invalid_utf8": 1, "missing_field": 2,
                                                 "tombstone": 1}
    originals = [r["raw"] for r in rows[:16] if r["reason"] not in ("db_rejected", "timestamp_too_old")]
    assert sorted(map(repr, (r["raw"] for r in new))) == sorted(map(repr, originals)), \
        "the original bytes were re-published"
    listed = await cli_json(config, capsys, "list")
    assert (listed["pending"], listed["replayed"]) == (7, 16)
    assert await stored_keys(db, "webhook") == stored, "nothing else was stored"


async def test_interrupted_replay_resends_at_most_a_chunk_and_stores_once(
        config: Config, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    evil = [_event(f"evil-{i}", now, tenant_id=f"org-{i % 3}", source="evil") for i in range(7)]
    await db.execute("ALTER TABLE webhook_events ADD CONSTRAINT no_evil CHECK (source <> 'evil')")
    await publish(config, "webhook", evil)
    await drain(config, "webhook")
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE reason = 'db_rejected'") == 7
    await db.execute("ALTER TABLE webhook_events DROP CONSTRAINT no_evil")

    # Another replay holds the lock: this one refuses to start.
    assert await dlq.try_replay_lock(db, "dead_letters")
    assert (await cli(config, capsys, "replay"))[0] == 1
    await dlq.replay_unlock(db, "dead_letters")

    # Chunks of 3; the process "dies" after the second chunk was acknowledged but before it was marked.
    monkeypatch.setattr(dlq_cmd, "REPLAY_CHUNK", 3)
    real_mark = dlq.mark_replayed
    calls = 0

    async def dying_mark(conn: Any, table: str, ids: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("killed between send and mark")
        return await real_mark(conn, table, ids)

    monkeypatch.setattr(dlq, "mark_replayed", dying_mark)
    with pytest.raises(RuntimeError):
        await cli(config, capsys, "replay")
    monkeypatch.setattr(dlq, "mark_replayed", real_mark)
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL") == 3

    result = await cli_json(config, capsys, "replay")
    assert result["sent"] == 4, "the unmarked chunk is sent again, with the one never sent"
    totals = await drain(config, "webhook")
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(evil) and max(stored.values()) == 1
    assert (totals["webhook"].stored, totals["webhook"].duplicates) == (7, 3)
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 0
