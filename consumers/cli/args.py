"""What every ``ingest`` command's options share: the parser class (one-line errors), value checks, ``--stream``
and ``--json``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from consumers import streams


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the command, the option and the reason, then where
    to read more (argparse's default prints the whole usage first). Exit code 2, as argparse's."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _number(parse: Callable[[str], float], test: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
        if not test(value) or value != value:  # NaN is never accepted
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value
    check.__name__ = rule  # argparse names the type in some messages
    return check


positive_int: Callable[[str], int] = _number(int, lambda v: v > 0, "an integer > 0")  # type: ignore[assignment]
non_negative_int: Callable[[str], int] = _number(int, lambda v: v >= 0, "an integer >= 0")  # type: ignore[assignment]
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1")


def add_stream(parser: argparse.ArgumentParser, *, one: bool = False, required: bool = False,
               default: str | None = None, help: str | None = None) -> None:
    """``--stream``: for a filter, any of ``streams.CHOICES`` (``all``, the default, is every stream); with ``one``,
    a command that works on a single stream (publish, bench, offsets reset) takes one of ``streams.STREAMS``."""
    names = ", ".join(streams.STREAMS)
    if one:
        parser.add_argument("--stream", choices=list(streams.STREAMS), required=required, default=default,
                            metavar="STREAM", help=help or f"the stream: {names}")
    else:
        parser.add_argument("--stream", choices=streams.CHOICES, default=default or streams.ALL, metavar="STREAM",
                            help=help or f"{names} or {streams.ALL} (default: {default or streams.ALL})")


def add_json(parser: argparse.ArgumentParser, what: str = "one JSON document") -> None:
    """``--json``: print ``what`` to stdout instead of text (read-only commands, and plans of the others)."""
    parser.add_argument("--json", action="store_true", help=f"print {what} to stdout instead of text")
