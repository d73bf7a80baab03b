"""Size the dedupe hints: Redis memory per million hinted events, and the hint hit rate per hint lifetime.

Usage: .venv/bin/python scripts/hint_sizing.py [--events 1000000] [--json out.json]

1. Memory: starts a private redis-server (no persistence) on a free port, writes ``--events`` hints through
   ``RedisHints.remember`` (batches of 5,000, as the consumer does after each COMMIT), and reports Redis
   ``used_memory`` growth and ``MEMORY USAGE`` of one key.
2. Hit rate: a re-delivery is caught by the hint only if it arrives within the hint lifetime. For re-delivery
   delays spread over minutes, hours and days (log-normal, medians 2 min, 1 h, 1 day, a spread of x4 for one
   standard deviation), the share caught by each candidate lifetime, from 200,000 sampled delays per spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import subprocess
import time
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from ingest.dedupe import RedisHints
from ingest.metrics import Metrics

LIFETIMES = {"10 min": 600, "1 h": 3600, "6 h": 6 * 3600, "24 h": 86400, "7 d": 7 * 86400}
SPREADS = {"minutes (median 2 min)": 120, "hours (median 1 h)": 3600, "days (median 1 day)": 86400}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def memory(port: int, events: int) -> dict[str, Any]:
    redis = Redis(port=port)
    for _ in range(100):
        try:
            await redis.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    hints = RedisHints(redis, prefix="ingest", stream="webhook", ttl=timedelta(days=1), metrics=Metrics())
    before = int((await redis.info("memory"))["used_memory"])
    started = time.perf_counter()
    for i in range(0, events, 5000):
        await hints.remember([hints.digest(("org-0042", f"evt_{n:012d}")) for n in range(i, min(events, i + 5000))])
    seconds = time.perf_counter() - started
    after = int((await redis.info("memory"))["used_memory"])
    one = await redis.memory_usage(hints.redis_key(("org-0042", "evt_000000000001")))
    keys = await redis.dbsize()
    await redis.aclose()
    return {"events": events, "keys": keys, "used_memory_growth_mib": round((after - before) / 2**20, 1),
            "bytes_per_key": round((after - before) / keys, 1), "memory_usage_one_key": one,
            "remember_keys_per_s": round(events / seconds)}


def hit_rates(samples: int = 200_000, seed: int = 7) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    sigma = math.log(4)
    out: dict[str, dict[str, float]] = {}
    for name, median in SPREADS.items():
        delays = [median * math.exp(rng.gauss(0, sigma)) for _ in range(samples)]
        out[name] = {life: round(100 * sum(d < ttl for d in delays) / samples, 1) for life, ttl in LIFETIMES.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        measured = asyncio.run(memory(port, args.events))
    finally:
        server.kill()
        server.wait()
    result: dict[str, Any] = {"memory": measured, "hit_rate_percent": hit_rates()}
    per_key = result["memory"]["bytes_per_key"]
    result["memory_mib_for_1m_events_per_day"] = {
        life: round(1_000_000 * min(ttl, 86400 * 7) / 86400 * per_key / 2**20, 1) for life, ttl in LIFETIMES.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
