"""consumers.cli.soak without services: growth over the last part of a run, and the chart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from consumers.cli.soak import FIGURES, Sample, as_json, chart, growth


def sample(t: float, rss: float, keys: int = 100, p99: float = 50.0) -> Sample:
    return Sample(t, rss, 21, 3, 10.0, keys, 0, p99, 1000)


def test_growth_is_the_slope_per_10_minutes_over_the_last_window() -> None:
    # RSS grows 1 MiB a minute for 10 minutes, then stays flat for 20: the last 20 minutes show no growth.
    samples = [sample(t, 50 + min(t, 600) / 60) for t in range(0, 1801, 10)]
    g = growth(samples, 1200)
    assert g["rss_mib"]["first"] == 60 and g["rss_mib"]["last"] == 60
    assert g["rss_mib"]["slope_per_10min"] == 0
    assert growth(samples, 1800)["rss_mib"]["slope_per_10min"] > 0
    assert set(g) == set(FIGURES)


def test_growth_leaves_out_figures_a_service_did_not_answer_and_empty_intervals() -> None:
    samples = [sample(t, 50, keys=-1 if t == 300 else 100 + t, p99=math.nan if t == 200 else 50)
               for t in range(0, 601, 10)]
    g = growth(samples, 1200)
    assert g["redis_keys"]["min"] == 100 and math.isclose(g["redis_keys"]["slope_per_10min"], 600, rel_tol=1e-6)
    assert g["p99_ms"]["slope_per_10min"] == 0


def test_chart_and_json(tmp_path: Path) -> None:
    samples = [sample(t, 50) for t in range(0, 100, 10)]
    assert as_json(samples)[1]["t"] == 10
    pytest.importorskip("matplotlib")  # the docs extra
    chart(samples, tmp_path / "soak.png", "test")
    assert (tmp_path / "soak.png").stat().st_size > 1000
