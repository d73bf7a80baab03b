"""`ingest quota` commands: set/unset/get overrides (Postgres), list usage and reset a tenant (Redis)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import orjson

import consumers.cli.args as args_
from consumers import quotas, streams
from ingest.config import Config, maintenance_url
from ingest.quota import Limits, Override
from ingest.services import connect_redis, create_pool


def register(sub: Any) -> None:
    """Add the `quota` commands to ``sub``."""
    quota = sub.add_parser("quota", help="per-tenant quotas (limits in Postgres, usage in Redis)")
    q = quota.add_subparsers(dest="action", required=True, metavar="ACTION")

    set_ = q.add_parser("set", help="override a tenant's limits (0 = unlimited; unset fields keep their value)")
    set_.add_argument("tenant", help="the tenant_id")
    args_.add_stream(set_, help=f"only this stream ({', '.join(streams.STREAMS)}), or {streams.ALL} (the default): "
                               "an override for every stream")
    set_.add_argument("--per-second", type=args_.non_negative_float, metavar="N",
                      help="sustained events per second (0 = unlimited)")
    set_.add_argument("--burst", type=args_.non_negative_int, metavar="N",
                      help="events admitted at once after a quiet period (0 = one second's worth of the rate)")
    set_.add_argument("--per-day", type=args_.non_negative_int, metavar="N",
                      help="events per UTC day (0 = unlimited)")
    set_.set_defaults(handler=_set)

    unset = q.add_parser("unset", help="remove a tenant's override: it gets the defaults again")
    unset.add_argument("tenant", help="the tenant_id")
    args_.add_stream(unset, help=f"the override for this stream only ({', '.join(streams.STREAMS)}), or "
                                f"{streams.ALL} (the default): the override for every stream")
    unset.set_defaults(handler=_unset)

    get = q.add_parser("get", help="a tenant's overrides, effective limits and usage per stream")
    get.add_argument("tenant", help="the tenant_id")
    args_.add_json(get)
    get.set_defaults(handler=_get)

    lst = q.add_parser("list", help="every tenant with usage or an override: usage against limits")
    args_.add_json(lst, "a JSON list of rows")
    lst.set_defaults(handler=_list)

    reset = q.add_parser("reset", help="clear a tenant's usage in Redis (full burst, nothing used today)")
    reset.add_argument("tenant", help="the tenant_id")
    reset.set_defaults(handler=_reset)


def _fmt(value: float) -> str:
    return "unlimited" if value <= 0 else f"{value:g}"


def _limits(lim: Limits) -> str:
    if lim.unlimited:
        return "unlimited"
    rate = "unlimited" if lim.per_second <= 0 else f"{lim.per_second:g}/s burst {lim.effective_burst}"
    return f"rate {rate}, per day {_fmt(lim.per_day)}"


def _override(o: Override) -> str:
    fields = [f"{n}={v:g}" for n, v in (("per_second", o.per_second), ("burst", o.burst), ("per_day", o.per_day))
              if v is not None]
    return f"{o.stream or '(all streams)'}: {', '.join(fields) or '(nothing set)'}"


async def _set(args: argparse.Namespace, config: Config) -> int:
    if args.per_second is None and args.burst is None and args.per_day is None:
        print("ingest: quota set: give at least one of --per-second, --burst, --per-day", file=sys.stderr)
        return 2
    pool = await create_pool(maintenance_url(config), max_size=1)
    try:
        async with pool.acquire() as conn:
            row = await quotas.set_override(conn, args.tenant, stream=_stream(args), per_second=args.per_second,
                                            burst=args.burst, per_day=args.per_day)
    except ValueError as exc:
        print(f"ingest: quota set: {exc}", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    print(f"{row.tenant} {_override(row)}; consumers apply it within "
          f"{config.quota.refresh.total_seconds():g} s")
    return 0


async def _unset(args: argparse.Namespace, config: Config) -> int:
    pool = await create_pool(maintenance_url(config), max_size=1)
    try:
        async with pool.acquire() as conn:
            removed = await quotas.clear_override(conn, args.tenant, stream=_stream(args))
    except ValueError as exc:
        print(f"ingest: quota unset: {exc}", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    print(f"{args.tenant}: " + ("override removed; defaults apply" if removed else "no such override"))
    return 0


def _table(rows: list[quotas.UsageRow]) -> str:
    head = ("stream", "tenant", "per_second", "burst", "per_day", "used_today", "denied_today", "burst_left")
    lines = [head]
    for r in rows:
        lim, use = r.limits, r.usage
        lines.append((r.stream, r.tenant, _fmt(lim.per_second), str(lim.effective_burst or "-"), _fmt(lim.per_day),
                      str(use.used_today), str(use.denied_today),
                      "-" if use.burst_left is None else str(use.burst_left)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _stream(args: argparse.Namespace) -> str | None:
    """``--stream``: None (every stream) for ``all``."""
    return None if args.stream == streams.ALL else str(args.stream)


async def _get(args: argparse.Namespace, config: Config) -> int:
    return await _show(config, args.tenant, as_json=args.json)


async def _list(args: argparse.Namespace, config: Config) -> int:
    return await _show(config, None, as_json=args.json)


def _row_json(r: quotas.UsageRow) -> dict[str, Any]:
    return {"stream": r.stream, "tenant": r.tenant, "limits": dataclasses.asdict(r.limits),
            "effective_burst": r.limits.effective_burst, "usage": dataclasses.asdict(r.usage)}


async def _show(config: Config, tenant: str | None, *, as_json: bool = False) -> int:
    pool = await create_pool(maintenance_url(config), max_size=1)
    try:
        redis = await connect_redis(config.redis_url, cluster=config.redis_cluster)
        try:
            async with pool.acquire() as conn:
                rows = await quotas.usage_rows(redis, conn, config, tenant)
                found = await quotas.overrides(conn, tenant) if tenant is not None else []
        finally:
            await redis.aclose()
    except ValueError as exc:
        print(f"ingest: quota: {exc}", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    if as_json:
        doc: Any = [_row_json(r) for r in rows]
        if tenant is not None:
            doc = {"tenant": tenant, "overrides": [dataclasses.asdict(o) for o in found], "streams": doc}
        print(orjson.dumps(doc).decode())
        return 0
    if tenant is not None:
        print(f"tenant {tenant}")
        print("overrides: " + ("; ".join(_override(o) for o in found) or "none (defaults apply)"))
        for r in rows:
            print(f"  {r.stream}: {_limits(r.limits)}")
    print(_table(rows) if rows else "no tenant has quota usage or an override")
    return 0


async def _reset(args: argparse.Namespace, config: Config) -> int:
    redis = await connect_redis(config.redis_url, cluster=config.redis_cluster)
    try:
        deleted = await quotas.reset(redis, config, args.tenant)
    except ValueError as exc:
        print(f"ingest: quota reset: {exc}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()
    print(f"{args.tenant}: usage cleared ({deleted} key{'s' if deleted != 1 else ''})")
    return 0
