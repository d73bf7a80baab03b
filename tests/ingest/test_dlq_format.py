"""ingest.dlq presentation and filters (no services)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from ingest import dlq

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "ago"), [
    ("45s", timedelta(seconds=45)), ("30m", timedelta(minutes=30)), ("1h", timedelta(hours=1)),
    ("2d", timedelta(days=2)), ("1w", timedelta(weeks=1)), (" 12 h ", timedelta(hours=12)),
])
def test_since_durations(text: str, ago: timedelta) -> None:
    assert dlq.parse_since(text, NOW) == NOW - ago


def test_since_iso() -> None:
    assert dlq.parse_since("2026-02-01T10:00:00Z") == datetime(2026, 2, 1, 10, tzinfo=UTC)
    assert dlq.parse_since("2026-02-01") == datetime(2026, 2, 1, tzinfo=UTC), "no offset means UTC"
    assert dlq.parse_since("2026-02-01T10:00:00+02:00") == datetime(2026, 2, 1, 10, tzinfo=timezone(timedelta(hours=2)))


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "-1h", "h", "2026-13-01"])
def test_since_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        dlq.parse_since(text, NOW)


def test_as_text_only_for_harmless_utf8() -> None:
    assert dlq.as_text(b'{"a": "caf\xc3\xa9 \xf0\x9f\x92\xb3"}\n\t') == '{"a": "café 💳"}\n\t'
    assert dlq.as_text(b"\xff") is None
    assert dlq.as_text(b"a\x00b") is None
    assert dlq.as_text(b"\x1b[2Jcleared") is None, "terminal escape sequences are never printed raw"
    assert dlq.as_text("abc\u202edcba".encode()) is None, "bidirectional overrides are never printed raw"
    assert dlq.as_text(b"") == ""


def test_printable_escapes_and_truncates() -> None:
    assert dlq.printable(None) == "-"
    assert dlq.printable("a\x00b\n\x1b\u202e") == "a\\x00b\\x0a\\x1b\\u202e"
    assert dlq.printable("abcdef", 4) == "abc…"
    assert dlq.printable("tenant ünïcode") == "tenant ünïcode"


def test_hexdump() -> None:
    out = dlq.hexdump(b"0123456789abcdef\xff\x00")
    assert out.splitlines() == [
        "00000000  30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66  |0123456789abcdef|",
        "00000010  ff 00" + " " * 42 + "  |..|",
    ]
    assert dlq.hexdump(b"") == ""


def test_filters_bind_every_value() -> None:
    params: list[Any] = ["first"]
    where = dlq.Filters(stream="webhook", reasons=("not_json", "x'; DROP TABLE t; --"), tenant="org-1",
                        since=NOW).where(params)
    assert where == ("TRUE AND stream = $2 AND reason = ANY($3::text[]) AND tenant_id = $4 "
                     "AND created_at >= $5")
    assert params == ["first", "webhook", ["not_json", "x'; DROP TABLE t; --"], "org-1", NOW]
    assert dlq.Filters().where([]) == "TRUE"
