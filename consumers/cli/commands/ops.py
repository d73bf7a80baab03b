"""Operator commands: ``partitions`` (list, ensure, prune), ``lag`` and ``status``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

import consumers.cli.args as args_
import consumers.cli.status as status
from consumers import run, streams
from ingest import partitions
from ingest.config import Config, maintenance_url
from ingest.maintenance import Maintenance, MaintenanceReport
from ingest.redaction import redact
from ingest.services import ServiceUnavailable, create_pool
from ingest.sql import ident

DEFAULT_MAX_LAG = 1000  # the IngestLagGrowing alert threshold
EXACT_COUNT_BELOW = 10_000  # row estimates under this are replaced by an exact count
EXACT_COUNT_MAX_BYTES = 64 * 1024 * 1024  # ...and never-analyzed partitions up to this size are counted
LOCK_WAIT_S = 10.0  # CLI rounds wait this long for a running maintenance round to finish


def register(sub: Any) -> None:
    """Add ``partitions``, ``lag`` and ``status`` to ``sub``."""
    parts = sub.add_parser("partitions", help="event-table partitions: list (default), ensure, prune")
    parts.set_defaults(handler=_partitions_list, stream=streams.ALL, json=False)
    parts_sub = parts.add_subparsers(dest="action", metavar="ACTION")
    lst = parts_sub.add_parser("list", help="each partition: range, rows (estimate or exact), size; coverage")
    args_.add_stream(lst)
    lst.add_argument("--json", action="store_true", help="print one JSON document")
    lst.set_defaults(handler=_partitions_list)
    ens = parts_sub.add_parser("ensure", help="create partitions from now - retention to now + premake")
    args_.add_stream(ens)
    ens.set_defaults(handler=_partitions_ensure)
    prune = parts_sub.add_parser("prune", help="detach partitions past retention, then drop (or archive)")
    args_.add_stream(prune)
    prune.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    prune.add_argument("--archive", action="store_true", help="move detached partitions to schema `archive`")
    prune.add_argument("--export-dir", metavar="DIR", default=None,
                       help="first write each partition as DIR/<table>_pYYYYMMDD.csv.gz (CSV with header)")
    prune.set_defaults(handler=_partitions_prune)

    lag = sub.add_parser("lag", help="per-partition lag: end offset minus the offset stored in Postgres")
    args_.add_stream(lag)
    lag.add_argument("--max-lag", type=args_.non_negative_int, metavar="N", default=DEFAULT_MAX_LAG,
                     help=f"exit 1 when any partition lags more than this (default {DEFAULT_MAX_LAG}) or its "
                          "stored position lies outside the log")
    lag.add_argument("--json", action="store_true", help="print one JSON document")
    lag.set_defaults(handler=_lag)

    st = sub.add_parser("status", help="live view: group, lag, rates, tenants, dead letters, partitions, health")
    args_.add_stream(st)
    st.add_argument("--once", action="store_true", help="print one snapshot and exit")
    st.add_argument("--json", action="store_true", help="print one JSON document and exit (implies --once)")
    st.add_argument("--interval", type=args_.positive_float, default=2.0, metavar="SECONDS", help="refresh period in seconds (default 2)")
    st.set_defaults(handler=_status)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()


# -- partitions -----------------------------------------------------------------------------------------------

async def _pool(config: Config) -> asyncpg.Pool:
    """Partition commands run as the owner (``maintenance_url``): they read and change every partition."""
    return await create_pool(maintenance_url(config), max_size=1)


async def _with_schema(config: Config, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass($1)", ident(streams.shared_tables().offsets)) is None:
            raise ServiceUnavailable("postgres", redact(maintenance_url(config)),
                                     "schema missing: run `ingest migrate` first")


async def partition_rows(conn: Any, table: str) -> list[dict[str, Any]]:
    """Attached partitions (with ranges), the DEFAULT partition and archived ones, with row counts and sizes."""
    rows = await conn.fetch(
        """SELECT n.nspname || '.' || c.relname, c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples,
                  pg_total_relation_size(c.oid), pg_relation_size(c.oid), false
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE i.inhparent = $1::regclass
           UNION ALL
           SELECT n.nspname || '.' || c.relname, c.relname, NULL, c.reltuples, pg_total_relation_size(c.oid),
                  pg_relation_size(c.oid), true
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'archive' AND c.relkind = 'r' AND starts_with(c.relname, $2)""",
        ident(table), table + "_p")
    by_start = {p.name: p for p in await partitions.existing(conn, table)}
    out = []
    for qualified, name, bound, reltuples, total, heap, archived in rows:
        part = by_start.get(qualified)
        estimate = int(reltuples)
        exact = (0 <= estimate < EXACT_COUNT_BELOW) or (estimate < 0 and heap <= EXACT_COUNT_MAX_BYTES)
        count: int | None = estimate if estimate >= 0 else None
        if exact:
            count = int(await conn.fetchval(f"SELECT count(*) FROM {ident(qualified)}"))
        out.append({"name": qualified if archived else name, "from": part.start.isoformat() if part else None,
                    "to": part.end.isoformat() if part else None, "default": bound == "DEFAULT",
                    "archived": bool(archived), "rows": count, "rows_exact": exact, "bytes": int(total)})
    out.sort(key=lambda r: (r["archived"], r["default"], r["from"] or "", r["name"]))
    return out


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _when(iso: str | None) -> str:
    return "" if iso is None else datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")


async def _partitions_list(args: argparse.Namespace, config: Config) -> int:
    selected = streams.select(args.stream)
    pols = streams.policies(config, selected)
    conn = await status.connect_postgres(maintenance_url(config))
    now = datetime.now(UTC)
    try:
        doc: dict[str, Any] = {}
        for s, pol in zip(selected, pols, strict=True):
            try:
                doc[s.name] = {"table": s.table, "partitions": await partition_rows(conn, s.table),
                               "coverage": await status.coverage(conn, s.table, pol, now)}
            except asyncpg.UndefinedTableError:
                raise ServiceUnavailable("postgres", redact(maintenance_url(config)),
                                         "schema missing: run `ingest migrate` first") from None
    finally:
        await conn.close()
    if args.json:
        print(_dumps(doc))
        return 0
    for entry in doc.values():
        cov = entry["coverage"]
        print(f"{entry['table']}: {cov['partitions']} partitions ({cov['granularity']}, retention "
              f"{cov['retention_days']:g}d, premake {cov['premake_days']:g}d), covered until "
              f"{_when(cov['last_end']) or 'n/a'}, missing ranges {len(cov['missing'])}, "
              f"DEFAULT rows {cov['default_rows']}")
        print(f"  {'partition':<36} {'from':<18} {'to':<18} {'rows':>12} {'size':>11}")
        for r in entry["partitions"]:
            span = ("DEFAULT", "") if r["default"] else ("archived", "") if r["archived"] else (
                _when(r["from"]), _when(r["to"]))
            rows = "?" if r["rows"] is None else (str(r["rows"]) if r["rows_exact"] else f"~{r['rows']}")
            print(f"  {r['name']:<36} {span[0]:<18} {span[1]:<18} {rows:>12} {_size(r['bytes']):>11}")
    return 0


def _maintenance(config: Config, pool: asyncpg.Pool, selected: list[streams.Stream], *, archive: bool = False,
                 export_dir: str | None = None) -> Maintenance:
    return Maintenance(pool, streams.policies(config, selected), lock_timeout_ms=config.partitions.lock_timeout_ms,
                       archive=archive, export_dir=export_dir, ledger=run.ledger_policy(config))


def _problems(report: MaintenanceReport) -> int:
    if report.skipped:
        print("ingest: another process is running partition maintenance; try again", file=sys.stderr)
    if report.lock_timeouts:
        print(f"ingest: {report.lock_timeouts} step(s) gave up on lock_timeout; run again (or let the consumers' "
              "maintenance retry)", file=sys.stderr)
    for err in report.errors:
        print(f"ingest: {err}", file=sys.stderr)
    return 1 if report.skipped or report.lock_timeouts or report.errors else 0


async def _partitions_ensure(args: argparse.Namespace, config: Config) -> int:
    pool = await _pool(config)
    try:
        await _with_schema(config, pool)
        report = await _maintenance(config, pool, streams.select(args.stream)).run_once(
            create=True, prune=False, wait_lock=LOCK_WAIT_S)
    finally:
        await pool.close()
    print(f"partitions created: {', '.join(report.created) or 'none (all present)'}")
    for name, n in report.moved_from_default.items():
        print(f"  {name}: moved {n} rows out of the DEFAULT partition")
    for table, n in report.default_rows.items():
        if n:
            print(f"  {table}: {n} rows remain in the DEFAULT partition (outside every partition's range)")
    return _problems(report)


async def _partitions_prune(args: argparse.Namespace, config: Config) -> int:
    selected = streams.select(args.stream)
    pool = await _pool(config)
    try:
        await _with_schema(config, pool)
        m = _maintenance(config, pool, selected, archive=args.archive, export_dir=args.export_dir)
        plan = await m.run_once(create=False, prune=True, dry_run=True)
        sizes: dict[str, dict[str, Any]] = {}
        async with pool.acquire() as conn:
            for s in selected:
                sizes.update({r["name"]: r for r in await partition_rows(conn, s.table)})
        verb = "archive (move to schema archive)" if args.archive else "drop"
        print(f"past retention, would {verb}: {len(plan.detached)} partition(s)")
        for name in plan.detached:
            info = sizes.get(name, {})
            rows = info.get("rows")
            print(f"  {name:<36} {_when(info.get('from')):<18} {_when(info.get('to')):<18} "
                  f"{'?' if rows is None else rows:>12} rows {_size(info.get('bytes', 0)):>11}")
        for path in plan.exported:
            print(f"  export first: {path}")
        ledger_parts = [n for n in plan.dropped if n not in plan.detached]
        print(f"dedupe-ledger epochs past the window, would drop: {', '.join(ledger_parts) or 'none'}"
              f" (~{plan.ledger_pruned} keys)")
        if args.dry_run or not (plan.detached or ledger_parts):
            return 0
        report = await m.run_once(create=False, prune=True, wait_lock=LOCK_WAIT_S)
    finally:
        await pool.close()
    done = report.archived if args.archive else report.dropped
    print(f"{'archived' if args.archive else 'dropped'}: {', '.join(done) or 'none'}")
    for path in report.exported:
        print(f"exported: {path}")
    print(f"dedupe-ledger keys dropped with their epochs: ~{report.ledger_pruned}")
    return _problems(report)


# -- lag ------------------------------------------------------------------------------------------------------

async def _lag(args: argparse.Namespace, config: Config) -> int:
    report = await status.lag_report(config, streams.select(args.stream))
    worst = max((r["lag"] or 0 for s in report.values() for r in s["partitions"]), default=0)
    outside = sum(1 for s in report.values() for r in s["partitions"] if r["mismatch"])
    ok = worst <= args.max_lag and not outside
    if args.json:
        print(_dumps({"max_lag": args.max_lag, "ok": ok, "streams": report}))
        return 0 if ok else 1
    for name, s in report.items():
        note = "" if s["topic_exists"] else "  (topic missing: run `ingest topics ensure`)"
        print(f"{name}: topic {s['topic']}  group {s['group']}  total lag {s['total_lag']}{note}")
        print(f"  {'partition':>9} {'stored':>12} {'end':>12} {'lag':>10}")
        for r in s["partitions"]:
            stored = "-" if r["stored_offset"] is None else r["stored_offset"]
            end = "-" if r["end_offset"] is None else r["end_offset"]
            flag = "  > max" if (r["lag"] or 0) > args.max_lag else ""
            if r["mismatch"]:
                flag += f"  position outside the log ({r['mismatch']}): see `ingest offsets show`"
            print(f"  {r['partition']:>9} {stored:>12} {end:>12} {_n(r['lag']):>10}{flag}")
    verdict = "ok" if ok else "POSITIONS OUTSIDE THE LOG" if outside else "LAGGING"
    print(f"{verdict}: worst partition lag {worst} (max {args.max_lag})"
          + (f"; {outside} partition(s) with a stored position outside the log" if outside else ""))
    return 0 if ok else 1


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


# -- status ---------------------------------------------------------------------------------------------------

async def _status(args: argparse.Namespace, config: Config) -> int:
    selected = streams.select(args.stream)
    if args.json or args.once:
        doc = await status.snapshot(config, selected)
        print(_dumps(doc) if args.json else status.render(doc))
        return 0 if status.healthy(doc) else 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tty = sys.stdout.isatty()
    while not stop.is_set():
        doc = await status.snapshot(config, selected)
        text = status.render(doc) + f"\n\nrefresh every {args.interval:g}s; Ctrl-C to quit"
        # Plain ANSI: cursor home + clear screen, then the frame (no dependency for a redraw).
        sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + text + "\n")
        sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.2, args.interval))
    return 0
