"""CPU of the validation stage (``ingest.pipeline.prepare``) per record at two hostile-record rates.

The same 40,000 bench events (``consumers.cli.bench._values``) at ``--invalid-rate`` A and B, prepared in 5,000-record
batches, alternating A and B ``--rounds`` times in one process; prints the minimum CPU time per record of each.
No services needed.

    .venv/bin/python scripts/perf_prepare_ab.py [--a 0.001] [--b 0.05] [--rounds 12]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from consumers import settings, streams
from consumers.cli.bench import BenchOptions, _values
from ingest.pipeline import prepare
from ingest.rows import SimpleRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=float, default=0.001)
    parser.add_argument("--b", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--events", type=int, default=40_000)
    args = parser.parse_args()
    config = settings.from_env({})
    contract = streams.WEBHOOK.contract(config)
    now_ms = int(time.time() * 1000)
    sets = {rate: [SimpleRecord("t", i % 12, i, k, v, now_ms) for i, (k, v) in
                   enumerate(_values(BenchOptions(events=args.events, invalid_rate=rate)))]
            for rate in (args.a, args.b)}
    best = dict.fromkeys(sets, float("inf"))
    for _ in range(args.rounds):
        for rate, records in sets.items():
            started = time.process_time()
            for i in range(0, len(records), 5000):
                prepare("webhook", records[i:i + 5000], contract, config.decode, datetime.now(UTC))
            best[rate] = min(best[rate], time.process_time() - started)
    for rate, seconds in best.items():
        print(f"invalid rate {rate}: prepare {seconds / args.events * 1e6:.2f} us CPU per record")


if __name__ == "__main__":
    main()
