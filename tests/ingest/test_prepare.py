"""ingest.pipeline.prepare: the pure CPU stage (decode, contract, in-batch dedupe, dead-letter rows)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from consumers.settings import from_env
from consumers.streams import AUDIT, WEBHOOK, load_schema
from ingest.codec import DecodeLimits, NulPolicy
from ingest.contract import Contract
from ingest.pipeline import prepare
from ingest.reject import Reason
from ingest.rows import DEAD_LETTER_COLUMNS

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TS_MS = 1_718_452_800_123  # 2024-06-15T12:00:00.123Z
DEFAULTS = from_env({})
WEBHOOK_C = Contract(load_schema(WEBHOOK.schema_file), WEBHOOK.columns, DEFAULTS.window)
AUDIT_C = Contract(load_schema(AUDIT.schema_file), AUDIT.columns, DEFAULTS.window)
LIMITS = DEFAULTS.decode


@dataclass(frozen=True, slots=True)
class Rec:
    value: bytes | None
    partition: int = 0
    offset: int = 0
    key: bytes | None = b"k"
    timestamp: int = TS_MS
    topic: str = "events.webhook"


def event(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"tenant_id": "org-1", "idempotency_key": "evt-1", "event_type": "push", "source": "github",
                           "occurred_at": "2024-06-15T11:00:00Z", "payload": {"n": 1}}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def raw(**over: Any) -> bytes:
    return json.dumps(event(**over)).encode()


def run(*records: Rec, limits: DecodeLimits = LIMITS, contract: Contract = WEBHOOK_C, stream: str = "webhook"):
    return prepare(stream, list(records), contract, limits, NOW)


def dead(row: tuple[Any, ...]) -> dict[str, Any]:
    assert len(row) == len(DEAD_LETTER_COLUMNS)
    return dict(zip(DEAD_LETTER_COLUMNS, row, strict=True))


def test_valid_record_becomes_a_candidate_row() -> None:
    value = raw(headers={"x": "1"})
    out = run(Rec(value, partition=2, offset=41, key=b"org-1"))
    assert out.dead_letters == [] and out.in_batch_duplicates == 0
    [c] = out.candidates
    ts = EPOCH + timedelta(milliseconds=TS_MS)
    assert ts.microsecond == 123000
    values = WEBHOOK_C.extract(json.loads(value), NOW)
    assert c.row == (*values, ts, 2, 41)
    assert c.row[:7] == ("org-1", "evt-1", "push", "github", datetime(2024, 6, 15, 11, tzinfo=UTC),
                         b'{"n":1}', b'{"x":"1"}')
    assert c.row[-3].tzinfo is not None
    assert c.key == ("org-1", "evt-1")
    assert dead(c.dead_letter("webhook", "", "")) == {
        "stream": "webhook", "reason": "", "detail": "", "raw": value, "tenant_id": "org-1",
        "idempotency_key": "evt-1", "source_topic": "events.webhook", "source_partition": 2, "source_offset": 41,
        "kafka_key": b"org-1", "kafka_timestamp": ts,
    }
    assert c.row[-3] == ts and ts.timestamp() * 1000 == TS_MS
    assert out.advance == {2: 42}


def test_audit_row_layout() -> None:
    doc = {"tenant_id": "t", "idempotency_key": "a-1", "action": "user.login", "actor_id": "u",
           "occurred_at": "2024-06-15T11:00:00Z", "ip": "::1"}
    out = run(Rec(orjson.dumps(doc), topic="events.audit"), contract=AUDIT_C, stream="audit")
    [c] = out.candidates
    assert c.row == ("t", "a-1", "user.login", "u", datetime(2024, 6, 15, 11, tzinfo=UTC), None, "::1", None,
                     EPOCH + timedelta(milliseconds=TS_MS), 0, 0)
    assert len(c.row) == len(AUDIT.tables().columns)


def test_in_batch_duplicates_counted_first_one_kept() -> None:
    out = run(Rec(raw(payload={"v": 1}), offset=1), Rec(raw(payload={"v": 2}), offset=2),
              Rec(raw(idempotency_key="evt-2"), offset=3), Rec(raw(payload={"v": 3}), offset=4, partition=1))
    assert out.in_batch_duplicates == 2
    assert [c.key for c in out.candidates] == [("org-1", "evt-1"), ("org-1", "evt-2")]
    assert out.candidates[0].row[5] == b'{"v":1}' and out.candidates[0].row[-1] == 1
    assert out.dead_letters == []
    assert out.advance == {0: 4, 1: 5}


def test_same_key_other_tenant_is_not_duplicate() -> None:
    out = run(Rec(raw(), offset=1), Rec(raw(tenant_id="org-2"), offset=2))
    assert out.in_batch_duplicates == 0
    assert [c.key for c in out.candidates] == [("org-1", "evt-1"), ("org-2", "evt-1")]


def test_dead_letter_for_a_contract_failure_keeps_tenant_and_key() -> None:
    value = raw(event_type="")
    out = run(Rec(value, partition=3, offset=9, key=None, timestamp=-1))
    assert out.candidates == []
    [row] = out.dead_letters
    d = dead(row)
    assert d["reason"] == Reason.INVALID_FIELD.value and type(d["reason"]) is str
    assert d["raw"] is value
    assert (d["tenant_id"], d["idempotency_key"]) == ("org-1", "evt-1")
    assert (d["stream"], d["source_topic"], d["source_partition"], d["source_offset"]) == \
        ("webhook", "events.webhook", 3, 9)
    assert d["kafka_key"] is None
    assert d["kafka_timestamp"] == NOW  # -1: no Kafka timestamp -> the ingestion time
    assert "event_type" in d["detail"]


@pytest.mark.parametrize(("value", "reason"), [
    (None, Reason.TOMBSTONE),
    (b"{not json", Reason.NOT_JSON),
    (b"[1]", Reason.NOT_OBJECT),
    (b'{"tenant_id":"a","tenant_id":"b"}', Reason.DUPLICATE_KEY),
    (b'{"a":"\xff"}', Reason.INVALID_UTF8),
])
def test_dead_letter_for_a_decode_failure_has_no_tenant(value: bytes | None, reason: Reason) -> None:
    [row] = run(Rec(value)).dead_letters
    d = dead(row)
    assert d["reason"] == reason.value
    assert d["raw"] == value
    assert d["tenant_id"] is None and d["idempotency_key"] is None


@pytest.mark.parametrize(("over", "reason", "tenant", "key"), [
    ({"tenant_id": 5}, Reason.WRONG_TYPE, None, "evt-1"),
    ({"idempotency_key": ["x"]}, Reason.WRONG_TYPE, "org-1", None),
    ({"occurred_at": "2024-01-01T00:00:00Z"}, Reason.TIMESTAMP_TOO_OLD, "org-1", "evt-1"),
    ({"occurred_at": "2024-06-17T00:00:00Z"}, Reason.TIMESTAMP_IN_FUTURE, "org-1", "evt-1"),
    ({"tenant_id": "x" * 300}, Reason.INVALID_TENANT_ID, "x" * 256, "evt-1"),
])
def test_dead_letter_text_fields(over: dict[str, Any], reason: Reason, tenant: str | None, key: str | None) -> None:
    [row] = run(Rec(raw(**over))).dead_letters
    d = dead(row)
    assert (d["reason"], d["tenant_id"], d["idempotency_key"]) == (reason.value, tenant, key)


def test_dead_letter_text_never_contains_nul() -> None:
    records = [
        Rec(raw(tenant_id="org\x00"), offset=0),
        Rec(raw(idempotency_key="k\x00"), offset=1),
        Rec(b'{"k\\u0000":1,"k\\u0000":2}', offset=2),
        Rec(raw(headers={"h\x00": 1}), offset=3),
    ]
    for policy in NulPolicy:
        out = run(*records, limits=dataclasses.replace(LIMITS, nul_policy=policy))
        assert len(out.dead_letters) == 4  # a NUL in a contract field is refused whatever the policy
        rows = [*out.dead_letters, *(c.row for c in out.candidates), *(c.dead_letter for c in out.candidates)]
        for row in rows:
            assert not any(isinstance(v, str) and "\x00" in v for v in row), (policy, row)
    stripped = run(*records[:2], limits=dataclasses.replace(LIMITS, nul_policy=NulPolicy.STRIP))
    assert stripped.candidates == []
    replaced = run(*records[:2], limits=dataclasses.replace(LIMITS, nul_policy=NulPolicy.REPLACE)).dead_letters
    assert [dead(r)["reason"] for r in replaced] == [Reason.INVALID_TENANT_ID, Reason.INVALID_IDEMPOTENCY_KEY]
    assert dead(replaced[0])["tenant_id"] == "org\ufffd"
    assert dead(replaced[1])["idempotency_key"] == "k\ufffd"
    rejected = run(*records[:2], limits=dataclasses.replace(LIMITS, nul_policy=NulPolicy.REJECT)).dead_letters
    assert [dead(r)["reason"] for r in rejected] == [Reason.INVALID_TENANT_ID, Reason.INVALID_IDEMPOTENCY_KEY]


def test_sanitized_counts_only_stored_candidates() -> None:
    limits = dataclasses.replace(LIMITS, nul_policy=NulPolicy.STRIP)
    out = run(Rec(raw(payload={"a": "x\x00"}), offset=0), Rec(raw(idempotency_key="e2", event_type="\x00"), offset=1),
              Rec(raw(idempotency_key="e3"), offset=2), limits=limits)
    assert len(out.candidates) == 2 and len(out.dead_letters) == 1
    assert out.sanitized == 1
    assert out.candidates[0].row[5] == b'{"a":"x"}'


def test_advance_is_max_offset_plus_one_even_out_of_order() -> None:
    out = run(Rec(raw(), partition=0, offset=7), Rec(None, partition=0, offset=3),
              Rec(b"x", partition=5, offset=0), Rec(raw(idempotency_key="b"), partition=0, offset=8))
    assert out.advance == {0: 9, 5: 1}


@pytest.mark.parametrize("ms", [0, 1, 999, TS_MS, 2**41, 4_102_444_800_000])
def test_kafka_timestamp_is_exact_and_aware(ms: int) -> None:
    [c] = run(Rec(raw(), timestamp=ms)).candidates
    assert c.row[-3] == EPOCH + timedelta(milliseconds=ms)
    assert c.row[-3].utcoffset() == timedelta(0)


def test_out_of_range_kafka_timestamp_does_not_crash_the_batch() -> None:
    """A CreateTime after 9999-12-31 (int64 allows it) or a missing one (-1) is replaced by the ingestion time."""
    out = run(Rec(raw(), offset=0, timestamp=2**62), Rec(raw(idempotency_key="b"), offset=1, timestamp=-1))
    assert len(out.candidates) == 2
    assert [c.row[-3] for c in out.candidates] == [NOW, NOW]
