"""The status document: every service and stream in one JSON-ready snapshot, and whether it is healthy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from consumers import streams
from consumers.cli.status.kafka import EndOffset, end_offsets, group_members
from consumers.cli.status.lag import partition_row
from consumers.cli.status.postgres import activity, connect_postgres, coverage, stored_offsets
from consumers.streams import Stream
from ingest.config import Config, PartitionConfig, maintenance_url
from ingest.maintenance import TablePolicy
from ingest.redaction import redact, redact_text
from ingest.services import ServiceUnavailable


async def _timed(coro: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    result = await coro
    return result, round((time.perf_counter() - t) * 1000, 2)


def _down(where: str, exc: BaseException) -> dict[str, Any]:
    detail = str(exc) if isinstance(exc, ServiceUnavailable) else f"{type(exc).__name__}: {exc}"
    return {"ok": False, "where": redact(where), "latency_ms": None, "error": redact_text(detail)}


async def _postgres_part(config: Config, selected: Sequence[Stream], policies_: Sequence[TablePolicy],
                         now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    where = redact(config.database_url)
    conn = await connect_postgres(maintenance_url(config))
    try:
        _, latency = await _timed(conn.fetchval("SELECT 1"))
        tls = bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        per: dict[str, Any] = {}
        for s, pol in zip(selected, policies_, strict=True):
            part: dict[str, Any] = {}
            try:
                part["stored_offsets"] = await stored_offsets(conn, s.tables().offsets, s.group_for(config),
                                                              s.topic_for(config))
                part.update(await activity(conn, s))
                part["partition_coverage"] = await coverage(conn, s.table, pol, now)
            except asyncpg.UndefinedTableError:
                part["error"] = "schema missing: run `ingest migrate` first"
            except (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError) as exc:
                part["error"] = f"a status query gave up ({type(exc).__name__}): a lock or a slow query"
            per[s.name] = part
        return {"ok": True, "where": where, "latency_ms": latency, "error": None, "tls": tls}, per
    finally:
        await conn.close()


async def _redis_part(config: Config) -> dict[str, Any]:
    where = redact(config.redis_url)
    client: Redis = Redis.from_url(config.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        await client.ping()  # connects
        _, latency = await _timed(client.ping())
        tls = config.redis_url.startswith("rediss://")
        return {"ok": True, "where": where, "latency_ms": latency, "error": None, "tls": tls}
    finally:
        await client.aclose()


async def _kafka_part(config: Config, selected: Sequence[Stream]) -> tuple[dict[str, Any], Any, Any]:
    t = time.perf_counter()
    ends = await end_offsets(config, [s.topic_for(config) for s in selected])
    latency = round((time.perf_counter() - t) * 1000, 2)
    members: dict[str, Any] | str
    try:
        members = await group_members(config, [s.group_for(config) for s in selected])
    except ServiceUnavailable as exc:  # the broker answered the offsets just before: not an outage
        members = f"unknown: the broker did not describe the group ({exc.detail})"
    sec = config.kafka_security
    return ({"ok": True, "where": config.kafka_bootstrap, "latency_ms": latency, "error": None,
             "tls": sec.protocol.endswith("SSL"), "sasl": sec.sasl_mechanism or None}, ends, members)


async def snapshot(config: Config, selected: Sequence[Stream], *,
                   per_stream: Mapping[str, PartitionConfig] | None = None,
                   now: datetime | None = None) -> dict[str, Any]:
    """One status document (JSON-ready). Unreachable services are reported, never raised.

    ``services.kafka.latency_ms`` is the time to read the end offsets (connect + metadata + one fetch).
    ``services.*.tls`` says whether that connection is encrypted (Postgres: as the server sees it); ``where`` and
    ``error`` never contain a password."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    pols = streams.policies(config, selected, per_stream)
    pg, redis_, kafka = await asyncio.gather(
        _postgres_part(config, selected, pols, now), _redis_part(config), _kafka_part(config, selected),
        return_exceptions=True)
    services: dict[str, Any] = {}
    pg_streams: dict[str, Any] = {}
    if isinstance(pg, BaseException):
        services["postgres"] = _down(redact(config.database_url), pg)
    else:
        services["postgres"], pg_streams = pg
    services["redis"] = _down(redact(config.redis_url), redis_) if isinstance(redis_, BaseException) else redis_
    ends: dict[str, dict[int, EndOffset]] = {}
    members: Any = None
    if isinstance(kafka, BaseException):
        services["kafka"] = _down(config.kafka_bootstrap, kafka)
    else:
        services["kafka"], ends, members = kafka
    doc: dict[str, Any] = {"generated_at": now.isoformat(), "services": services, "streams": {}}
    for s in selected:
        topic, group = s.topic_for(config), s.group_for(config)
        pgs = pg_streams.get(s.name, {})
        stored: dict[int, int] = pgs.get("stored_offsets", {})
        known_progress = "stored_offsets" in pgs  # without Postgres, lag is unknown (not "from the beginning")
        topic_ends = ends.get(topic, {})
        rows = [partition_row(p, topic_ends.get(p), stored.get(p), known_progress=known_progress)
                for p in sorted(set(topic_ends) | set(stored))]
        entry: dict[str, Any] = {"topic": topic, "group": group, "table": s.table}
        if isinstance(members, dict):
            g = members.get(group) or {"state": None, "members": []}
            entry["group_state"], entry["members"] = g["state"], g["members"]
        else:
            entry["group_state"], entry["members"] = None, None
            if isinstance(members, str):
                entry["members_error"] = members
        known = [r["lag"] for r in rows if r["lag"] is not None]
        entry["partitions"] = rows
        entry["total_lag"] = sum(known) if known else None
        entry["stored_total"] = sum(max(v, 0) for v in stored.values())
        entry.update({k: v for k, v in pgs.items() if k != "stored_offsets"})
        doc["streams"][s.name] = entry
    return doc


def healthy(doc: Mapping[str, Any]) -> bool:
    return all(s["ok"] for s in doc["services"].values())
