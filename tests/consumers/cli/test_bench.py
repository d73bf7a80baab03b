"""consumers.cli.bench without services: the options reach the load generator's producer."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

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
