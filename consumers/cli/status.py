"""The operator's view: lag, progress, rates, tenants, dead letters, partition coverage and service health.

Reads only Kafka, Postgres and Redis (never a metrics endpoint), so it works from any machine with the same
settings. Used by ``ingest lag``, ``ingest status`` and ``ingest partitions``.

Kafka end offsets: the embedded broker (Tansu) answers ListOffsets(latest) with a stale value, while the high
watermark in a fetch response is right. ``end_offsets`` therefore assigns a throwaway consumer (no group) to the
partitions, seeks to the end and fetches once, and takes ``max(highwater, ListOffsets)`` per partition
(ListOffsets alone is the fallback when no fetch answered in time — real Kafka gives the same value for both).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from redis.asyncio import Redis

from consumers import streams
from consumers.streams import Stream
from ingest import kafka_options, partitions
from ingest.config import Config, PartitionConfig
from ingest.maintenance import TablePolicy
from ingest.offsets import UNSET
from ingest.redaction import redact, redact_text
from ingest.services import ServiceUnavailable, kafka_starting
from ingest.sql import ident

QUERY_TIMEOUT_MS = 5000
TOP_N = 5


# -- Kafka ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EndOffset:
    beginning: int
    end: int
    highwater: int | None
    listed: int | None


@contextlib.asynccontextmanager
async def _probe(config: Config, client_id: str, budget_s: float) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer outside any group (nothing auto-commits, nothing resets by itself); any failure to reach
    or use the broker becomes ``ServiceUnavailable``."""
    bootstrap = config.kafka_bootstrap
    consumer = AIOKafkaConsumer(**kafka_options.consumer(
        config, client_id=client_id, enable_auto_commit=False, group_id=None, auto_offset_reset="none",
        fetch_max_wait_ms=100, max_partition_fetch_bytes=64 * 1024, request_timeout_ms=int(budget_s * 1000)))
    try:
        try:
            async with kafka_starting(bootstrap):
                await asyncio.wait_for(consumer.start(), budget_s)
            yield consumer
        except ServiceUnavailable:
            raise
        except Exception as exc:
            raise ServiceUnavailable("kafka", bootstrap, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _log_ends(config: Config, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                    budget_s: float) -> dict[TopicPartition, EndOffset]:
    """Beginning and end of each assigned partition: ``max(highwater, ListOffsets)`` (see the module note)."""
    listed: dict[Any, int] = {}
    with contextlib.suppress(Exception):
        listed = await consumer.end_offsets(tps)
    beginning: dict[Any, int] = {}
    with contextlib.suppress(Exception):
        beginning = await consumer.beginning_offsets(tps)
    await consumer.seek_to_end(*tps)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        pending = [tp for tp in tps if consumer.highwater(tp) is None]
        if not pending:
            break
        await consumer.getmany(*pending, timeout_ms=200)
    out = {}
    for tp in tps:
        hw, lo = consumer.highwater(tp), listed.get(tp)
        known = [v for v in (hw, lo) if v is not None]
        if not known:
            raise ServiceUnavailable("kafka", config.kafka_bootstrap, f"no end offset for {tp.topic}[{tp.partition}]")
        out[tp] = EndOffset(beginning.get(tp, 0), max(known), hw, lo)
    return out


async def end_offsets(config: Config, topics: Sequence[str], *,
                      budget_s: float = 5.0) -> dict[str, dict[int, EndOffset]]:
    """Per topic and partition: beginning and end offsets (see the module note). Missing topics map to ``{}``.

    Raises ``ServiceUnavailable`` when the broker cannot be reached."""
    async with _probe(config, "ingest-status", budget_s) as consumer:
        present = await consumer.topics()
        tps = [TopicPartition(t, p) for t in topics if t in present
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        out: dict[str, dict[int, EndOffset]] = {t: {} for t in topics}
        if tps:
            consumer.assign(tps)
            for tp, e in (await _log_ends(config, consumer, tps, budget_s)).items():
                out[tp.topic][tp.partition] = e
        return out


async def offsets_for_time(config: Config, topic: str, partitions: Sequence[int], ts_ms: int, *,
                           budget_s: float = 10.0) -> dict[int, int | None]:
    """Per partition: the first offset whose record timestamp is at or after ``ts_ms`` (None: none is, i.e. the
    log end). Asks the broker (ListOffsets by time); an answer that breaks that rule (a record timestamped before
    ``ts_ms``, as the embedded broker returns) is replaced by a bisection over the log, reading one record per
    step (record timestamps are taken as non-decreasing within a partition)."""
    async with _probe(config, "ingest-offsets", budget_s) as consumer:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        answers = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
        bounds = await _log_ends(config, consumer, tps, budget_s)
        out: dict[int, int | None] = {}
        for tp in tps:
            a = answers.get(tp)
            if a is None or a.timestamp >= ts_ms:
                out[tp.partition] = None if a is None else a.offset
                continue
            lo, hi = bounds[tp].beginning, bounds[tp].end  # first offset in [lo, hi) with timestamp >= ts_ms
            while lo < hi:
                mid = (lo + hi) // 2
                consumer.seek(tp, mid)
                got: list[Any] = []
                deadline = time.monotonic() + budget_s
                while not got and time.monotonic() < deadline:
                    got = (await consumer.getmany(tp, timeout_ms=200, max_records=1)).get(tp, [])
                if not got:
                    raise ServiceUnavailable("kafka", config.kafka_bootstrap,
                                             f"no record at {topic}[{tp.partition}]@{mid}")
                if got[0].timestamp >= ts_ms:
                    hi = mid
                else:
                    lo = got[0].offset + 1
            out[tp.partition] = lo if lo < bounds[tp].end else None
        return out


async def group_members(config: Config, groups: Sequence[str], *,
                        budget_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """``describe_consumer_groups``: state and members (id, client, host, instance id, assigned partitions).

    Tansu answers with member ids and the group state but empty client ids, hosts and assignments; what is
    missing is reported as ``None``."""
    bootstrap = config.kafka_bootstrap
    admin = AIOKafkaAdminClient(**kafka_options.admin(config, client_id="ingest-status",
                                                      request_timeout_ms=int(budget_s * 1000)))
    try:
        async with kafka_starting(bootstrap):
            await asyncio.wait_for(admin.start(), budget_s)
        responses = await asyncio.wait_for(admin.describe_consumer_groups(list(groups)), budget_s)
    except ServiceUnavailable:
        raise
    except Exception as exc:
        raise ServiceUnavailable("kafka", bootstrap, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    out: dict[str, dict[str, Any]] = {}
    for resp in responses:
        for g in resp.to_object().get("groups", []):
            members = []
            for m in g.get("members", []):
                assigned: list[int] | None = None
                raw = m.get("member_assignment") or b""
                if raw:
                    with contextlib.suppress(Exception):
                        assigned = sorted(tp.partition for tp in ConsumerProtocolMemberAssignment.decode(raw).partitions())
                members.append({"member_id": m.get("member_id"), "client_id": m.get("client_id") or None,
                                "host": m.get("client_host") or None,
                                "instance_id": m.get("group_instance_id") or None, "partitions": assigned})
            out[g["group"]] = {"state": g.get("state") or None, "error_code": g.get("error_code", 0),
                               "members": members}
    return out


# -- Postgres -------------------------------------------------------------------------------------------------

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


def mismatch_of(end: EndOffset | None, stored: int | None) -> str | None:
    """``beyond_end`` or ``below_start`` when the log no longer holds the stored next offset, else None."""
    if end is None or stored is None or stored == UNSET:
        return None
    if stored > end.end:
        return "beyond_end"
    if stored < end.beginning:
        return "below_start"
    return None


def lag_of(end: EndOffset | None, stored: int | None) -> int | None:
    """Records in the log that are still to be read: end minus the stored next offset. Nothing consumed yet
    (``-1``/missing) and a stored offset the log no longer holds (see ``mismatch_of``) count from the log start,
    where the consumer resumes: lag never reads 0 while records are unread."""
    if end is None:
        return None
    at = end.beginning if stored is None or stored == UNSET or mismatch_of(end, stored) else stored
    return max(0, end.end - at)


def partition_row(partition: int, end: EndOffset | None, stored: int | None, *,
                  known_progress: bool = True) -> dict[str, Any]:
    """One partition's line in ``lag``, ``status`` and ``offsets show``."""
    return {"partition": partition, "stored_offset": stored, "next_offset": stored,
            "log_start": end.beginning if end else None, "end_offset": end.end if end else None,
            "log_end": end.end if end else None, "lag": lag_of(end, stored) if known_progress else None,
            "mismatch": mismatch_of(end, stored)}


async def lag_report(config: Config, selected: Sequence[Stream], *,
                     conn: asyncpg.Connection | None = None) -> dict[str, Any]:
    """Per stream and partition: end offset, stored offset, lag. Raises ``ServiceUnavailable``."""
    ends = await end_offsets(config, [s.topic_for(config) for s in selected])
    own = conn is None
    db = conn or await connect_postgres(config.database_url)
    try:
        out: dict[str, Any] = {}
        for s in selected:
            topic, group = s.topic_for(config), s.group_for(config)
            try:
                stored = await stored_offsets(db, s.tables().offsets, group, topic)
            except asyncpg.UndefinedTableError:
                raise ServiceUnavailable("postgres", redact(config.database_url),
                                         "schema missing: run `ingest migrate` first") from None
            rows = [partition_row(p, ends[topic].get(p), stored.get(p)) for p in sorted(set(ends[topic]) | set(stored))]
            out[s.name] = {"topic": topic, "group": group, "topic_exists": bool(ends[topic]),
                           "partitions": rows, "total_lag": sum(r["lag"] or 0 for r in rows)}
        return out
    finally:
        if own:
            await db.close()


async def _activity(conn: asyncpg.Connection, stream: Stream) -> dict[str, Any]:
    """Rates over the last minute and tenants/dead letters over the last hour.

    Stored events are counted in the dedupe ledger (its ``seen_at`` is indexed and written in the same
    transaction as each stored row); the event tables have no index on ``ingested_at``, so counting there would
    scan every partition. Duplicates are not recorded in Postgres (see ``ingest_events_total{outcome}``)."""
    tables = stream.tables()
    stored_min = await conn.fetchval(
        f"SELECT count(*) FROM {ident(tables.ledger)} WHERE seen_at > now() - interval '1 minute' AND stream = $1",
        stream.name)
    dead = await conn.fetch(
        f"""SELECT reason, count(*) FILTER (WHERE created_at > now() - interval '1 minute'), count(*)
           FROM {ident(tables.dead_letters)} WHERE stream = $1 AND created_at > now() - interval '1 hour'
           GROUP BY reason ORDER BY 3 DESC""", stream.name)
    tenants = await conn.fetch(
        f"""SELECT tenant_id, count(*) FROM {ident(tables.ledger)}
           WHERE seen_at > now() - interval '1 hour' AND stream = $1
           GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2""", stream.name, TOP_N)
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


# -- the snapshot ---------------------------------------------------------------------------------------------

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
    conn = await connect_postgres(config.database_url)
    try:
        _, latency = await _timed(conn.fetchval("SELECT 1"))
        tls = bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        per: dict[str, Any] = {}
        for s, pol in zip(selected, policies_, strict=True):
            part: dict[str, Any] = {}
            try:
                part["stored_offsets"] = await stored_offsets(conn, s.tables().offsets, s.group_for(config),
                                                              s.topic_for(config))
                part.update(await _activity(conn, s))
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
    except ServiceUnavailable as exc:
        members = str(exc)
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


# -- text rendering -------------------------------------------------------------------------------------------

def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    sign, s = ("-" if seconds < 0 else "+"), abs(int(seconds))
    d, rem = divmod(s, 86400)
    return f"{sign}{d}d {rem // 3600}h" if d else f"{sign}{rem // 3600}h {rem % 3600 // 60}m"


def render(doc: Mapping[str, Any]) -> str:
    """The human view of ``snapshot``'s document."""
    lines = [f"ingest status  {doc['generated_at']}"]
    svc = []
    for name, s in doc["services"].items():
        svc.append(f"{name} ok {s['latency_ms']} ms{' tls' if s.get('tls') else ''}" if s["ok"] else f"{name} DOWN")
    lines.append("services: " + " | ".join(svc))
    lines += [f"  {name}: {s['error']}" for name, s in doc["services"].items() if not s["ok"]]
    for name, st in doc["streams"].items():
        lines.append("")
        members = st.get("members")
        mtext = "n/a" if members is None else str(len(members))
        lines.append(f"[{name}] topic {st['topic']}  group {st['group']} ({st.get('group_state') or 'n/a'}, "
                     f"{mtext} members)  lag {st['total_lag'] if st['total_lag'] is not None else 'n/a'}")
        for m in members or []:
            parts = "n/a" if m["partitions"] is None else ",".join(map(str, m["partitions"])) or "-"
            lines.append(f"  member {m['member_id']}  client {m['client_id'] or 'n/a'}  host {m['host'] or 'n/a'}"
                         f"  partitions {parts}")
        if st.get("members_error"):
            lines.append(f"  members: {st['members_error']}")
        if st.get("error"):
            lines.append(f"  postgres: {st['error']}")
        if st["partitions"]:
            lines.append("  partition      stored         end         lag")
            for r in st["partitions"]:
                flag = f"  position outside the log: {r['mismatch']}" if r.get("mismatch") else ""
                lines.append(f"  {r['partition']:>9} {_n(r['stored_offset']):>11} {_n(r['end_offset']):>11} "
                             f"{_n(r['lag']):>11}{flag}")
        lm = st.get("last_minute")
        if lm:
            ps = lm["per_second"]
            lines.append(f"  last minute: stored {lm['stored']} ({ps['stored']}/s)  rejected {lm['rejected']} "
                         f"({ps['rejected']}/s)  quota_exceeded {lm['quota_exceeded']} ({ps['quota_exceeded']}/s)"
                         "  duplicates n/a (not in Postgres)")
            dl = st["dead_letters_last_hour"]
            lines.append("  dead letters (1h): " + (", ".join(f"{k} {v}" for k, v in dl.items()) or "none"))
            top = st["top_tenants_by_volume"]
            lines.append("  top tenants (1h): " + (", ".join(f"{t['tenant_id']} {t['stored']}" for t in top)
                                                   or "none"))
            qt = st["top_tenants_by_quota_rejections"]
            lines.append("  quota rejections (1h): " + (", ".join(f"{t['tenant_id']} {t['rejected']}" for t in qt)
                                                        or "none"))
        cov = st.get("partition_coverage")
        if cov:
            missing = f"{len(cov['missing'])} missing ranges" if cov["missing"] else "no gaps"
            lines.append(f"  partitions: {cov['partitions']} ({cov['granularity']}), covered until "
                         f"{cov['last_end'] or 'n/a'} ({_dur(cov['ahead_seconds'])}), {missing}, "
                         f"DEFAULT rows {_n(cov['default_rows'])}")
    return "\n".join(lines)


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)
