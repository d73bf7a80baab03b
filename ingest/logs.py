"""Structured logs: one JSON object per line on stderr. Rule: never log secrets or payloads."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

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


def setup(level: str = "INFO") -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "asctime": "ts"}))
    handler.addFilter(Throttle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "asyncio"):  # their DEBUG/INFO lines are per connection attempt or loop start-up
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
