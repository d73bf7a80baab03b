"""Chatty library loggers are throttled per message template; ingest's own logs never are."""

from __future__ import annotations

import logging

from ingest.logs import Throttle


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_repeats_within_the_window_are_dropped_and_counted_on_the_next_one() -> None:
    now = [0.0]
    throttle = Throttle(every_s=10.0, clock=lambda: now[0])
    template = "Unable connect to node with id %s: %s"
    assert throttle.filter(record("aiokafka", template, 111, "reset"))
    passed = [throttle.filter(record("aiokafka", template, 111, "reset")) for _ in range(150)]
    assert not any(passed)
    now[0] = 10.0
    nxt = record("aiokafka", template, 111, "reset")
    assert throttle.filter(nxt)
    assert nxt.suppressed == 150  # type: ignore[attr-defined]


def test_templates_and_loggers_are_throttled_separately() -> None:
    throttle = Throttle(clock=lambda: 0.0)
    assert throttle.filter(record("aiokafka", "a %s", 1))
    assert throttle.filter(record("aiokafka", "b %s", 1))
    assert throttle.filter(record("aiokafka.consumer.fetcher", "a %s", 1))
    assert not throttle.filter(record("aiokafka", "a %s", 2))


def test_other_loggers_pass_untouched() -> None:
    throttle = Throttle(clock=lambda: 0.0)
    for _ in range(5):
        r = record("ingest.consumer", "batch fenced")
        assert throttle.filter(r)
        assert not hasattr(r, "suppressed")


def test_memory_is_bounded() -> None:
    throttle = Throttle(clock=lambda: 0.0, max_keys=10)
    for i in range(100):
        assert throttle.filter(record("aiokafka", f"unique {i}"))
    assert len(throttle._seen) <= 10


def test_debug_level_keeps_asyncio_and_aiokafka_start_up_chatter_out() -> None:
    from ingest import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("DEBUG")
        assert not logging.getLogger("asyncio").isEnabledFor(logging.DEBUG)  # "Using selector: EpollSelector"
        assert not logging.getLogger("aiokafka").isEnabledFor(logging.INFO)
        assert logging.getLogger("ingest.consumer").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.getLogger("asyncio").setLevel(logging.NOTSET)
        logging.getLogger("aiokafka").setLevel(logging.NOTSET)
