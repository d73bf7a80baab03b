"""ingest.compiled: the C-speed decoder may only accept what ``decode`` + ``Contract.extract`` accept, with the
same values; it must accept the common case (compact orjson from the publisher)."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.cli.bench import BenchOptions, _values
from consumers.settings import from_env
from consumers.streams import AUDIT, WEBHOOK, load_schema
from ingest.codec import DecodeLimits, NulPolicy, decode
from ingest.compiled import _STRICT_TIME, _joinable
from ingest.contract import Contract, _ecma_anchors
from ingest.reject import Rejected
from tests.ingest.test_fuzz import limits_st, payloads
from tests.ingest.test_schema_agreement import documents

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
DEFAULTS = from_env({})
CONTRACTS = {s.name: Contract(load_schema(s.schema_file), s.columns, DEFAULTS.window) for s in (WEBHOOK, AUDIT)}
PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact(raw: bytes | None, limits: DecodeLimits, contract: Contract) -> tuple[Any, ...] | None:
    try:
        return contract.extract(decode(raw, limits).obj, NOW)
    except Rejected:
        return None


def check_batch(raws: list[bytes | None], limits: DecodeLimits, stream: str) -> list[tuple[Any, ...] | None]:
    contract = CONTRACTS[stream]
    got = contract.compiled(limits).extract_many(raws, NOW, contract.bounds(NOW))
    assert len(got) == len(raws)
    for raw, fast in zip(raws, got, strict=True):
        if fast is not None:
            want = exact(raw, limits, contract)
            assert want is not None, raw
            assert fast == want, raw
            assert [type(v) for v in fast] == [type(v) for v in want]
            ts = fast[contract.columns.index("occurred_at")]
            assert ts.utcoffset() == want[contract.columns.index("occurred_at")].utcoffset()
    return got


@PROPS
@given(raws=st.lists(st.none() | payloads, max_size=12), limits=limits_st, stream=st.sampled_from(["webhook", "audit"]))
def test_fast_path_never_accepts_what_the_exact_path_refuses(raws: list[bytes | None], limits: DecodeLimits,
                                                             stream: str) -> None:
    check_batch(raws, limits, stream)


@PROPS
@given(docs=st.lists(documents(WEBHOOK.schema_file), min_size=1, max_size=6), compact=st.booleans())
def test_schema_documents_agree_webhook(docs: list[Any], compact: bool) -> None:
    raws = [orjson.dumps(d) if compact else orjson.dumps(d, option=orjson.OPT_INDENT_2) for d in docs]
    check_batch(raws, DEFAULTS.decode, "webhook")


@PROPS
@given(docs=st.lists(documents(AUDIT.schema_file), min_size=1, max_size=6))
def test_schema_documents_agree_audit(docs: list[Any]) -> None:
    check_batch([orjson.dumps(d) for d in docs], DEFAULTS.decode, "audit")


def test_published_events_take_the_fast_path() -> None:
    """Bench events, compact orjson as the publisher emits them, all accepted (the path is not vacuous)."""
    now = datetime.now(UTC)
    raws: list[bytes | None] = [v for _, v in _values(BenchOptions(events=500, invalid_rate=0, dup_rate=0))]
    contract = CONTRACTS["webhook"]
    got = contract.compiled(DEFAULTS.decode).extract_many(raws, now, contract.bounds(now))
    assert all(v is not None for v in got)
    for raw, fast in zip(raws, got, strict=True):
        assert fast == contract.extract(decode(raw, DEFAULTS.decode).obj, now)


NESTED: Any = []
for _ in range(40):
    NESTED = [NESTED]
BASE = {"tenant_id": "org-1", "idempotency_key": "k", "event_type": "push", "source": "github",
        "occurred_at": "2024-06-15T11:00:00.5+01:00", "payload": {"a": [1, {"b": None}]}, "headers": {"h": "v"}}


@pytest.mark.parametrize("raw", [
    orjson.dumps({**BASE, "payload": {"a": 1}})[:-1] + b',"x":{"k":1,"k":2}}',  # duplicate in an unknown field
    orjson.dumps(BASE).replace(b'"k"', b'"k","tenant_id":"org-2"'),            # duplicate top-level key
    orjson.dumps({**BASE, "payload": {"n": 1}}).replace(b'"n":1', b'"n":18446744073709551616'),
    orjson.dumps({**BASE, "payload": {"s": "\x00"}}),                          # NUL: the policy decides
    orjson.dumps({**BASE, "payload": [1]}),
    orjson.dumps({**BASE, "payload": None}),
    orjson.dumps({**BASE, "headers": {"h": 1}}),
    orjson.dumps({**BASE, "headers": None}),
    orjson.dumps({**BASE, "occurred_at": "2024-06-15t11:00:00z"}),            # valid, but the exact path's
    orjson.dumps({**BASE, "occurred_at": "2024-06-15T11:00:00+05:75"}),
    orjson.dumps({**BASE, "occurred_at": "2023-02-29T11:00:00Z"}),
    orjson.dumps({**BASE, "occurred_at": "2024-01-01T11:00:00Z"}),
    orjson.dumps({**BASE, "tenant_id": "org\n"}),
    orjson.dumps({**BASE, "tenant_id": ""}),
    orjson.dumps({**BASE, "event_type": "a\x7f"}),
    orjson.dumps({**BASE, "payload": {"d": NESTED}}),                         # deeper than max_depth
    b'{"tenant_id": "org-1"}',
])
def test_edge_cases_agree(raw: bytes) -> None:
    for policy in NulPolicy:
        check_batch([raw, orjson.dumps(BASE)], dataclasses.replace(DEFAULTS.decode, nul_policy=policy), "webhook")


def test_bad_values_in_a_batch_fall_back_one_by_one() -> None:
    good = orjson.dumps(BASE)
    bad = [orjson.dumps({**BASE, "tenant_id": "a b"}), orjson.dumps({**BASE, "occurred_at": "2024-06-15T11:00:00"}),
           orjson.dumps({**BASE, "headers": {"h": []}}), orjson.dumps({**BASE, "payload": "x"}),
           orjson.dumps({**BASE, "occurred_at": "2030-06-15T11:00:00Z"})]
    got = check_batch([good, *bad, good], DEFAULTS.decode, "webhook")
    assert got[0] is not None and got[-1] is not None
    assert got[1:-1] == [None] * len(bad)


def test_strict_time_regex_is_inside_the_published_pattern() -> None:
    """The fast path parses date-times the strict regex admits with ``fromisoformat``: the exact path's own fast
    path, which it takes for every string its pattern and RFC 3339 regex admit with offset minutes below 60."""
    pattern = re.compile(_ecma_anchors(load_schema(WEBHOOK.schema_file)["properties"]["occurred_at"]["pattern"]))
    for text in ["2024-06-15T11:00:00Z", "2024-06-15T11:00:00.123456789+23:59", "2024-06-15T11:00:00-00:00"]:
        assert _STRICT_TIME.fullmatch(text) and pattern.search(text)
    for text in ["2024-06-15t11:00:00Z", "2024-06-15T11:00:00z", "2024-06-15T11:00:00+24:00",
                 "2024-06-15T11:00:00+05:60", "2024-06-15T11:00:60Z"]:
        assert _STRICT_TIME.fullmatch(text) is None


@pytest.mark.parametrize(("pattern", "body"), [
    ("^[a-z]+$", "[a-z]+"), ("^(a|b)c$", "(a|b)c"), ("^a|b$", None), ("^[^x]+$", None), ("^a\\s$", None),
    ("^a$b$", None), ("a$", None), ("^a\\$", None), ("^[0-9]{4}\\.x$", "[0-9]{4}\\.x"),
])
def test_joinable_is_conservative(pattern: str, body: str | None) -> None:
    assert _joinable(pattern) == body


def test_column_joined_by_newlines_cannot_hide_a_bad_value() -> None:
    contract = Contract({"type": "object", "required": ["tenant_id", "idempotency_key", "occurred_at"],
                         "properties": {"tenant_id": {"type": "string", "pattern": "^(a|b)$"},
                                        "idempotency_key": {"type": "string"},
                                        "occurred_at": {"type": "string", "format": "date-time"}}},
                        ["tenant_id", "idempotency_key", "occurred_at"],
                        dataclasses.replace(DEFAULTS.window, max_age=timedelta(days=3650)))
    doc = {"idempotency_key": "k", "occurred_at": "2024-06-15T11:00:00Z"}
    raws: list[bytes | None] = [orjson.dumps({**doc, "tenant_id": t}) for t in ("a", "a\nb", "b")]
    got = contract.compiled(DEFAULTS.decode).extract_many(raws, NOW, contract.bounds(NOW))
    assert [g is not None for g in got] == [True, False, True]
