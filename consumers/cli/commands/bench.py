"""``ingest bench``: throughput, latency and memory of the real consumer path."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import orjson

import consumers.cli.args as args_
from consumers import streams
from ingest.config import Config


def register(sub: Any) -> None:
    """Add ``bench`` to ``sub``."""
    p = sub.add_parser("bench", help="benchmark the consumer path on a fresh database and fresh topics")
    p.add_argument("--events", type=args_.positive_int, default=1_000_000, metavar="N",
                   help="events to publish, then consume as a backlog (default 1000000; with --rate: rate x duration)")
    p.add_argument("--tenants", type=args_.positive_int, default=1000, metavar="N",
                   help="tenants the events spread over (default 1000)")
    p.add_argument("--dup-rate", type=args_.fraction, default=0.05, metavar="R",
                   help="share of events that repeat an idempotency key (default 0.05)")
    p.add_argument("--invalid-rate", type=args_.fraction, default=0.001, metavar="R",
                   help="share of events that fail validation, i.e. dead letters (default 0.001)")
    args_.add_stream(p, one=True, default=streams.WEBHOOK.name,
                     help=f"the stream to measure ({', '.join(streams.STREAMS)}; default {streams.WEBHOOK.name})")
    p.add_argument("--partitions", type=args_.positive_int, default=12, metavar="N",
                   help="partitions of the benchmark's own topic (default 12)")
    p.add_argument("--rate", type=args_.non_negative_float, default=0.0, metavar="EVENTS_PER_S",
                   help="events/s for a steady-rate latency run (0 = backlog)")
    p.add_argument("--duration", type=args_.positive_float, default=60.0, metavar="SECONDS",
                   help="seconds of the steady-rate run (default 60)")
    p.add_argument("--linger-ms", type=args_.non_negative_int, default=5, metavar="MS",
                   help="with --rate: the producer's linger (default 5); a longer one sends fewer, larger record "
                        "batches, for a broker whose cost is per batch")
    p.add_argument("--prefill-keys", type=args_.non_negative_int, default=0, metavar="N",
                   help="keys put in the dedupe ledger before the run (steady state of a deployment that has run "
                        "for its dedupe window, e.g. 10000000)")
    p.add_argument("--sample", type=float, default=0.0, metavar="SECONDS",
                   help="with --rate: record RSS, open fds, Postgres connections, Redis memory and keys, lag and "
                        "p99 every SECONDS (a soak; run it against a Redis of its own)")
    p.add_argument("--chart", type=Path, default=None, metavar="PNG", help="with --sample: draw the samples to PNG")
    p.add_argument("--json-file", type=Path, default=None, metavar="FILE",
                   help="also write the figures as JSON to FILE")
    args_.add_json(p, "the figures as one JSON document (instead of the table)")
    p.set_defaults(handler=_bench)


async def _bench(args: argparse.Namespace, config: Config) -> int:
    # heavy (multiprocessing, producer): only when run
    from consumers.cli.bench import BenchOptions, bench, table

    opts = BenchOptions(events=args.events, tenants=args.tenants, dup_rate=args.dup_rate,
                        invalid_rate=args.invalid_rate, stream=args.stream, partitions=args.partitions,
                        rate=args.rate, duration=args.duration, linger_ms=args.linger_ms,
                        prefill_keys=args.prefill_keys, sample=args.sample)
    if opts.rate:
        opts.events = int(opts.rate * opts.duration)
    if opts.sample and not opts.rate:
        print("--sample needs --rate (a steady-rate run)")
        return 2
    if args.chart and importlib.util.find_spec("matplotlib") is None:  # known now, not after a 30-minute run
        print("--chart needs matplotlib: pip install -e '.[docs]'")
        return 2
    figures = await bench(config, opts)
    samples = figures.get("samples", [])
    print(orjson.dumps(figures).decode() if args.json
          else table({k: v for k, v in figures.items() if k != "samples"}))
    if args.json_file:  # before the chart: the figures are kept whatever happens to the drawing
        args.json_file.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    if args.chart and samples:
        import consumers.cli.soak as soak

        soak.chart([soak.Sample(**s) for s in samples], args.chart,
                   f"ingest bench --rate {args.rate:g} --duration {args.duration:g} --sample {args.sample:g}"
                   + (f" --linger-ms {args.linger_ms}" if args.linger_ms != 5 else ""))
    return 0
