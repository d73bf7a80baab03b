"""Logs on stderr: one JSON object per line, or on a terminal one human line per event. Rule: never log secrets or
payloads.

Both forms carry the same fields: an ISO-8601 UTC timestamp (``2026-01-31T12:00:00.123Z``), the level, the logger,
the message and the record's extra fields (``stream=webhook rows=5000``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from pythonjsonlogger.json import JsonFormatter

CHATTY = ("aiokafka",)  # libraries that log every reconnect attempt


class Throttle(logging.Filter):
    """Passes at most one record per (logger, message template) every ``every_s`` seconds for loggers under
    ``prefixes``; the next record that passes carries ``suppressed``, the number dropped meanwhile. aiokafka logs
    each reconnect attempt of each of its tasks: ~150 lines/s while a broker is unreachable."""

    def __init__(self, prefixes: tuple[str, ...] = CHATTY, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        super().__init__()
        self.prefixes, self.every_s, self.clock, self.max_keys = prefixes, every_s, clock, max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (last passed at, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key, now = (record.name, str(record.msg)), self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.suppressed = last[1]
        if len(self._seen) >= self.max_keys and key not in self._seen:
            self._seen.clear()  # bounded: messages built with f-strings would each be a new key
        self._seen[key] = (now, 0)
        return True


FORMATS = ("auto", "json", "text")
"""``INGEST_LOG_FORMAT``: ``auto`` is ``text`` on a terminal and ``json`` otherwise."""

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is shown as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def iso_utc(created: float) -> str:
    """``created`` (a Unix time) as ISO-8601 UTC with milliseconds: ``2026-01-31T12:00:00.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=`` (and ``suppressed`` from ``Throttle``)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class Json(JsonFormatter):
    """One JSON object per line: ``ts`` (ISO-8601 UTC), ``level``, ``name``, ``message``, then the extra fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"levelname": "level", "asctime": "ts"})

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)


class Human(logging.Formatter):
    """One line per event for a person: ``2026-01-31T12:00:00.123Z INFO  consumer   batch stored  stream=webhook
    rows=5000``. Tracebacks of ingest's own errors follow on their own lines; a library's (aiokafka logs its
    connection errors with one) is shortened to ``error='ValueError: ...'``."""

    def format(self, record: logging.LogRecord) -> str:
        level = _SHORT.get(record.levelname, record.levelname)
        name = record.name.removeprefix("ingest.")
        fields = " ".join(f"{k}={_show(v)}" for k, v in extra_fields(record).items())
        line = f"{iso_utc(record.created)} {level:<5} {name:<12} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info and record.exc_info[1] is not None:
            if record.name.startswith("ingest"):
                line += "\n" + self.formatException(record.exc_info)
            else:  # a library's traceback is its own business: one line here, in full in JSON
                exc = record.exc_info[1]
                line += f"  error={_show(f'{type(exc).__name__}: {exc}')}"
        return line


_SHORT = {"WARNING": "WARN", "CRITICAL": "CRIT"}


def _show(value: Any) -> str:
    """A field value for a person: lists and mappings as compact JSON (``[0,1,2]``, ``{"not_json":1}``), runs of
    consecutive integers as ``0-11``, text with spaces quoted."""
    if isinstance(value, (list, tuple)) and len(value) > 2 and all(type(v) is int for v in value) and list(value) == \
            list(range(value[0], value[0] + len(value))):
        return f"{value[0]}-{value[-1]}"
    if isinstance(value, (list, tuple, dict)):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def choose(fmt: str, stream: TextIO) -> logging.Formatter:
    """The formatter for ``INGEST_LOG_FORMAT`` = ``fmt`` writing to ``stream``."""
    if fmt == "text" or (fmt == "auto" and stream.isatty()):
        return Human()
    return Json()


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once per process: ``fmt`` is one of ``FORMATS``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(choose(fmt, sys.stderr))
    handler.addFilter(Throttle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "asyncio"):  # their DEBUG/INFO lines are per connection attempt or loop start-up
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
