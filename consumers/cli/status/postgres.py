"""Postgres queries for the status view: stored offsets, recent activity, partition coverage."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from consumers.streams import Stream
from ingest import partitions
from ingest.maintenance import TablePolicy
from ingest.redaction import redact
from ingest.services import ServiceUnavailable
from ingest.sql import ident

QUERY_TIMEOUT_MS = 5000
TOP_N = 5


async def connect_postgres(url: str, *, budget_s: float = 5.0) -> asyncpg.Connection:
    """One connection with statement and lock timeouts (status queries must never hang the view)."""
    try:
        conn = await asyncpg.connect(url, timeout=budget_s,
                                     server_settings={"statement_timeout": str(QUERY_TIMEOUT_MS),
                                                      "lock_timeout": str(QUERY_TIMEOUT_MS // 2),
                                                      "application_name": "ingest-status"})
    except (TimeoutError, OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ServiceUnavailable("postgres", redact(url), exc) from None
    return conn


async def stored_offsets(conn: asyncpg.Connection, table: str, group: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(f"SELECT partition, next_offset FROM {ident(table)} WHERE group_id = $1 AND topic = $2",
                            group, topic)
    return {r[0]: r[1] for r in rows}


async def activity(conn: asyncpg.Connection, stream: Stream) -> dict[str, Any]:
    """Rates over the last minute and tenants/dead letters over the last hour.

    Stored events are counted in the event table through its BRIN index on ``ingested_at`` (a few pages per
    partition). Duplicates are not recorded in Postgres (see ``ingest_events_total{outcome}``)."""
    tables = stream.tables()
    stored_min = await conn.fetchval(
        f"SELECT count(*) FROM {ident(tables.events)} WHERE ingested_at > now() - interval '1 minute'")
    dead = await conn.fetch(
        f"""SELECT reason, count(*) FILTER (WHERE created_at > now() - interval '1 minute'), count(*)
           FROM {ident(tables.dead_letters)} WHERE stream = $1 AND created_at > now() - interval '1 hour'
           GROUP BY reason ORDER BY 3 DESC""", stream.name)
    tenants = await conn.fetch(
        f"""SELECT tenant_id, count(*) FROM {ident(tables.events)}
           WHERE ingested_at > now() - interval '1 hour'
           GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $1""", TOP_N)
    quota = await conn.fetch(
        f"""SELECT tenant_id, count(*) FROM {ident(tables.dead_letters)}
           WHERE stream = $1 AND reason = 'quota_exceeded' AND created_at > now() - interval '1 hour'
           GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2""", stream.name, TOP_N)
    dead_min = {r[0]: r[1] for r in dead if r[1]}
    quota_min = dead_min.get("quota_exceeded", 0)
    rejected_min = sum(dead_min.values()) - quota_min
    return {
        "last_minute": {"stored": stored_min, "rejected": rejected_min, "quota_exceeded": quota_min,
                        "duplicates": None, "dead_letters_by_reason": dead_min,
                        "per_second": {"stored": round(stored_min / 60, 2), "rejected": round(rejected_min / 60, 2),
                                       "quota_exceeded": round(quota_min / 60, 2)}},
        "dead_letters_last_hour": {r[0]: r[2] for r in dead},
        "top_tenants_by_volume": [{"tenant_id": r[0], "stored": r[1]} for r in tenants],
        "top_tenants_by_quota_rejections": [{"tenant_id": r[0], "rejected": r[1]} for r in quota],
    }


async def coverage(conn: asyncpg.Connection, table: str, policy: TablePolicy, now: datetime) -> dict[str, Any]:
    """Partitions present, how far ahead they reach, missing ranges in the coverage window, DEFAULT rows."""
    have = await partitions.existing(conn, table)
    first, last = partitions.coverage(now, policy.retention, policy.premake)
    missing = partitions.plan(have, first, last, policy.granularity)
    default: int | None = None
    if await conn.fetchval("SELECT to_regclass($1)", ident(partitions.default_name(table))) is not None:
        default = await partitions.default_rows(conn, table)
    return {
        "table": table, "granularity": policy.granularity, "partitions": len(have),
        "retention_days": policy.retention / timedelta(days=1), "premake_days": policy.premake / timedelta(days=1),
        "first_start": have[0].start.isoformat() if have else None,
        "last_end": have[-1].end.isoformat() if have else None,
        "ahead_seconds": round((have[-1].end - now).total_seconds()) if have else None,
        "missing": [[s.isoformat(), e.isoformat()] for s, e in missing],
        "default_rows": default,
    }
