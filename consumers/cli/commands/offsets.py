"""``ingest offsets show`` and ``ingest offsets reset``: the positions Postgres holds, against the Kafka log.

Positions live in Postgres (``consumer_offsets``), so Kafka's own tools (``kafka-consumer-groups
--reset-offsets``) do not move them; these commands do. A reset is planned and printed first; ``--execute``
applies it in one transaction that also records it in ``offset_changes``, and only while the consumer group has
no live member. A consumer that loaded the old position is fenced by the change (its batch's compare-and-swap
fails) and re-reads the new one.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

import consumers.cli.args as args_
import consumers.cli.status as status
from consumers import streams
from ingest import offsets
from ingest.config import Config, maintenance_url
from ingest.redaction import redact
from ingest.services import ServiceUnavailable
from ingest.sql import ident

EXIT_REFUSED = 1


def register(sub: Any) -> None:
    """Add ``offsets show`` and ``offsets reset`` to ``sub``."""
    names = list(streams.STREAMS)
    off = sub.add_parser("offsets", help="stored positions against the Kafka log: show, reset")
    off_sub = off.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = off_sub.add_parser("show", help="per partition: stored next offset, log start and end, lag, mismatch")
    args_.add_stream(show)
    show.add_argument("--json", action="store_true", help="print a JSON list of partitions to stdout")
    show.set_defaults(handler=_show)

    reset = off_sub.add_parser(
        "reset", help="move stored positions (dry run unless --execute)",
        description="Plan a move of the stored positions and print it; with --execute, apply it in one "
                    "transaction (refused while the consumer group has live members).")
    args_.add_stream(reset, one=True, required=True, help=f"which stream's positions to move ({', '.join(names)})")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true", help="the log start: re-read everything it holds")
    target.add_argument("--to-latest", action="store_true", help="the log end: skip everything unread")
    target.add_argument("--to-datetime", metavar="ISO-8601", type=_instant,
                        help="the first record at or after this time (with a zone, e.g. 2026-12-01T08:00:00Z)")
    target.add_argument("--to-offset", metavar="N", type=args_.non_negative_int, help="offset N (must lie within the log)")
    reset.add_argument("--partition", metavar="P", type=args_.non_negative_int, action="append", default=None,
                       help="only this partition (repeatable; default every partition of the topic)")
    reset.add_argument("--execute", action="store_true", help="apply the plan (default: print it only)")
    reset.add_argument("--force", action="store_true",
                       help="skip the live-member check (for brokers that list members after they left, such as "
                            "the embedded dev broker; a live consumer is still fenced and re-reads the new position)")
    reset.add_argument("--json", action="store_true", help="print the plan as JSON to stdout")
    reset.set_defaults(handler=_reset)


def _instant(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no zone: add Z or an offset such as +02:00")
    return at


async def _log(config: Config, topic: str) -> dict[int, status.EndOffset]:
    ends = await status.end_offsets(config, [topic])
    return ends[topic]


async def _connect(config: Config) -> asyncpg.Connection:
    conn = await status.connect_postgres(maintenance_url(config))
    if await conn.fetchval("SELECT to_regclass($1)", ident(streams.shared_tables().offset_changes)) is None:
        await conn.close()
        raise ServiceUnavailable("postgres", redact(config.database_url), "schema missing: run `ingest migrate` first")
    return conn


# -- show -----------------------------------------------------------------------------------------------------

async def _show(args: argparse.Namespace, config: Config) -> int:
    rows: list[dict[str, Any]] = []
    conn = await _connect(config)
    try:
        for s in streams.select(args.stream):
            topic, group = s.topic_for(config), s.group_for(config)
            log = await _log(config, topic)
            stored = await status.stored_offsets(conn, s.tables().offsets, group, topic)
            for p in sorted(set(log) | set(stored)):
                rows.append({"stream": s.name, "group": group, "topic": topic,
                             **status.partition_row(p, log.get(p), stored.get(p))})
    finally:
        await conn.close()
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    print(f"{'stream':<8} {'partition':>9} {'next_offset':>12} {'log_start':>10} {'log_end':>10} {'lag':>10}")
    for r in rows:
        flag = f"  MISMATCH {r['mismatch']}" if r["mismatch"] else ""
        print(f"{r['stream']:<8} {r['partition']:>9} {_n(r['next_offset']):>12} {_n(r['log_start']):>10} "
              f"{_n(r['log_end']):>10} {_n(r['lag']):>10}{flag}")
    if any(r["mismatch"] for r in rows):
        print("positions outside the log: the consumer resumes at the log start (INGEST_LOG_MISMATCH=reset) or "
              "stops (stop); see docs/operations.md")
    return 0


def _n(v: int | None) -> str:
    return "-" if v is None or v == offsets.UNSET else str(v)


# -- reset ----------------------------------------------------------------------------------------------------

async def _targets(args: argparse.Namespace, config: Config, topic: str,
                   log: dict[int, status.EndOffset]) -> dict[int, int]:
    if args.to_earliest:
        return {p: e.beginning for p, e in log.items()}
    if args.to_latest:
        return {p: e.end for p, e in log.items()}
    if args.to_offset is not None:
        return dict.fromkeys(log, int(args.to_offset))
    ts_ms = int(args.to_datetime.timestamp() * 1000)
    found = await status.offsets_for_time(config, topic, sorted(log), ts_ms)
    return {p: e.end if found.get(p) is None else int(found[p] or 0) for p, e in log.items()}


def _plan(stored: dict[int, int], bounds: dict[int, offsets.LogBounds],
          targets: dict[int, int]) -> list[offsets.Move]:
    return [offsets.Move(p, offsets.Kind.RESET, stored.get(p, offsets.UNSET), targets[p], bounds[p])
            for p in sorted(targets)]


async def _reset(args: argparse.Namespace, config: Config) -> int:
    s = streams.STREAMS[args.stream]
    topic, group = s.topic_for(config), s.group_for(config)
    log = await _log(config, topic)
    if not log:
        print(f"ingest: offsets reset: topic {topic} does not exist", file=sys.stderr)
        return 2
    wanted = sorted(set(args.partition or log))
    missing = [p for p in wanted if p not in log]
    if missing:
        print(f"ingest: offsets reset: {topic} has no partition {', '.join(map(str, missing))} "
              f"(it has 0-{max(log)})", file=sys.stderr)
        return 2
    log = {p: log[p] for p in wanted}
    bounds = {p: offsets.LogBounds(e.beginning, e.end) for p, e in log.items()}
    if args.to_offset is not None:
        outside = [p for p, e in log.items() if not e.beginning <= args.to_offset <= e.end]
        if outside:
            print(f"ingest: offsets reset: offset {args.to_offset} lies outside the log of partition(s) "
                  f"{', '.join(f'{p} ({log[p].beginning}-{log[p].end})' for p in outside)}", file=sys.stderr)
            return 2
    targets = await _targets(args, config, topic, log)
    conn = await _connect(config)
    try:
        plan = _plan(await status.stored_offsets(conn, s.tables().offsets, group, topic), bounds, targets)
        if not args.execute:
            _print_plan(args, s.name, group, topic, plan, executed=False)
            return 0
        members = (await status.group_members(config, [group])).get(group, {})
        live = members.get("members") or []
        if live and not args.force:
            print(f"ingest: offsets reset: group {group} has {len(live)} live member(s); stop its consumers first "
                  "(a member with INGEST_INSTANCE_ID leaves only after the session timeout)", file=sys.stderr)
            return EXIT_REFUSED
        async with conn.transaction():
            stored = await offsets.load(conn, s.tables().offsets, group, topic, wanted)
            plan = _plan(stored, bounds, targets)
            await offsets.apply_moves(conn, s.tables().offsets, s.tables().offset_changes, stream=s.name,
                                      group=group, topic=topic, moves=[m for m in plan if m.old != m.new],
                                      detail=_describe(args))
    finally:
        await conn.close()
    _print_plan(args, s.name, group, topic, plan, executed=True)
    return 0


def _describe(args: argparse.Namespace) -> str:
    if args.to_earliest:
        return "ingest offsets reset --to-earliest"
    if args.to_latest:
        return "ingest offsets reset --to-latest"
    if args.to_offset is not None:
        return f"ingest offsets reset --to-offset {args.to_offset}"
    return f"ingest offsets reset --to-datetime {args.to_datetime.isoformat()}"


def _print_plan(args: argparse.Namespace, stream: str, group: str, topic: str, plan: list[offsets.Move], *,
                executed: bool) -> None:
    rows: list[dict[str, Any]] = [{"stream": stream, "group": group, "topic": topic, "partition": m.partition,
             "current": None if m.old == offsets.UNSET else m.old, "new": m.new, "log_start": m.bounds.start,
             "log_end": m.bounds.end, "reread": m.reread, "skipped": m.skipped} for m in plan]
    if args.json:
        print(orjson.dumps({"executed": executed, "at": datetime.now(UTC).isoformat(), "plan": rows}).decode())
        return
    print(f"{stream}: group {group}  topic {topic}")
    print(f"  {'partition':>9} {'current':>10} {'new':>10} {'re-read':>9} {'skipped':>9}")
    for m in plan:
        print(f"  {m.partition:>9} {_n(m.old):>10} {m.new:>10} {m.reread:>9} {m.skipped:>9}")
    total_re, total_skip = sum(m.reread for m in plan), sum(m.skipped for m in plan)
    if executed:
        moved = sum(1 for m in plan if m.old != m.new)
        print(f"done: {moved} position(s) moved and recorded in offset_changes ({total_re} records to re-read, "
              f"{total_skip} skipped); re-read records count as duplicates")
    else:
        print(f"dry run: nothing changed ({total_re} records would be re-read, {total_skip} skipped); "
              "add --execute to apply")
