"""``ingest dev up|down|status``: Postgres, Redis and the broker on this machine for development (docs/development.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import orjson

from consumers import run
from ingest import devservices as dev
from ingest.config import Config
from ingest.redaction import redact
from ingest.services import connect_redis, create_pool, with_database


def register(sub: Any) -> None:
    """Add ``dev`` to ``sub``."""
    parser = sub.add_parser("dev", help="Postgres, Redis and a Kafka-compatible broker on this machine, for development")
    dsub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = dsub.add_parser(
        "up", help="start what does not answer at its loopback address (INGEST_DATABASE_URL, INGEST_REDIS_URL, "
                   "INGEST_KAFKA_BOOTSTRAP), use what does, then create the topics")
    up.add_argument("services", nargs="*", type=_service, metavar="SERVICE",
                    help=f"only these ({', '.join(dev.SERVICES)}; default: all three)")
    up.set_defaults(handler=_up)
    down = dsub.add_parser("down", help="stop what `ingest dev up` started (nothing else); data stays in "
                                        "INGEST_DEV_DIR")
    down.set_defaults(handler=_down)
    status = dsub.add_parser("status", help="each service: its address, whether it answers, and whether "
                                            "`ingest dev up` started it (pid, data, log)")
    status.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    status.set_defaults(handler=_status)


def _service(text: str) -> str:
    if text not in dev.SERVICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(dev.SERVICES)}")
    return text


def addresses(config: Config) -> list[dev.Address]:
    return [dev.address_of("postgres", config.database_url), dev.address_of("redis", config.redis_url),
            dev.address_of("kafka", config.kafka_bootstrap)]


def _database_user(config: Config) -> str:
    from urllib.parse import urlsplit

    return urlsplit(config.database_url).username or ""


async def _up(args: argparse.Namespace, config: Config) -> int:
    directory = Path(config.dev_dir)
    wanted = set(args.services or dev.SERVICES)
    refused = []
    for address in addresses(config):
        if address.service not in wanted:
            continue
        if dev.answering(address):
            print(f"{address.service:<8} {address!s:<21} answers: used as it is")
        elif not dev.is_loopback(address.host):
            print(f"{address.service:<8} {address!s:<21} does not answer, and is not on this machine: not started")
            refused.append(address)
        else:
            try:
                entry = dev.start(address, directory, database_user=_database_user(config))
            except dev.DevServiceError as exc:
                print(f"ingest: dev up: {exc}", file=sys.stderr)
                return 3
            print(f"{address.service:<8} {address!s:<21} started (pid {entry.pid}; data {_short(entry.data)}; "
                  f"log {_short(entry.log)})")
    if refused:
        names = ", ".join(f"{a.service} at {a}" for a in refused)
        print(f"ingest: dev up: {names} not reachable; `ingest dev up` starts services only on loopback addresses: "
              "start them there, or point the settings at this machine (docs/development.md)", file=sys.stderr)
        return 3
    if "postgres" in wanted:
        pool = await create_pool(with_database(config.database_url, "postgres"), max_size=1)
        await pool.close()
    if "redis" in wanted:
        redis = await connect_redis(config.redis_url, cluster=config.redis_cluster)
        await redis.aclose()
    if "kafka" in wanted:
        # One embedded broker: replication factor 1 is all it can hold (production topics: `ingest topics ensure`).
        created = await run.ensure_all_topics(
            dataclasses.replace(config, topic_replication_factor=1, topic_min_insync_replicas=1))
        print(f"topics   created: {', '.join(created) or 'none (all present)'}")
        if config.producer_idempotence:
            print("kafka    the embedded broker has no idempotent producers: export "
                  "INGEST_PRODUCER_IDEMPOTENCE=false before `ingest publish` or `ingest dlq replay`")
    print("ready; `ingest dev status` shows what runs where, `ingest dev down` stops what was started here")
    return 0


def _absolute(path: str) -> Path:
    return Path.cwd() / path


def _short(path: str) -> str:
    """``path`` relative to the working directory when it lies under it (shorter lines)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


async def _down(args: argparse.Namespace, config: Config) -> int:
    directory = Path(config.dev_dir)
    started = dev.load(directory)
    if not started:
        print(f"nothing to stop: `ingest dev up` started nothing recorded in {_short(str(directory))}")
        return 0
    # Consumers of a service stop first: the broker and Redis, then Postgres.
    for name in ("kafka", "redis", "postgres"):
        if name in started:
            entry = started[name]
            print(f"{name:<8} {entry.address:<21} {dev.stop(entry, directory)}")
    print(f"data kept in {_short(str(directory))} (delete it to start afresh)")
    return 0


async def _status(args: argparse.Namespace, config: Config) -> int:
    directory = _absolute(config.dev_dir)
    started = dev.load(directory)
    rows: list[dict[str, Any]] = []
    for address in addresses(config):
        entry = started.get(address.service)
        mine = entry is not None and entry.address == str(address) and dev.running(entry)
        rows.append({
            "service": address.service, "address": str(address), "answering": dev.answering(address),
            "loopback": dev.is_loopback(address.host), "started_by_dev_up": mine,
            "pid": entry.pid if mine and entry else None, "data": entry.data if entry else None,
            "log": entry.log if entry else None,
        })
    if args.json:
        print(orjson.dumps({"dev_dir": str(directory), "services": rows}).decode())
        return 0
    print(f"dev directory: {directory!s}")
    for r in rows:
        if r["started_by_dev_up"]:
            what = f"started by `ingest dev up` (pid {r['pid']}; data {_short(r['data'])}; log {_short(r['log'])})"
        elif r["answering"]:
            what = "answers; not started by `ingest dev up` (used as it is)"
        elif r["loopback"]:
            what = "not answering; `ingest dev up` starts it"
        else:
            what = "not answering; not on this machine, so `ingest dev up` leaves it alone"
        print(f"  {r['service']:<8} {redact(r['address']):<21} {what}")
    return 0
