"""ingest.contract: column extraction, one Reason per field error, the time window, unsupported schemas."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from consumers.streams import AUDIT, WEBHOOK, load_schema
from ingest.contract import Contract, TimeWindow, UnsupportedSchema, parse_rfc3339
from ingest.reject import Reason, Rejected

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
WINDOW = TimeWindow(max_age=timedelta(days=90), max_ahead=timedelta(days=1))


@pytest.fixture(scope="module")
def webhook() -> Contract:
    return Contract(load_schema(WEBHOOK.schema_file), WEBHOOK.columns, WINDOW)


@pytest.fixture(scope="module")
def audit() -> Contract:
    return Contract(load_schema(AUDIT.schema_file), AUDIT.columns, WINDOW)


def webhook_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tenant_id": "org-0001", "idempotency_key": "st_evt_1", "event_type": "invoice.paid",
        "source": "stripe", "occurred_at": "2024-06-15T11:00:00Z",
        "payload": {"id": "obj_1", "amount": 100, "items": [{"q": 1}]}, "headers": {"x-a": "1"},
    }
    doc.update(over)
    return doc


def audit_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tenant_id": "org-0002", "idempotency_key": "aud_1", "action": "user.login", "actor_id": "user_7",
        "occurred_at": "2024-06-15T11:00:00.123+02:00",
    }
    doc.update(over)
    return doc


def reason(contract: Contract, doc: dict[str, Any], now: datetime = NOW) -> Reason:
    with pytest.raises(Rejected) as info:
        contract.extract(doc, now)
    return info.value.reason


# --- extraction ---------------------------------------------------------------------------------------------

def test_webhook_values_in_column_order(webhook: Contract) -> None:
    values = webhook.extract(webhook_doc(), NOW)
    assert values == ("org-0001", "st_evt_1", "invoice.paid", "stripe", datetime(2024, 6, 15, 11, tzinfo=UTC),
                      orjson.dumps({"id": "obj_1", "amount": 100, "items": [{"q": 1}]}), b'{"x-a":"1"}')
    assert values[5] == b'{"id":"obj_1","amount":100,"items":[{"q":1}]}'


def test_column_order_follows_caller_not_schema() -> None:
    cols = ("occurred_at", "idempotency_key", "tenant_id")
    c = Contract(load_schema(WEBHOOK.schema_file), cols, WINDOW)
    assert c.extract(webhook_doc(), NOW) == (datetime(2024, 6, 15, 11, tzinfo=UTC), "st_evt_1", "org-0001")


def test_audit_values_and_optional_missing_is_none(audit: Contract) -> None:
    values = audit.extract(audit_doc(), NOW)
    ts = values[4]
    assert values[:4] == ("org-0002", "aud_1", "user.login", "user_7")
    assert ts == datetime(2024, 6, 15, 9, 0, 0, 123000, tzinfo=UTC)
    assert ts.utcoffset() == timedelta(hours=2)
    assert values[5:] == (None, None, None)  # resource, ip, metadata


def test_audit_optional_present(audit: Contract) -> None:
    values = audit.extract(audit_doc(resource="api_key:k1", ip="10.0.0.1", metadata={"mfa": True}), NOW)
    assert values[5:] == ("api_key:k1", "10.0.0.1", b'{"mfa":true}')


def test_webhook_headers_optional(webhook: Contract) -> None:
    doc = webhook_doc()
    del doc["headers"]
    assert webhook.extract(doc, NOW)[6] is None


def test_unknown_extra_fields_accepted(webhook: Contract, audit: Contract) -> None:
    assert webhook.extract(webhook_doc(extra=[1, {"x": None}], version=2), NOW)[0] == "org-0001"
    assert audit.extract(audit_doc(unknown="x"), NOW)[0] == "org-0002"


# --- field errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["tenant_id", "idempotency_key", "event_type", "source", "occurred_at", "payload"])
def test_missing_required_field(webhook: Contract, field: str) -> None:
    doc = webhook_doc()
    del doc[field]
    assert reason(webhook, doc) is Reason.MISSING_FIELD
    with pytest.raises(Rejected) as info:
        webhook.validate_schema_only(doc)
    assert info.value.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize(("field", "value"), [
    ("tenant_id", 1), ("tenant_id", None), ("tenant_id", True), ("idempotency_key", ["k"]),
    ("event_type", {"a": "b"}), ("source", 1.5), ("occurred_at", 1718449200), ("payload", "{}"),
    ("payload", []), ("payload", None), ("headers", ["a"]), ("headers", {"a": 1}), ("headers", {"a": None}),
    ("headers", {"a": {"b": "c"}}), ("headers", {"ok": "x", "bad": True}),
])
def test_wrong_type(webhook: Contract, field: str, value: Any) -> None:
    assert reason(webhook, webhook_doc(**{field: value})) is Reason.WRONG_TYPE


@pytest.mark.parametrize("value", ["", "x" * 65, "org 1", "org/1", "org\n", "\norg", "orgé", "org\x00", "a@b"])
def test_invalid_tenant_id(webhook: Contract, value: str) -> None:
    assert reason(webhook, webhook_doc(tenant_id=value)) is Reason.INVALID_TENANT_ID


@pytest.mark.parametrize("value", ["a", "x" * 64, "A.b_c:d-9"])
def test_valid_tenant_id(webhook: Contract, value: str) -> None:
    assert webhook.extract(webhook_doc(tenant_id=value), NOW)[0] == value


@pytest.mark.parametrize("value", ["", "k" * 256, "k\x01", "k\x7f", "k\n", "k\t", "ké", "\x00"])
def test_invalid_idempotency_key(webhook: Contract, value: str) -> None:
    assert reason(webhook, webhook_doc(idempotency_key=value)) is Reason.INVALID_IDEMPOTENCY_KEY


def test_idempotency_key_max_length_and_printable(webhook: Contract) -> None:
    key = "~ !" + "k" * 252
    assert len(key) == 255
    assert webhook.extract(webhook_doc(idempotency_key=key), NOW)[1] == key


@pytest.mark.parametrize(("field", "value"), [
    ("event_type", ""), ("event_type", "e" * 129), ("event_type", "a\tb"), ("event_type", "ab\n"),
    ("source", ""), ("source", "s" * 65), ("source", "s\x7f"),
])
def test_invalid_field(webhook: Contract, field: str, value: str) -> None:
    assert reason(webhook, webhook_doc(**{field: value})) is Reason.INVALID_FIELD


@pytest.mark.parametrize(("field", "value"), [
    ("action", ""), ("actor_id", "u" * 256), ("resource", ""), ("resource", "r\x1f"), ("ip", "10.0.0.1 "),
    ("ip", "x" * 46), ("ip", "g::1"),
])
def test_invalid_audit_field(audit: Contract, field: str, value: str) -> None:
    assert reason(audit, audit_doc(**{field: value})) is Reason.INVALID_FIELD


def test_unicode_allowed_in_free_text(webhook: Contract) -> None:
    assert webhook.extract(webhook_doc(event_type="café ☕ 事件"), NOW)[2] == "café ☕ 事件"


@pytest.mark.parametrize("value", [
    "2024-06-15T11:00:00",            # no offset
    "2024-13-01T11:00:00Z",           # month 13
    "2024-00-01T11:00:00Z",           # month 0
    "2023-02-29T11:00:00Z",           # not a leap year
    "2024-02-30T11:00:00Z",           # Feb 30
    "2024-06-00T11:00:00Z",           # day 0
    "2024-06-15T24:00:00Z",           # hour 24
    "2024-06-15T11:60:00Z",           # minute 60
    "2024-06-15T11:00:60Z",           # second 60 (no leap seconds)
    "2024-06-15T11:00:00+24:00",      # offset hour 24
    "2024-06-15T11:00:00+05:60",      # offset minute 60
    "2024-06-15 11:00:00Z",           # space separator
    "2024-06-15T11:00Z",              # no seconds
    "2024-06-15T11:00:00.Z",          # empty fraction
    "2024-06-15T11:00:00.1234567890Z",  # 10 fraction digits
    "2024-06-15T11:00:00Z\n",         # trailing newline
    "2024-06-15T11:00:00+0200",       # offset without colon
    "0000-01-01T00:00:00Z",           # year 0
    "2024-6-15T11:00:00Z",
    "",
])
def test_invalid_timestamp(webhook: Contract, value: str) -> None:
    assert reason(webhook, webhook_doc(occurred_at=value)) is Reason.INVALID_TIMESTAMP


@pytest.mark.parametrize(("value", "expected"), [
    ("2024-06-15T11:00:00z", datetime(2024, 6, 15, 11, tzinfo=UTC)),
    ("2024-06-15t11:00:00Z", datetime(2024, 6, 15, 11, tzinfo=UTC)),
    ("2024-02-29T11:00:00+23:59", datetime(2024, 2, 29, 11, tzinfo=timezone(timedelta(hours=23, minutes=59)))),
    ("2024-06-15T11:00:00-00:00", datetime(2024, 6, 15, 11, tzinfo=UTC)),
    ("2024-06-15T11:00:00.5-05:30", datetime(2024, 6, 15, 11, 0, 0, 500000,
                                             tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
])
def test_valid_timestamp_forms(value: str, expected: datetime) -> None:
    got = parse_rfc3339(value)
    assert got == expected
    assert got.utcoffset() == expected.utcoffset()


def test_nanoseconds_truncate_to_microseconds(webhook: Contract) -> None:
    ts = webhook.extract(webhook_doc(occurred_at="2024-06-15T11:00:00.123456999Z"), NOW)[4]
    assert ts == datetime(2024, 6, 15, 11, 0, 0, 123456, tzinfo=UTC)
    assert parse_rfc3339("2024-06-15T11:00:00.9999999Z").microsecond == 999999
    assert parse_rfc3339("2024-06-15T11:00:00.01Z").microsecond == 10000


# --- time window --------------------------------------------------------------------------------------------

def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def test_time_window_edges(webhook: Contract) -> None:
    oldest, newest = NOW - WINDOW.max_age, NOW + WINDOW.max_ahead
    assert webhook.extract(webhook_doc(occurred_at=iso(oldest)), NOW)[4] == oldest
    assert webhook.extract(webhook_doc(occurred_at=iso(newest)), NOW)[4] == newest
    too_old = iso(oldest - timedelta(microseconds=1))
    ahead = iso(newest + timedelta(microseconds=1))
    assert reason(webhook, webhook_doc(occurred_at=too_old)) is Reason.TIMESTAMP_TOO_OLD
    assert reason(webhook, webhook_doc(occurred_at=ahead)) is Reason.TIMESTAMP_IN_FUTURE


def test_time_window_respects_offset(webhook: Contract) -> None:
    # 2024-06-16T13:00+02:00 is 11:00Z, within one day; the same wall time in -02:00 is 15:00Z, beyond it
    assert webhook.extract(webhook_doc(occurred_at="2024-06-16T13:00:00+02:00"), NOW)[0] == "org-0001"
    assert reason(webhook, webhook_doc(occurred_at="2024-06-16T13:00:00-02:00")) is Reason.TIMESTAMP_IN_FUTURE


def test_time_window_uses_injected_now(webhook: Contract) -> None:
    doc = webhook_doc(occurred_at="2020-01-01T00:00:00Z")
    assert reason(webhook, doc) is Reason.TIMESTAMP_TOO_OLD
    assert webhook.extract(doc, datetime(2020, 1, 2, tzinfo=UTC))[0] == "org-0001"
    assert reason(webhook, doc, datetime(2019, 12, 30, tzinfo=UTC)) is Reason.TIMESTAMP_IN_FUTURE
    webhook.validate_schema_only(doc)  # no window there


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_extreme_dates_are_rejected_not_crashing(webhook: Contract, value: str) -> None:
    assert reason(webhook, webhook_doc(occurred_at=value)) in {Reason.TIMESTAMP_TOO_OLD, Reason.TIMESTAMP_IN_FUTURE}


def test_validate_schema_only_rejects_non_object(webhook: Contract) -> None:
    for value in ([], "x", None, 1):
        with pytest.raises(Rejected) as info:
            webhook.validate_schema_only(value)
        assert info.value.reason is Reason.NOT_OBJECT


# --- unsupported schemas ------------------------------------------------------------------------------------

def schema_with(field_spec: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    schema = copy.deepcopy(load_schema(WEBHOOK.schema_file))
    if field_spec is not None:
        schema["properties"]["source"] = field_spec
    schema.update(top)
    return schema


def test_published_schemas_compile() -> None:
    Contract(load_schema(WEBHOOK.schema_file), WEBHOOK.columns, WINDOW)
    Contract(load_schema(AUDIT.schema_file), AUDIT.columns, WINDOW)
    Contract(schema_with({"type": "string", "description": "ok"}), WEBHOOK.columns, WINDOW)


@pytest.mark.parametrize("spec", [
    {"type": "string", "enum": ["a", "b"]},
    {"type": "string", "minimum": 1},
    {"type": "string", "format": "email"},
    {"type": "string", "format": "date"},
    {"type": "string", "const": "x"},
    {"type": "integer"},
    {"type": ["string", "null"]},
    {"minLength": 1},
    {"type": "object", "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}},
    {"type": "object", "required": ["a"]},
    {"type": "object", "properties": {}},
    {"type": "object", "maxLength": 3},
    {"$ref": "#/definitions/x"},
])
def test_unsupported_field_keyword(spec: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchema):
        Contract(schema_with(spec), WEBHOOK.columns, WINDOW)


def test_unsupported_keyword_on_a_stored_or_unstored_property() -> None:
    schema = schema_with()
    schema["properties"]["unused"] = {"type": "string", "enum": ["x"]}
    with pytest.raises(UnsupportedSchema):
        Contract(schema, ("tenant_id", "idempotency_key"), WINDOW)


@pytest.mark.parametrize("top", [{"additionalProperties": False}, {"allOf": []}, {"type": "array"},
                                 {"patternProperties": {}}, {"$defs": {}}])
def test_unsupported_top_level(top: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchema):
        Contract(schema_with(**top), WEBHOOK.columns, WINDOW)


def test_column_not_in_properties() -> None:
    with pytest.raises(UnsupportedSchema):
        Contract(load_schema(WEBHOOK.schema_file), (*WEBHOOK.columns, "nope"), WINDOW)
    with pytest.raises(UnsupportedSchema):
        Contract(load_schema(AUDIT.schema_file), WEBHOOK.columns, WINDOW)


def test_deep_object_beyond_encoder_limit_is_rejected() -> None:
    # only reachable when DecodeLimits.max_depth is configured above 254
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    c = Contract(load_schema(WEBHOOK.schema_file), WEBHOOK.columns, WINDOW)
    assert reason(c, webhook_doc(payload={"d": deep})) is Reason.TOO_DEEP
