"""Draw docs/perf/throughput-latency.png from the ``ingest bench`` JSON files in docs/perf/.

    .venv/bin/pip install -e '.[docs]'   # matplotlib
    .venv/bin/python scripts/perf_chart.py [--dir docs/perf] [--out docs/perf/throughput-latency.png]

Left: steady events/s of each backlog run next to the raw binary COPY ceiling measured in the same run.
Right: Kafka-timestamp-to-commit latency p50/p95/p99 of each rate run (target p99 line at 250 ms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("docs/perf"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or args.dir / "throughput-latency.png"
    runs = []
    for path in sorted(args.dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "mode" in data:
            runs.append((path.stem, data))
    backlog = sorted((r for r in runs if r[1]["mode"] == "backlog"),
                     key=lambda r: (r[1]["events_published"], r[0]))
    rate = sorted((r for r in runs if r[1]["mode"] == "rate"), key=lambda r: r[1]["target_rate"])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(backlog))
    w = 0.38
    steady = [r[1]["steady_events_per_s"] for r in backlog]
    ceiling = [r[1]["copy_ceiling_rows_per_s"] for r in backlog]
    b1 = ax1.bar([i - w / 2 for i in x], steady, w, label="consumer, steady events/s", color="#1f77b4")
    ax1.bar([i + w / 2 for i in x], ceiling, w, label="raw binary COPY ceiling, rows/s", color="#bbbbbb")
    for rect, r in zip(b1, backlog, strict=True):
        ax1.annotate(f"{r[1]['steady_events_per_s'] / 1000:.1f}k\n({r[1]['ratio_to_ceiling']:.0%})",
                     (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([f"{r[1]['events_published'] // 1000}k ev\ninv {r[1].get('rejected', 0) / max(1, r[1]['events_published']):.1%}"
                         + ("\n(contended)" if "contended" in r[0] else "")
                         for r in backlog], fontsize=7)
    ax1.set_ylabel("events/s (rows/s)")
    ax1.set_title("Backlog drain (2 cores shared with Postgres, Redis, broker)")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_ylim(0, max(ceiling + steady) * 1.2)
    ax1.grid(axis="y", alpha=0.3)

    xr = range(len(rate))
    for i, (q, color) in enumerate([("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")]):
        vals = [r[1][f"latency_{q}_ms"] for r in rate]
        bars = ax2.bar([j + (i - 1) * 0.26 for j in xr], vals, 0.26, label=q, color=color)
        for rect, v in zip(bars, vals, strict=True):
            ax2.annotate(f"{v:.0f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax2.axhline(250, color="black", linestyle="--", linewidth=1, label="p99 target 250 ms")
    ax2.set_xticks(list(xr))
    ax2.set_xticklabels([f"target {r[1]['target_rate']:.0f}/s, batch age {r[1].get('batch_max_age_ms', '?')} ms"
                         f"\nachieved {r[1]['steady_events_per_s']}/s"
                         for r in rate], fontsize=8)
    ax2.set_ylabel("Kafka timestamp → commit, ms")
    ax2.set_title("Steady-rate latency")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
