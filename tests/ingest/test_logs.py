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


def _formatted(fmt: logging.Formatter, **extra: object) -> str:
    rec = logging.LogRecord("ingest.consumer", logging.INFO, __file__, 1, "batch stored", None, None)
    rec.created = 1769860800.123  # 2026-01-31T12:00:00.123Z
    for k, v in extra.items():
        setattr(rec, k, v)
    return fmt.format(rec)


def test_human_lines_carry_utc_time_level_message_and_fields() -> None:
    from ingest.logs import Human

    line = _formatted(Human(), stream="webhook", rows=5000, reason="two words", partitions=list(range(12)),
                     by={"a": 1})
    assert line.startswith("2026-01-31T12:00:00.123Z INFO  consumer     batch stored  ")
    assert "batch stored" in line
    assert line.endswith("stream=webhook rows=5000 reason='two words' partitions=0-11 by={\"a\":1}")
    assert "\n" not in line


def test_json_lines_carry_iso_utc_timestamps_and_fields() -> None:
    import orjson

    from ingest.logs import Json

    doc = orjson.loads(_formatted(Json(), stream="audit"))
    assert doc["ts"] == "2026-01-31T12:00:00.123Z"
    assert (doc["level"], doc["name"], doc["message"], doc["stream"]) == ("INFO", "ingest.consumer", "batch stored",
                                                                         "audit")


def test_format_follows_the_setting_and_the_terminal() -> None:
    import io

    from ingest.logs import Human, Json, choose

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(choose("auto", Tty()), Human)
    assert isinstance(choose("auto", io.StringIO()), Json)
    assert isinstance(choose("json", Tty()), Json)
    assert isinstance(choose("text", io.StringIO()), Human)


def test_human_lines_shorten_library_tracebacks_and_keep_ours() -> None:
    import sys

    from ingest.logs import Human

    try:
        raise ValueError("Buffer underrun decoding string")
    except ValueError:
        info = sys.exc_info()
    lib = logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "Unexpected exception", None, info)
    ours = logging.LogRecord("ingest.consumer", logging.ERROR, __file__, 1, "batch failed", None, info)
    assert Human().format(lib).endswith("Unexpected exception  error='ValueError: Buffer underrun decoding string'")
    assert "Traceback (most recent call last)" in Human().format(ours)
