"""Core commands: migrate, topics, consume, publish, dev, demo, summary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

import consumers.cli.report as report
from consumers import run, settings, streams
from ingest import broker
from ingest import roles as pg_roles
from ingest.codec import decode
from ingest.config import Config
from ingest.publisher import Publisher
from ingest.reject import Rejected
from ingest.services import connect_redis, create_pool, with_database

log = logging.getLogger("ingest.cli")
EXIT_CIRCUIT_OPEN = 4
EXIT_LOG_MISMATCH = 5


def register(sub: Any) -> None:
    """Add the core commands to ``sub`` (the ``ingest`` sub-parsers)."""

    migrate = sub.add_parser(
        "migrate", help="create the database, apply migrations, create partitions ahead (as the owner: "
                        "INGEST_MAINTENANCE_DATABASE_URL)")
    migrate.add_argument("--roles", nargs="?", const="ingest", default=None, metavar="PREFIX",
                         help="also create or converge the roles PREFIX_owner, PREFIX_writer, PREFIX_reader "
                              "(default prefix: ingest), hand every object to the owner and grant the writer "
                              "and reader their privileges; creating roles needs a superuser (docs/security.md)")
    for kind in ("owner", "writer", "reader"):
        migrate.add_argument(f"--{kind}-password-file", metavar="FILE", default=None,
                             help=f"with --roles: set the {kind} role's password from FILE (sent as a "
                                  "SCRAM-SHA-256 verifier; without it the password is left unchanged)")
    migrate.set_defaults(handler=_migrate)

    topics = sub.add_parser("topics", help="Kafka topics")
    topics_sub = topics.add_subparsers(dest="action", required=True)
    ensure = topics_sub.add_parser(
        "ensure", help=f"create {' and '.join(s.topic for s in streams.STREAMS.values())} when missing")
    ensure.add_argument("--partitions", type=int, default=None,
                        help=f"default: INGEST_TOPIC_PARTITIONS ({settings.default('INGEST_TOPIC_PARTITIONS')})")
    ensure.set_defaults(handler=_topics_ensure)

    consume = sub.add_parser("consume", help="run consumers until SIGTERM/SIGINT")
    consume.add_argument("--stream", choices=streams.CHOICES, default=streams.ALL)
    consume.add_argument("--drain", action="store_true", help="exit 0 once every assigned partition is caught up")
    consume.set_defaults(handler=_consume)

    publish = sub.add_parser("publish", help="validate JSON Lines and publish them keyed by tenant_id")
    publish.add_argument("--stream", choices=list(streams.STREAMS), required=True)
    publish.add_argument("file", help="a JSON Lines file, or - for standard input")
    publish.set_defaults(handler=_publish)

    dev = sub.add_parser("dev", help="embedded development services")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    dev_sub.add_parser("up", help="start the embedded broker on INGEST_KAFKA_BOOTSTRAP, check Postgres and Redis, "
                                  "create topics").set_defaults(handler=_dev_up)
    dev_sub.add_parser("down", help="stop the embedded broker started by `ingest dev up`").set_defaults(
        handler=_dev_down)

    demo = sub.add_parser("demo", help="publish a realistic sample, drain it, and print what landed where")
    demo.add_argument("--events", type=int, default=2000, help="events per stream (default 2000)")
    demo.add_argument("--tenants", type=int, default=8)
    demo.set_defaults(handler=_demo)

    sub.add_parser("summary", help="print rows per table, duplicates and dead letters by reason").set_defaults(
        handler=_summary)


async def _migrate(args: argparse.Namespace, config: Config) -> int:
    files = {k: getattr(args, f"{k}_password_file") for k in ("owner", "writer", "reader")}
    if args.roles is None:
        if any(files.values()):
            print("ingest: migrate: the password files need --roles", file=sys.stderr)
            return 2
        applied = await run.run_migrations(config)
        print(f"migrations applied: {applied or 'none (up to date)'}; partitions ensured")
        return 0
    try:
        roles = pg_roles.Roles.from_prefix(args.roles)
        passwords = {k: pg_roles.read_password_file(path) for k, path in files.items() if path}
    except pg_roles.RoleError as exc:
        print(f"ingest: migrate: {exc}", file=sys.stderr)
        return 2
    changes = pg_roles.RoleChanges()
    try:
        applied = await run.run_migrations(config, roles, passwords, changes)
    except pg_roles.RoleError as exc:
        print(f"ingest: migrate: {exc}", file=sys.stderr)
        return 2
    except asyncpg.InsufficientPrivilegeError as exc:
        print(f"ingest: migrate --roles: {exc} (creating roles, BYPASSRLS and handing objects over need a "
              "superuser; see docs/security.md)", file=sys.stderr)
        return 1
    print(f"migrations applied: {applied or 'none (up to date)'}; partitions ensured")
    print(f"roles: owner {roles.owner}, writer {roles.writer}, reader {roles.reader}; "
          f"created: {', '.join(changes.created) or 'none'}; altered: {', '.join(changes.altered) or 'none'}; "
          f"passwords set: {', '.join(changes.passwords) or 'none'}; "
          f"objects handed to the owner: {len(changes.handed_over)}; privileges granted")
    return 0


async def _topics_ensure(args: argparse.Namespace, config: Config) -> int:
    if args.partitions:
        config = _replace(config, topic_partitions=args.partitions)
    created = await run.ensure_all_topics(config)
    print(f"topics created: {created or 'none (all present)'}")
    return 0


async def _consume(args: argparse.Namespace, config: Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(run.consume(config, streams.select(args.stream), stop, drain=args.drain))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        log.info("stopping: finishing the in-flight batch", extra={"deadline_s": config.shutdown_timeout_s})
        try:
            await asyncio.wait_for(asyncio.shield(task), config.shutdown_timeout_s)
        except TimeoutError:
            log.warning("shutdown deadline passed; abandoning the in-flight batch (it will be re-read)")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return 1
    stopper.cancel()
    totals = task.result()
    print(orjson.dumps({name: vars_of(t) for name, t in totals.items()}).decode())
    stopped = {t.stop_kind: t.stopped_by for t in totals.values() if t.stop_kind}
    for kind, why in stopped.items():
        print(f"ingest: {'circuit breaker' if kind == 'circuit_open' else 'log mismatch'}: {why}", file=sys.stderr)
    if "log_mismatch" in stopped:
        return EXIT_LOG_MISMATCH
    return EXIT_CIRCUIT_OPEN if stopped else 0


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


async def _publish(args: argparse.Namespace, config: Config) -> int:
    stream = streams.STREAMS[args.stream]
    contract = stream.contract(config)
    # A CLI reading its input file: blocking reads between awaits are fine here.
    source = sys.stdin.buffer if args.file == "-" else Path(args.file).open("rb")  # noqa: SIM115, ASYNC230
    refused: list[tuple[int, str]] = []
    sent = 0
    from tqdm import tqdm  # only the publish command draws a progress bar: keeps `consume` start-up lean

    with source, tqdm(desc=f"publish {stream.topic_for(config)}", unit="ev", file=sys.stderr) as bar:
        async with Publisher(config, topic=stream.topic_for(config), contract=contract) as pub:
            for lineno, line in enumerate(source, 1):
                value = line.rstrip(b"\r\n")
                if not value.strip():
                    continue
                try:
                    key = contract.extract(decode(value, config.decode).obj, datetime.now(UTC))[0].encode()
                except Rejected as rej:
                    refused.append((lineno, f"{rej.reason}: {rej.detail}"))
                    continue
                await pub.send_raw(key, value)
                sent += 1
                bar.update()
    for lineno, why in refused[:100]:
        print(f"line {lineno}: refused: {why}", file=sys.stderr)
    if len(refused) > 100:
        print(f"... and {len(refused) - 100} more refused lines", file=sys.stderr)
    print(f"published {sent} events to {stream.topic_for(config)}; refused {len(refused)} lines")
    return 1 if refused else 0


def _pidfile(config: Config) -> Path:
    return Path("/tmp") / f"ingest-broker-{config.kafka_bootstrap.replace(':', '-').replace(',', '_')}.pid"


async def _dev_up(args: argparse.Namespace, config: Config) -> int:
    host, _, port = config.kafka_bootstrap.split(",")[0].rpartition(":")
    if broker.listening(host, int(port)):
        print(f"kafka: something already listens on {host}:{port}; using it")
    else:
        proc = broker.start_embedded(host, int(port), log_path="/tmp/ingest-broker.log")
        _pidfile(config).write_text(str(proc.pid))
        print(f"kafka: started the embedded broker (pid {proc.pid}) on {host}:{port} (in-memory; log "
              "/tmp/ingest-broker.log)")
    pool = await create_pool(with_database(config.database_url, "postgres"), max_size=1)
    await pool.close()
    print("postgres: reachable")
    redis = await connect_redis(config.redis_url, cluster=config.redis_cluster)
    await redis.aclose()
    print("redis: reachable")
    created = await run.ensure_all_topics(config)
    print(f"topics created: {created or 'none (all present)'}")
    return 0


async def _dev_down(args: argparse.Namespace, config: Config) -> int:
    pidfile = _pidfile(config)
    if not pidfile.exists():
        print("no embedded broker started by `ingest dev up`")
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    pidfile.unlink()
    print("embedded broker stopped")
    return 0


async def _demo(args: argparse.Namespace, config: Config) -> int:
    return await report.demo(config, events=args.events, n_tenants=args.tenants)


async def _summary(args: argparse.Namespace, config: Config) -> int:
    pool = await create_pool(config.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            print(await report.summary(conn, config))
    except asyncpg.UndefinedTableError:
        print("ingest: schema missing: run `ingest migrate` first", file=sys.stderr)
        return 1
    finally:
        await pool.close()
    return 0


def _replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)
