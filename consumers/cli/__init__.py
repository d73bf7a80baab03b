"""``ingest`` command line. Every command reads its settings from the environment (see README).

Commands live in ``consumers.cli.commands.*``; each module's ``register`` adds its sub-parsers and sets ``handler``
to an ``async def handler(args, config) -> int``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from consumers import settings
from consumers.cli.commands import COMMAND_MODULES
from ingest import logs
from ingest.services import ServiceUnavailable

EXIT_UNAVAILABLE = 3

# The standard asyncio loop, not uvloop: under uvloop a write on a connection the server has closed raises
# RuntimeError, which aiokafka (aio-libs/aiokafka#1038) and redis-py do not expect; in aiokafka it kills the
# metadata task, and the consumer then hangs on stop. uvloop bought no measurable throughput (docs/performance.md).


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by tests to check deploy files name real commands)."""
    parser = argparse.ArgumentParser(prog="ingest", description="Kafka -> Postgres event ingestion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    except KeyboardInterrupt:
        return 130

