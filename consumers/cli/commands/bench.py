"""``ingest bench``: throughput, latency and memory of the real consumer path."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from consumers import streams
from ingest.config import Config


def register(sub: Any) -> None:
    """Add ``bench`` to ``sub``."""
    p = sub.add_parser("bench", help="benchmark the consumer path on a fresh database and fresh topics")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--dup-rate", type=float, default=0.05)
    p.add_argument("--invalid-rate", type=float, default=0.001)
    p.add_argument("--stream", choices=list(streams.STREAMS), default=streams.WEBHOOK.name)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--rate", type=float, default=0.0, help="events/s for a steady-rate latency run (0 = backlog)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the steady-rate run")
    p.add_argument("--prefill-keys", type=int, default=0,
                   help="keys put in the dedupe ledger before the run (steady state of a deployment that has run "
                        "for its dedupe window, e.g. 10000000)")
    p.add_argument("--sample", type=float, default=0.0, metavar="SECONDS",
                   help="with --rate: record RSS, open fds, Postgres connections, Redis memory and keys, lag and "
                        "p99 every SECONDS (a soak; run it against a Redis of its own)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    p.add_argument("--chart", type=Path, default=None, help="with --sample: draw the samples to this PNG")
    p.set_defaults(handler=_bench)


async def _bench(args: argparse.Namespace, config: Config) -> int:
    # heavy (multiprocessing, producer): only when run
    from consumers.cli.bench import BenchOptions, bench, table

    opts = BenchOptions(events=args.events, tenants=args.tenants, dup_rate=args.dup_rate,
                        invalid_rate=args.invalid_rate, stream=args.stream, partitions=args.partitions,
                        rate=args.rate, duration=args.duration,
                        prefill_keys=args.prefill_keys, sample=args.sample)
    if opts.rate:
        opts.events = int(opts.rate * opts.duration)
    if opts.sample and not opts.rate:
        print("--sample needs --rate (a steady-rate run)")
        return 2
    figures = await bench(config, opts)
    samples = figures.get("samples", [])
    print(table({k: v for k, v in figures.items() if k != "samples"}))
    if args.chart and samples:
        import consumers.cli.soak as soak

        soak.chart([soak.Sample(**s) for s in samples], args.chart,
                   f"ingest bench --rate {args.rate:g} --duration {args.duration:g} --sample {args.sample:g}")
    if args.json:
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0
