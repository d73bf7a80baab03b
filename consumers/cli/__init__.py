"""``ingest`` command line. Every command reads its settings from the environment (see README).

Commands live in ``consumers.cli.commands.*``; each module's ``register`` adds its sub-parsers and sets ``handler``
to an ``async def handler(args, config) -> int``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from importlib import metadata

import asyncpg

from consumers import settings
from consumers.cli import pg_errors
from consumers.cli.args import Parser
from consumers.cli.commands import COMMAND_MODULES
from ingest import logs
from ingest.services import ServiceUnavailable

EXIT_UNAVAILABLE = 3

# The standard asyncio loop, not uvloop: under uvloop a write on a connection the server has closed raises
# RuntimeError, which aiokafka (aio-libs/aiokafka#1038) and redis-py do not expect; in aiokafka it kills the
# metadata task, and the consumer then hangs on stop. uvloop bought no measurable throughput (docs/performance.md).


EXIT_CODES = """exit codes:
  0    success (consume --drain: caught up; lag: every partition within --max-lag)
  1    the check failed or part of the work was refused (lag too high, publish refused lines, a replay send failed)
  2    invalid settings or arguments
  3    a service (Kafka, Postgres or Redis) is unreachable; the message says which and what to do
  4    consume: the dead-letter circuit breaker stopped a stream
  5    consume: a stored position lies outside the Kafka log and INGEST_LOG_MISMATCH=stop
  130  interrupted (Ctrl-C)

Settings come from INGEST_* environment variables (`ingest config show`; docs/configuration.md).
First steps: `ingest dev up`, then `ingest demo`. Every command: docs/cli.md."""


def version() -> str:
    try:
        return metadata.version("ingest")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by tests to check deploy files name real commands)."""
    parser = Parser(prog="ingest", description="Kafka -> Postgres event ingestion: validated, deduplicated, "
                    "effectively-once.", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ingest {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = settings.from_env()
    except settings.SettingsError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    try:
        return int(asyncio.run(args.handler(args, config)) or 0)
    except ServiceUnavailable as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except asyncpg.PostgresError as exc:
        print(f"ingest: {pg_errors.one_line(exc, config)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

