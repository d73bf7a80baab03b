"""The demo (README's first command) and the "what landed where" summary."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import consumers.cli.sample as sample
from consumers import run, streams
from ingest.config import Config
from ingest.publisher import Publisher
from ingest.services import create_pool
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

# Deliberately bad messages, so the demo shows dead letters with reasons.
HOSTILE: list[bytes | None] = [
    b"not json at all",
    b"[1, 2, 3]",
    b'{"tenant_id": "org-0001", "idempotency_key": "x"}',
    b'{"tenant_id": "bad tenant!", "idempotency_key": "k1", "event_type": "a", "source": "s", '
    b'"occurred_at": "2026-01-01T00:00:00Z", "payload": {}}',
    b'{"tenant_id": "org-0001", "idempotency_key": "k2", "event_type": "a", "source": "s", '
    b'"occurred_at": "yesterday", "payload": {}}',
    None,
]


async def summary_doc(conn: Conn) -> dict[str, Any]:
    """What ``summary`` shows, as one JSON-ready document."""
    tables = {}
    for s in streams.STREAMS.values():
        row = await conn.fetchrow(f"SELECT count(*), count(DISTINCT tenant_id) FROM {ident(s.table)}")
        assert row is not None
        tables[s.table] = {"rows": row[0], "tenants": row[1]}
    shared = streams.shared_tables()
    ledger = await conn.fetchval(f"SELECT count(*) FROM {ident(shared.ledger)}")
    dead = await conn.fetch(f"SELECT stream, reason, count(*) FROM {ident(shared.dead_letters)} "
                            "GROUP BY 1, 2 ORDER BY 1, 3 DESC")
    offs = await conn.fetch(f"SELECT group_id, topic, sum(greatest(next_offset, 0)) FROM {ident(shared.offsets)} "
                            "GROUP BY 1, 2 ORDER BY 1, 2")
    return {"tables": tables, "dedupe_ledger": {"keys": ledger},
            "dead_letters": [{"stream": r[0], "reason": r[1], "count": r[2]} for r in dead],
            "progress": [{"group": r[0], "topic": r[1], "consumed": int(r[2])} for r in offs]}


async def summary(conn: Conn, config: Config) -> str:
    """Rows per table, dedupe ledger size, dead letters by reason, stored offsets."""
    doc = await summary_doc(conn)
    lines = ["landed:"]
    lines += [f"  {table:<16} {t['rows']:>9} rows from {t['tenants']} tenants" for table, t in doc["tables"].items()]
    lines.append("  dedupe ledger    " + ", ".join(f"{k}={v}" for k, v in doc["dedupe_ledger"].items()))
    lines.append(f"dead letters: {sum(d['count'] for d in doc['dead_letters'])}")
    lines += [f"  {d['stream']:<8} {d['reason']:<24} {d['count']:>6}" for d in doc["dead_letters"]]
    lines.append("progress (records consumed, stored in postgres):")
    lines += [f"  {p['group']:<16} {p['topic']:<20} {p['consumed']:>9}" for p in doc["progress"]]
    return "\n".join(lines)


async def demo(config: Config, *, events: int, n_tenants: int) -> int:
    """Migrate, ensure topics, publish a sample with retries and bad input, drain, and print the result.

    The demo runs with short group timeouts so that it starts in seconds on the embedded broker, which waits out
    the full timeouts when a group forms, and like `ingest dev up` with single-replica topics and without producer
    idempotence, which the embedded broker lacks."""
    config = dataclasses.replace(config, session_timeout_ms=6000, rebalance_timeout_ms=1000,
                                 heartbeat_interval_ms=500, metrics_port=0, producer_idempotence=False,
                                 topic_replication_factor=1, topic_min_insync_replicas=1)
    await run.run_migrations(config)
    await run.ensure_all_topics(config)
    from tqdm import tqdm  # only the demo draws a progress bar

    now = datetime.now(UTC)
    published = 0
    for s in streams.STREAMS.values():
        async with Publisher(config, topic=s.topic_for(config), contract=s.contract(config)) as pub:
            for event in tqdm(sample.generate(s.name, events, n_tenants=n_tenants, dup_rate=0.12,
                                              seed=random.randrange(1 << 30), now=now),
                              total=events, desc=f"publish {s.topic_for(config)}", unit="ev"):
                await pub.send(event)
            if s.name == "webhook":
                for raw in HOSTILE:
                    await pub.send_raw(b"org-0001", raw)
            published += events + (len(HOSTILE) if s.name == "webhook" else 0)
    print(f"published {published} records (about 12% are webhook retries with repeated idempotency keys)")
    totals = await run.consume(config, list(streams.STREAMS.values()), asyncio.Event(), drain=True)
    for name, t in totals.items():
        print(f"consumed {name:<8} stored={t.stored} duplicates={t.duplicates} rejected={t.rejected} "
              f"batches={t.batches}")
    pool = await create_pool(config.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            print(await summary(conn, config))
    finally:
        await pool.close()
    print("next: `ingest status --once` (the operator's view), `ingest dlq list` (the dead letters and why), "
          "`ingest dev down` (stop what `ingest dev up` started)")
    return 0
