"""Robustness: whatever arrives on the topic, decode+extract and prepare() only ever reject, never crash."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.settings import from_env
from consumers.streams import AUDIT, WEBHOOK, Stream, load_schema
from ingest.codec import DecodeLimits, NulPolicy, decode
from ingest.contract import Contract
from ingest.pipeline import prepare
from ingest.reject import Reason, Rejected
from ingest.rows import SimpleRecord

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
WINDOW = from_env({}).window
CONTRACTS = {s.name: Contract(load_schema(s.schema_file), s.columns, WINDOW) for s in (WEBHOOK, AUDIT)}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

limits_st = st.builds(DecodeLimits, max_bytes=st.sampled_from([64, 1024, 8192, 256 * 1024]),
                      max_depth=st.sampled_from([1, 2, 4, 32, 300]), nul_policy=st.sampled_from(list(NulPolicy)))

text = st.text(st.characters(codec=None), max_size=12)  # includes NUL, controls, astral and lone surrogates
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_ish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                        max_leaves=20)


def near_valid(stream: Stream) -> st.SearchStrategy[dict[str, Any]]:
    """A plausible event with some fields replaced by arbitrary JSON-ish values."""
    base: dict[str, Any] = {
        "tenant_id": "org-1", "idempotency_key": "k-1", "event_type": "push", "source": "github",
        "action": "user.login", "actor_id": "u1", "occurred_at": "2024-06-15T11:00:00.5+01:00",
        "payload": {"a": [1, 2]}, "headers": {"h": "v"}, "ip": "10.0.0.1", "metadata": {}, "resource": "r",
    }
    names = sorted(load_schema(stream.schema_file)["properties"])
    changes = st.dictionaries(st.sampled_from([*names, "extra"]), json_ish, max_size=3)
    drops = st.sets(st.sampled_from(names), max_size=2)
    return st.builds(lambda c, d: {k: v for k, v in {**base, **c}.items() if k not in d}, changes, drops)


def serialize(value: Any, how: str) -> bytes:
    if how == "ascii":
        return json.dumps(value).encode()
    if how == "pretty":
        return json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


deep = st.builds(lambda n, pair, tail: b'{"a":' + pair[0] * n + tail + pair[1] * n + b"}",
                 st.integers(0, 1100), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]),
                 st.sampled_from([b"", b"1", b'{"k":1,"k":2}', b'"\\u0000"']))
payloads = st.one_of(
    st.binary(max_size=300),
    deep,
    st.builds(serialize, json_ish, st.sampled_from(["ascii", "pretty", "compact"])),
    st.builds(serialize, near_valid(WEBHOOK) | near_valid(AUDIT), st.sampled_from(["ascii", "pretty", "compact"])),
)


def decode_and_extract(raw: bytes | None, limits: DecodeLimits, contract: Contract) -> tuple[Any, ...] | None:
    try:
        return contract.extract(decode(raw, limits).obj, NOW)
    except Rejected as rej:
        assert isinstance(rej.reason, Reason)
        return None


@FUZZ
@given(raw=st.binary(max_size=400), limits=limits_st, stream=st.sampled_from(["webhook", "audit"]))
def test_arbitrary_bytes_only_reject(raw: bytes, limits: DecodeLimits, stream: str) -> None:
    decode_and_extract(raw, limits, CONTRACTS[stream])


@FUZZ
@given(raw=payloads, limits=limits_st, stream=st.sampled_from(["webhook", "audit"]))
def test_json_ish_only_reject(raw: bytes, limits: DecodeLimits, stream: str) -> None:
    values = decode_and_extract(raw, limits, CONTRACTS[stream])
    if values is not None:
        assert isinstance(values[0], str) and isinstance(values[1], str)
        assert "\x00" not in values[0] + values[1]


FakeRecord = SimpleRecord


records_st = st.lists(
    st.builds(FakeRecord, topic=st.just("events.x"), partition=st.integers(0, 3), offset=st.integers(0, 10**12),
              key=st.none() | st.binary(max_size=8), value=st.none() | payloads,
              timestamp=st.integers(-1, 2**42)),  # realistic Kafka CreateTime range (see test_prepare xfail)
    max_size=25,
)


@FUZZ
@given(records=records_st, limits=limits_st, stream=st.sampled_from(["webhook", "audit"]),
       now=st.sampled_from([NOW, NOW + timedelta(days=365)]))
def test_prepare_accounts_for_every_record(records: list[FakeRecord], limits: DecodeLimits, stream: str,
                                           now: datetime) -> None:
    out = prepare(stream, records, CONTRACTS[stream], limits, now)
    assert len(out.candidates) + out.in_batch_duplicates + len(out.dead_letters) == len(records)
    expected: dict[int, int] = {}
    for r in records:
        expected[r.partition] = max(expected.get(r.partition, 0), r.offset + 1)
    assert out.advance == expected
    assert all(isinstance(c.row[-3], datetime) and c.row[-3].tzinfo is not None for c in out.candidates)
    assert len({c.key for c in out.candidates}) == len(out.candidates)
    assert out.sanitized <= len(out.candidates)
    reasons = Counter(row[1] for row in out.dead_letters)
    assert set(reasons) <= {r.value for r in Reason}
    for row in out.dead_letters:
        assert all("\x00" not in v for v in row if isinstance(v, str))
