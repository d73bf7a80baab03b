"""`ingest dlq list | show | replay | purge`: inspect dead letters, re-publish their original bytes, delete old ones.

Replay sends each entry's original value and Kafka key to its ``source_topic`` and marks the entry replayed only
after the broker acknowledged it, chunk by chunk: an interrupted replay re-sends at most one unmarked chunk, which
the consumer drops as duplicates by idempotency key. Purge deletes entries created before a date, never an
unreplayed one younger than ``INGEST_DLQ_RETENTION_DAYS`` (``ingest.dlq.purge``). See docs/dead-letters.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

import consumers.cli.args as args_
from consumers import streams
from ingest import dlq, kafka_options
from ingest.config import Config, maintenance_url
from ingest.reject import Reason
from ingest.services import ServiceUnavailable, create_pool, kafka_starting

if TYPE_CHECKING:
    from ingest.sql import Conn

REPLAY_CHUNK = 500


def dead_letter_table() -> str:
    """The dead-letter table every stream writes to (from ``consumers.streams``)."""
    return streams.shared_tables().dead_letters


def register(sub: Any) -> None:
    """Add the `dlq` commands to ``sub``."""
    parser = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dsub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    lst = dsub.add_parser("list", help="counts by stream and reason, then the most recent entries")
    _add_filters(lst)
    lst.add_argument("--limit", type=_positive, default=20, help="recent entries to show (default 20)")
    lst.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    lst.set_defaults(handler=_list)

    show = dsub.add_parser("show", help="one entry with its original bytes")
    show.add_argument("id", type=args_.positive_int, help="the entry's id (first column of `ingest dlq list`)")
    show.add_argument("--json", action="store_true", help="JSON, with the bytes in base64")
    show.set_defaults(handler=_show)

    replay = dsub.add_parser(
        "replay", help="re-publish the original bytes of pending entries to their source topic, then mark them")
    _add_filters(replay)
    replay.add_argument("--limit", type=_positive, default=None, help="replay at most N entries (oldest first)")
    replay.add_argument("--dry-run", action="store_true", help="print what would be sent; send and change nothing")
    replay.add_argument("--include-tombstones", action="store_true",
                        help="also re-publish tombstones (null values); by default they are skipped and stay pending")
    replay.add_argument("--json", action="store_true", help="print the result as one JSON object")
    replay.set_defaults(handler=_replay)

    purge = dsub.add_parser(
        "purge", help="delete entries created before DATE (prints the plan; --execute deletes); never an unreplayed "
                      "entry younger than INGEST_DLQ_RETENTION_DAYS")
    purge.add_argument("--before", type=_date, required=True, metavar="DATE",
                       help="created before DATE: YYYY-MM-DD (midnight UTC) or an ISO 8601 time")
    purge.add_argument("--reason", action="append", default=[], metavar="R", choices=[r.value for r in Reason],
                       help="only this reason code (repeatable)")
    purge.add_argument("--execute", action="store_true", help="delete; without it nothing changes")
    purge.add_argument("--json", action="store_true", help="print the result as one JSON object")
    purge.set_defaults(handler=_purge)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _since(text: str) -> datetime:
    try:
        return dlq.parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    args_.add_stream(parser)
    parser.add_argument("--reason", action="append", default=[], metavar="R", choices=[r.value for r in Reason],
                        help="a reason code such as not_json (repeatable; see docs/dead-letters.md)")
    parser.add_argument("--tenant", default=None, metavar="T", help="tenant_id as recorded in the dead letter")
    parser.add_argument("--since", type=_since, default=None, metavar="WHEN",
                        help="created at or after WHEN: a duration ago (30m, 1h, 2d, 1w) or an ISO 8601 time")


def _filters(args: argparse.Namespace) -> dlq.Filters:
    return dlq.Filters(stream=None if args.stream == streams.ALL else args.stream, reasons=tuple(args.reason), tenant=args.tenant, since=args.since)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _key_text(key: bytes | None) -> str:
    if key is None:
        return "(null)"
    text = dlq.as_text(key)
    return dlq.printable(text) if text is not None else "hex " + key.hex()


def _print_json(obj: Any) -> None:
    print(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


async def _connect(config: Config) -> asyncpg.Pool:
    return await create_pool(maintenance_url(config), max_size=1)  # the owner: operators read and mark


def _schema_missing() -> int:
    print("ingest: schema missing: run `ingest migrate` first", file=sys.stderr)
    return 1


# -- list ------------------------------------------------------------------------------------------------------

async def _list(args: argparse.Namespace, config: Config) -> int:
    table, filters = dead_letter_table(), _filters(args)
    pool = await _connect(config)
    try:
        async with pool.acquire() as conn:
            counts = await dlq.counts(conn, table, filters)
            entries = await dlq.recent(conn, table, filters, args.limit)
    except asyncpg.UndefinedTableError:
        return _schema_missing()
    finally:
        await pool.close()
    if args.json:
        _print_json({
            "total": sum(c.pending + c.replayed for c in counts),
            "pending": sum(c.pending for c in counts),
            "replayed": sum(c.replayed for c in counts),
            "counts": [{"stream": c.stream, "reason": c.reason, "pending": c.pending, "replayed": c.replayed}
                       for c in counts],
            "entries": [_entry_json(e) for e in entries],
        })
        return 0
    pending, replayed = sum(c.pending for c in counts), sum(c.replayed for c in counts)
    print(f"dead letters: {pending + replayed} ({pending} pending, {replayed} replayed)")
    if counts:
        print(f"  {'stream':<8} {'reason':<24} {'pending':>8} {'replayed':>8}")
        for c in counts:
            print(f"  {c.stream:<8} {dlq.printable(c.reason, 24):<24} {c.pending:>8} {c.replayed:>8}")
    if entries:
        print(f"most recent {len(entries)} (newest first):")
        print(f"  {'id':>8}  {'created_at (UTC)':<19}  {'stream':<8} {'reason':<24} {'tenant':<20} "
              f"{'topic[partition]@offset':<36} {'replayed':<8} detail")
        for e in entries:
            created = e.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            where = f"{e.source_topic}[{e.source_partition}]@{e.source_offset}"
            print(f"  {e.id:>8}  {created:<19}  {e.stream:<8} {dlq.printable(e.reason, 24):<24} "
                  f"{dlq.printable(e.tenant_id, 20):<20} {dlq.printable(where, 36):<36} "
                  f"{'yes' if e.replayed_at else '':<8} {dlq.printable(e.detail, 80)}")
    return 0


def _entry_json(e: dlq.Entry) -> dict[str, Any]:
    return {
        "id": e.id, "created_at": _iso(e.created_at), "stream": e.stream, "reason": e.reason, "detail": e.detail,
        "tenant_id": e.tenant_id, "idempotency_key": e.idempotency_key, "source_topic": e.source_topic,
        "source_partition": e.source_partition, "source_offset": e.source_offset,
        "kafka_key_base64": _b64(e.kafka_key), "kafka_timestamp": _iso(e.kafka_timestamp),
        "replayed_at": _iso(e.replayed_at), "raw_size": e.raw_size, "tombstone": e.tombstone,
    }


# -- show ------------------------------------------------------------------------------------------------------

async def _show(args: argparse.Namespace, config: Config) -> int:
    pool = await _connect(config)
    try:
        async with pool.acquire() as conn:
            entry = await dlq.get(conn, dead_letter_table(), args.id)
    except asyncpg.UndefinedTableError:
        return _schema_missing()
    finally:
        await pool.close()
    if entry is None:
        print(f"ingest: no dead letter with id {args.id}", file=sys.stderr)
        return 1
    text = None if entry.raw is None else dlq.as_text(entry.raw)
    if args.json:
        _print_json({**_entry_json(entry), "raw_base64": _b64(entry.raw),
                     "raw_text": None if entry.raw is None else _utf8_or_none(entry.raw)})
        return 0
    fields = [
        ("id", str(entry.id)), ("created_at", _iso(entry.created_at)), ("stream", entry.stream),
        ("reason", entry.reason), ("detail", entry.detail), ("tenant_id", entry.tenant_id),
        ("idempotency_key", entry.idempotency_key),
        ("source", f"{entry.source_topic} partition {entry.source_partition} offset {entry.source_offset}"),
        ("kafka_key", _key_text(entry.kafka_key)), ("kafka_timestamp", _iso(entry.kafka_timestamp)),
        ("replayed_at", _iso(entry.replayed_at)),
    ]
    for name, value in fields:
        if value is not None and "\n" in value:  # multi-line details (Postgres adds DETAIL lines) stay readable
            value = ("\n" + " " * 17).join(dlq.printable(line) for line in value.splitlines())
            print(f"{name:<16} {value}")
        else:
            print(f"{name:<16} {dlq.printable(value)}")
    if entry.raw is None:
        print("raw              none: the Kafka value was null (tombstone)")
    elif text is not None:
        print(f"raw              {len(entry.raw)} bytes, UTF-8:")
        print(text)
    else:
        print(f"raw              {len(entry.raw)} bytes, not printable UTF-8, hex dump:")
        print(dlq.hexdump(entry.raw))
    return 0


def _utf8_or_none(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- replay ----------------------------------------------------------------------------------------------------

async def _replay(args: argparse.Namespace, config: Config) -> int:
    table, filters = dead_letter_table(), _filters(args)
    pool = await _connect(config)
    try:
        async with pool.acquire() as conn:
            upto = await dlq.last_id(conn, table)
            plan = await dlq.replay_plan(conn, table, filters, upto_id=upto,
                                         include_tombstones=args.include_tombstones)
            total = sum(p.to_send for p in plan)
            if args.limit is not None:
                total = min(total, args.limit)
            skipped = sum(p.tombstones_skipped for p in plan)
            if args.dry_run:
                _print_plan(args, plan, total, skipped)
                return 0
            if not await dlq.try_replay_lock(conn, table):
                print("ingest: another `ingest dlq replay` is running on this database; try again later",
                      file=sys.stderr)
                return 1
            try:
                result = await _send_all(conn, table, filters, config, upto=upto, total=total,
                                         include_tombstones=args.include_tombstones)
            finally:
                await dlq.replay_unlock(conn, table)
    except asyncpg.UndefinedTableError:
        return _schema_missing()
    finally:
        await pool.close()
    sent, failed, by_reason = result
    if args.json:
        _print_json({"sent": sent, "marked": sent, "failed": failed, "skipped_tombstones": skipped,
                     "by_reason": dict(sorted(by_reason.items()))})
    else:
        print(f"replayed {sent} dead letters (re-published and marked replayed)"
              + (f"; {failed} failed to send and stay pending" if failed else "")
              + (f"; {skipped} tombstones skipped (--include-tombstones re-publishes them)" if skipped else ""))
    return 1 if failed else 0


# -- purge -----------------------------------------------------------------------------------------------------

async def _purge(args: argparse.Namespace, config: Config) -> int:
    table = dead_letter_table()
    retention = config.dlq_retention
    keep_after = datetime.now(UTC) - retention if retention else None
    pool = await _connect(config)
    try:
        async with pool.acquire() as conn:
            plan = await dlq.purge_plan(conn, table, before=args.before, keep_pending_after=keep_after,
                                        reasons=args.reason)
            deleted = await dlq.purge(conn, table, before=args.before, keep_pending_after=keep_after,
                                      reasons=args.reason) if args.execute and plan.deletable else 0
    except asyncpg.UndefinedTableError:
        return _schema_missing()
    finally:
        await pool.close()
    kept_why = (f"unreplayed and younger than the retention ({retention.days} days, INGEST_DLQ_RETENTION_DAYS)"
                if retention else "unreplayed (INGEST_DLQ_RETENTION_DAYS=0 keeps them)")
    if args.json:
        _print_json({"before": args.before.isoformat(), "reasons": args.reason, "deletable": plan.deletable,
                     "kept_pending": plan.kept_pending, "deleted": deleted, "executed": args.execute})
    elif args.execute:
        print(f"deleted {deleted} dead letters created before {args.before.isoformat()}; kept {plan.kept_pending} "
              f"{kept_why}")
    else:
        print(f"would delete {plan.deletable} dead letters created before {args.before.isoformat()}; would keep "
              f"{plan.kept_pending} {kept_why}; run again with --execute to delete")
    return 0


def _print_plan(args: argparse.Namespace, plan: list[dlq.PlanRow], total: int, skipped: int) -> None:
    if args.json:
        _print_json({"dry_run": True, "would_send": total, "skipped_tombstones": skipped,
                     "plan": [{"stream": p.stream, "reason": p.reason, "source_topic": p.source_topic,
                               "to_send": p.to_send, "tombstones_skipped": p.tombstones_skipped} for p in plan]})
        return
    limited = f" (--limit {args.limit})" if args.limit is not None else ""
    print(f"dry run: would re-publish {total} dead letters{limited}; nothing sent, nothing marked")
    if plan:
        print(f"  {'stream':<8} {'reason':<24} {'topic':<36} {'to send':>8} {'tombstones skipped':>19}")
        for p in plan:
            print(f"  {p.stream:<8} {dlq.printable(p.reason, 24):<24} {dlq.printable(p.source_topic, 36):<36} "
                  f"{p.to_send:>8} {p.tombstones_skipped:>19}")


async def _send_all(conn: Conn, table: str, filters: dlq.Filters, config: Config, *, upto: int, total: int,
                    include_tombstones: bool) -> tuple[int, int, Counter[str]]:
    """Send pending entries chunk by chunk; mark each chunk's acknowledged entries. Returns (sent, failed, by
    reason). Stops at the first chunk with a failed send (those entries stay pending)."""
    sent, failed = 0, 0
    by_reason: Counter[str] = Counter()
    if total == 0:
        return sent, failed, by_reason
    largest = await dlq.largest_pending(conn, table)
    producer = AIOKafkaProducer(**kafka_options.producer(
        config, client_id="ingest-dlq-replay", linger_ms=5, max_request_size=max(1024 * 1024, largest + 64 * 1024)))
    try:
        async with kafka_starting(config.kafka_bootstrap):
            await producer.start()
    except ServiceUnavailable:
        await producer.stop()
        raise
    after: dlq.Cursor | None = None
    try:
        from tqdm import tqdm  # only replay draws a progress bar

        with tqdm(total=total, desc="replay", unit="rec", file=sys.stderr) as bar:
            while sent < total:
                chunk = await dlq.select_for_replay(conn, table, filters, after=after, upto_id=upto,
                                                    limit=min(REPLAY_CHUNK, total - sent),
                                                    include_tombstones=include_tombstones)
                if not chunk:
                    break
                after = dlq.cursor_of(chunk[-1])
                futures: list[Any] = []
                errors: list[BaseException] = []
                for e in chunk:
                    try:
                        futures.append(await producer.send(e.source_topic, key=e.kafka_key, value=e.raw))
                    except Exception as exc:  # refused before sending (size, unknown topic...): stop here
                        errors.append(exc)
                        break
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
                errors += [o for o in outcomes if isinstance(o, BaseException)]
                # Only what the broker acknowledged is marked; the rest stays pending for the next replay.
                acked = [e for e, o in zip(chunk, outcomes, strict=False) if not isinstance(o, BaseException)]
                await dlq.mark_replayed(conn, table, [e.id for e in acked])
                sent += len(acked)
                by_reason.update(e.reason for e in acked)
                bar.update(len(acked))
                if errors:
                    failed = len(chunk) - len(acked)
                    print(f"ingest: {failed} entries not sent ({type(errors[0]).__name__}: {errors[0]}); "
                          "stopping; they stay pending", file=sys.stderr)
                    break
    finally:
        await producer.stop()
    return sent, failed, by_reason

