"""consumers.cli.bench and ``ingest bench`` without services: the options reach the load generator's producer;
the figures of a long run are kept whatever happens to its chart."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

import consumers.cli.bench as bench
from consumers.cli import build_parser
from consumers.settings import from_env


class FakeProducer:
    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **options: Any) -> None:
        self.made.append(options)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@pytest.mark.parametrize(("argv", "linger"), [([], 5), (["--linger-ms", "50"], 50)])
def test_rate_mode_producer_lingers_as_asked(monkeypatch: pytest.MonkeyPatch, argv: list[str], linger: int) -> None:
    args = build_parser().parse_args(["bench", "--rate", "1000", "--duration", "0.01", *argv])
    assert args.linger_ms == linger
    monkeypatch.setattr(bench, "AIOKafkaProducer", FakeProducer)
    FakeProducer.made.clear()
    opts = bench.BenchOptions(events=100, rate=1000, duration=0.01, linger_ms=args.linger_ms)
    sent = asyncio.run(bench._produce(from_env({}), "t", opts, progress=False))
    assert sent > 0 and FakeProducer.made[0]["linger_ms"] == linger


def test_negative_linger_is_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--rate", "1000", "--linger-ms", "-1"])


def _figures() -> dict[str, Any]:
    return {"mode": "rate", "samples": [{"t": 10.0, "rss_mib": 50.0, "open_fds": 20, "pg_connections": 3,
                                          "redis_used_mib": 1.0, "redis_keys": 10, "lag": 0, "p99_ms": 5.0,
                                          "events": 100}]}


def test_chart_without_matplotlib_is_refused_before_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from consumers.cli.commands import bench as command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))

    async def never(*_: Any, **__: Any) -> dict[str, Any]:
        raise AssertionError("the run started")

    monkeypatch.setattr(bench, "bench", never)
    args = build_parser().parse_args(["bench", "--rate", "10", "--sample", "1", "--chart", str(tmp_path / "c.png")])
    assert asyncio.run(command._bench(args, from_env({}))) == 2
    assert "matplotlib" in capsys.readouterr().out


def test_figures_are_written_before_the_chart_is_drawn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import consumers.cli.soak as soak
    from consumers.cli.commands import bench as command

    async def run(*_: Any, **__: Any) -> dict[str, Any]:
        return _figures()

    def broken_chart(*_: Any) -> None:
        raise RuntimeError("no display")

    monkeypatch.setattr(bench, "bench", run)
    monkeypatch.setattr(soak, "chart", broken_chart)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    out = tmp_path / "soak.json"
    args = build_parser().parse_args(["bench", "--rate", "10", "--sample", "1", "--chart", str(tmp_path / "c.png"),
                                      "--json-file", str(out)])
    with pytest.raises(RuntimeError):
        asyncio.run(command._bench(args, from_env({})))
    assert orjson.loads(out.read_bytes()) == _figures()
