"""Run ``ingest bench`` under tracemalloc: is the consumer's Python heap flat in a steady run?

Usage: .venv/bin/python scripts/soak_tracemalloc.py [--interval 60] [--warm 180] [--frames 1] -- BENCH ARGS...
e.g. ``... -- --rate 1000 --duration 720 --sample 10 --linger-ms 500`` (with the soak's settings, docs/reliability.md).

Every ``--interval`` seconds prints the memory tracemalloc traces (live Python allocations of the consumer process;
the load generator is a child process of its own) next to RSS. From ``--warm`` seconds on it keeps the first and
the latest snapshot, and at the end prints the allocation sites that grew most between them. A leak shows as
traced memory that keeps growing; RSS alone also moves with the allocator's high-water mark. Tracing slows the
consumer (one frame per allocation is the cheapest), so run it at a rate the consumer then still keeps up with.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import tracemalloc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--warm", type=float, default=180.0, help="seconds before the first kept snapshot")
    parser.add_argument("--frames", type=int, default=1, help="frames kept per allocation")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the arguments of `ingest bench`")
    opts = parser.parse_args()
    bench_args = opts.bench[1:] if opts.bench[:1] == ["--"] else opts.bench

    tracemalloc.start(opts.frames)
    from consumers.cli.soak import rss_mib  # after start: the imports are traced too
    started = time.monotonic()
    kept: dict[str, tracemalloc.Snapshot] = {}

    def sample() -> None:
        while True:
            time.sleep(opts.interval)
            t = time.monotonic() - started
            traced, peak = tracemalloc.get_traced_memory()
            print(f"tracemalloc {t:6.0f} s  traced {traced / 2**20:6.2f} MiB (peak {peak / 2**20:6.2f})  "
                  f"rss {rss_mib():6.1f} MiB", file=sys.stderr, flush=True)
            if t >= opts.warm:
                kept.setdefault("warm", tracemalloc.take_snapshot())
                kept["last"] = tracemalloc.take_snapshot()

    threading.Thread(target=sample, daemon=True).start()
    from consumers.cli import main as ingest

    try:
        return ingest(["bench", *bench_args])
    finally:
        if "warm" in kept and "last" in kept:
            leave_out = [tracemalloc.Filter(False, tracemalloc.__file__),
                         tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
            diff = kept["last"].filter_traces(leave_out).compare_to(kept["warm"].filter_traces(leave_out),
                                                                   "traceback")
            print("tracemalloc: largest growths between the first kept snapshot and the last", file=sys.stderr)
            for stat in diff[:opts.top]:
                where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stat.traceback)
                print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8d} blocks  {where}", file=sys.stderr)


if __name__ == "__main__":  # not in the load generator's spawned child, which imports this file again
    sys.exit(main())
