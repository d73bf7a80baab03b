"""Resource samples for long ``ingest bench --rate … --sample S`` runs (a soak), as JSON and as a PNG chart.

Every ``interval`` seconds the sampler records, for the consumer running in this process: its RSS and open file
descriptors, the Postgres connections to the bench database, Redis ``used_memory`` and key count (``DBSIZE``:
run a soak against a Redis of its own), the consumer's lag (high watermark minus stored position, summed over its
partitions), and the p99 of the Kafka-to-commit latency of the events committed in the interval. ``growth``
states how each figure moved over the last part of the run (a least-squares slope, per 10 minutes, and first to
last), which is how a leak shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

FIGURES = ("rss_mib", "open_fds", "pg_connections", "redis_used_mib", "redis_keys", "lag", "p99_ms")


@dataclass(frozen=True, slots=True)
class Sample:
    """One interval: seconds since the start, the resource figures, and the events committed in the interval."""

    t: float
    rss_mib: float
    open_fds: int
    pg_connections: int
    redis_used_mib: float
    redis_keys: int
    lag: int
    p99_ms: float
    events: int


def rss_mib() -> float:
    """Resident set size of this process (``VmRSS``), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def p99(values: Sequence[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Sampler:
    """Samples every ``interval`` seconds until ``stop``; ``take_window`` returns (and clears) the latencies and
    the event count committed since the previous sample; ``lag`` returns the consumer's current lag."""

    def __init__(self, *, interval: float, database_url: str, redis: Redis, lag: Callable[[], int],
                 take_window: Callable[[], tuple[list[float], int]],
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        self.interval, self.database_url, self.redis = interval, database_url, redis
        self.lag, self.take_window, self.on_sample = lag, take_window, on_sample
        self.samples: list[Sample] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop``. A service that does not answer (Postgres or Redis restarting) gives -1 for its
        figures in that sample; the sampler never stops before ``stop``."""
        started = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
                if stop.is_set():
                    break
                latencies, events = self.take_window()
                used, keys = await self._redis_figures()
                sample = Sample(round(time.monotonic() - started, 1), round(rss_mib(), 1), open_fds(),
                                await self._pg_connections(), used, keys, self.lag(),
                                round(p99(latencies) * 1000, 1), events)
                self.samples.append(sample)
                if self.on_sample is not None:
                    self.on_sample(sample)
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

    _conn: asyncpg.Connection | None = None

    async def _pg_connections(self) -> int:
        """Connections to the bench database (the sampler's own included: a constant 1); -1 if Postgres does not
        answer (the connection is made again at the next sample)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.database_url, timeout=5)
            return int(await self._conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()", timeout=5))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if self._conn is not None:
                self._conn.terminate()
            self._conn = None
            return -1

    async def _redis_figures(self) -> tuple[float, int]:
        try:
            memory = await self.redis.info("memory")
            return round(int(memory["used_memory"]) / 2**20, 2), int(await self.redis.dbsize())
        except (OSError, TimeoutError, RedisError):
            return -1.0, -1


def growth(samples: Sequence[Sample], last_seconds: float) -> dict[str, dict[str, float]]:
    """Per figure, over the samples of the last ``last_seconds``: first, last, min, max and the least-squares
    slope per 10 minutes."""
    if not samples:
        return {}
    end = samples[-1].t
    window = [s for s in samples if s.t >= end - last_seconds]
    out: dict[str, dict[str, float]] = {}
    ts = [s.t for s in window]
    mean_t = sum(ts) / len(ts)
    var_t = sum((t - mean_t) ** 2 for t in ts)
    for name in FIGURES:
        values = [float(getattr(s, name)) for s in window]
        # drop NaN (no events in the interval) and -1 (the service did not answer)
        pairs = [(t, v) for t, v in zip(ts, values, strict=True) if v == v and v != -1]
        slope = float("nan")
        if len(pairs) > 1 and var_t > 0:
            mt = sum(t for t, _ in pairs) / len(pairs)
            mv = sum(v for _, v in pairs) / len(pairs)
            den = sum((t - mt) ** 2 for t, _ in pairs)
            slope = sum((t - mt) * (v - mv) for t, v in pairs) / den * 600 if den else float("nan")
        kept = [v for _, v in pairs]
        out[name] = {"first": kept[0] if kept else float("nan"), "last": kept[-1] if kept else float("nan"),
                     "min": min(kept, default=float("nan")), "max": max(kept, default=float("nan")),
                     "slope_per_10min": round(slope, 3)}
    return out


def as_json(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


def chart(samples: Sequence[Sample], path: Path, title: str) -> None:
    """One small panel per figure against minutes (matplotlib: ``pip install -e '.[docs]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(FIGURES), 1, figsize=(8, 1.6 * len(FIGURES)), sharex=True)
    minutes = [s.t / 60 for s in samples]
    for ax, name in zip(axes, FIGURES, strict=True):
        ax.plot(minutes, [getattr(s, name) for s in samples], linewidth=1)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
