"""``ingest config show``: the effective settings, secrets redacted."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

import consumers.cli.args as args_
from consumers import settings
from ingest.config import Config


def register(sub: Any) -> None:
    """Add ``config`` to ``sub``."""
    parser = sub.add_parser("config", help="the settings in effect (from INGEST_* variables and defaults)")
    csub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="every setting with its value and where it came from (environment, "
                                        "_FILE, default); passwords shown as ***")
    show.add_argument("--changed", action="store_true", help="only the settings not at their default")
    args_.add_json(show, "a JSON list of {name, value, source}")
    show.set_defaults(handler=_show)


async def _show(args: argparse.Namespace, config: Config) -> int:
    rows = [r for r in settings.effective() if not args.changed or r["source"] != "default"]
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        note = "" if r["source"] == "default" else f"  ({'from ' + r['name'] + '_FILE' if r['source'] == 'file' else 'set'})"
        print(f"{r['name']:<{width}}  {r['value'] or '(empty)'}{note}")
    return 0
