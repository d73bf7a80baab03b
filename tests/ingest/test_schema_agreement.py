"""The hot-path Contract must accept exactly what the published JSON Schema files accept.

Oracle: ``jsonschema.Draft202012Validator`` with its format checker (``rfc3339-validator`` backs ``date-time``).
One documented deviation: python-jsonschema evaluates ``pattern`` with Python's ``re.search``, where ``$`` also
matches just before a final newline; JSON Schema patterns are ECMA-262, where ``$`` is the end of the input
(JSON-Schema-Test-Suite optional/ecmascript-regex.json). So the oracle overrides only the ``pattern`` keyword
with ECMA end-of-input semantics, and the test checks the stock validator differs from it only in that case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError, validators

from consumers.streams import AUDIT, WEBHOOK, Stream, load_schema
from ingest.contract import Contract, TimeWindow
from ingest.reject import Reason, Rejected

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
WINDOW = TimeWindow(max_age=timedelta(days=90), max_ahead=timedelta(days=1))
SCHEMA_REASONS = {Reason.MISSING_FIELD, Reason.WRONG_TYPE, Reason.INVALID_TENANT_ID,
                  Reason.INVALID_IDEMPOTENCY_KEY, Reason.INVALID_FIELD, Reason.INVALID_TIMESTAMP}
STREAMS = [WEBHOOK, AUDIT]


def _ecma_pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    # Every published pattern is ^BODY$ without top-level alternation: the ECMA-262 meaning is a full match.
    assert patrn.startswith("^") and patrn.endswith("$") and not patrn.endswith("\\$"), patrn
    if re.fullmatch(f"(?:{patrn[1:-1]})", instance) is None:
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


EcmaValidator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


@cache
def oracles(stream: Stream) -> tuple[Any, Any]:
    schema = load_schema(stream.schema_file)
    Draft202012Validator.check_schema(schema)
    fc = Draft202012Validator.FORMAT_CHECKER
    return EcmaValidator(schema, format_checker=fc), Draft202012Validator(schema, format_checker=fc)


@cache
def contract(stream: Stream) -> Contract:
    return Contract(load_schema(stream.schema_file), stream.columns, WINDOW)


def test_date_time_format_is_really_checked() -> None:
    import rfc3339_validator  # noqa: F401  (without it jsonschema silently skips "date-time")

    fc = Draft202012Validator.FORMAT_CHECKER
    assert "date-time" in fc.checkers
    assert fc.conforms("2024-02-29T00:00:00Z", "date-time")
    assert not fc.conforms("2023-02-29T00:00:00Z", "date-time")
    assert not fc.conforms("2024-06-15T24:00:00Z", "date-time")


def test_stock_jsonschema_has_the_trailing_newline_quirk() -> None:
    """If this starts failing, python-jsonschema adopted ECMA ``$`` and the override can go."""
    ecma, stock = oracles(WEBHOOK)
    doc = {"tenant_id": "org\n", "idempotency_key": "k", "event_type": "e", "source": "s",
           "occurred_at": "2024-06-15T11:00:00Z", "payload": {}}
    assert stock.is_valid(doc)
    assert not ecma.is_valid(doc)
    with pytest.raises(Rejected) as info:
        contract(WEBHOOK).validate_schema_only(doc)
    assert info.value.reason is Reason.INVALID_TENANT_ID


# --- strategies ---------------------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)  # what decode() lets through
json_values = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
wrong_types = st.one_of(st.booleans(), INT64, st.floats(allow_nan=False, allow_infinity=False), st.none(),
                        st.lists(json_values, max_size=2), st.dictionaries(st.text(max_size=4), json_values, max_size=2))
INTERESTING = (
    "aZf09._:-~ /@#é\u00e9\u2603\U0001f600\u2028\x85\xa0\ufeff"  # allowed somewhere, disallowed elsewhere, unicode
    "\x00\x01\t\n\r\x1b\x1f\x7f"                                # control characters
)


def boundary_lengths(spec: dict[str, Any]) -> list[int]:
    lo, hi = spec.get("minLength", 0), spec.get("maxLength", 300)
    return sorted({0, 1, 2, lo, max(lo - 1, 0), hi - 1, hi, hi + 1})


def stretched(spec: dict[str, Any], lengths: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Strings matching the pattern, repeated to a drawn length (every non-date pattern is ^[class]+$)."""
    unit = st.from_regex(spec["pattern"], fullmatch=True).filter(lambda s: "\n" not in s and s != "")
    return st.builds(lambda u, n: (u * (n // len(u) + 1))[:n], unit, lengths)


def valid_strings(spec: dict[str, Any]) -> st.SearchStrategy[str]:
    lo, hi = spec.get("minLength", 1), spec.get("maxLength", 300)
    return stretched(spec, st.sampled_from([lo, lo + 1, hi - 1, hi]) | st.integers(lo, min(hi, 24)))


def edge_strings(spec: dict[str, Any]) -> st.SearchStrategy[str]:
    lengths = st.sampled_from(boundary_lengths(spec))
    mixed = lengths.flatmap(lambda n: st.text(alphabet=INTERESTING, min_size=n, max_size=n))
    one_bad = st.builds(lambda s, c, i: s[:i % (len(s) + 1)] + c + s[i % (len(s) + 1):],
                        valid_strings(spec), st.sampled_from(INTERESTING), st.integers(0, 300))
    trailing = st.builds(lambda s, t: s + t, valid_strings(spec), st.sampled_from(["\n", "\r", " ", "\x00"]))
    return st.one_of(stretched(spec, lengths), mixed, one_bad, trailing, st.text(max_size=8))


OFFSETS_OK = ["Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+05:30", "-08:00", "+14:00"]
OFFSETS_BAD = ["", "+24:00", "-24:00", "+23:60", "+0530", "+5:30", "UTC", " Z", "+00:00:00", "Z\n"]


@st.composite
def timestamps_in_window(draw: st.DrawFn) -> str:
    """A valid RFC 3339 string for an instant within +-1 day of NOW, in any offset and spelling."""
    instant = NOW + timedelta(microseconds=draw(st.integers(-86_400 * 10**6, 86_400 * 10**6)))
    offset = draw(st.sampled_from(OFFSETS_OK))
    if offset in ("Z", "z"):
        tz = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    local = instant.astimezone(tz)
    digits = draw(st.integers(0, 9))
    frac = f"{local.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
    sep = draw(st.sampled_from("Tt"))
    return f"{local:%Y-%m-%d}{sep}{local:%H:%M:%S}" + (f".{frac}" if digits else "") + offset


@st.composite
def timestamps_from_parts(draw: st.DrawFn) -> str:
    """Components drawn independently, so both valid and near-miss invalid strings come out."""
    year = draw(st.sampled_from([0, 1, 1900, 2000, 2023, 2024, 9999]))
    month = draw(st.integers(0, 13))
    day = draw(st.sampled_from([0, 1, 28, 29, 30, 31, 32]))
    hour = draw(st.sampled_from([0, 9, 23, 24, 25]))
    minute = draw(st.sampled_from([0, 59, 60]))
    second = draw(st.sampled_from([0, 59, 60, 61]))
    frac_digits = draw(st.integers(0, 10))
    frac = "." + "1234567890"[:frac_digits] if frac_digits else draw(st.sampled_from(["", "."]))
    sep = draw(st.sampled_from(["T", "t", " ", "", "_"]))
    offset = draw(st.sampled_from(OFFSETS_OK + OFFSETS_BAD))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{frac}{offset}"


@st.composite
def mangled_timestamps(draw: st.DrawFn) -> str:
    s = draw(timestamps_in_window())
    i = draw(st.integers(0, len(s)))
    how = draw(st.sampled_from(["drop", "insert", "upper", "trail"]))
    if how == "drop":
        return s[:i] + s[i + 1:]
    if how == "insert":
        return s[:i] + draw(st.sampled_from("0:.-T \n\u0661")) + s[i:]
    if how == "upper":
        return s.upper()
    return s + draw(st.sampled_from(["\n", " ", "0", "Z"]))


timestamps = st.one_of(timestamps_in_window(), timestamps_from_parts(), mangled_timestamps())


def valid_value(spec: dict[str, Any]) -> st.SearchStrategy[Any]:
    if spec["type"] == "object":
        if "additionalProperties" in spec:
            return st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)
        return st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    if spec.get("format") == "date-time":
        return timestamps_in_window()
    return valid_strings(spec)


def any_value(spec: dict[str, Any]) -> st.SearchStrategy[Any]:
    if spec["type"] == "object":
        non_string_values = st.dictionaries(st.text(max_size=4), wrong_types, min_size=1, max_size=2)
        mixed = st.builds(lambda a, b: {**a, **b}, valid_value(spec), non_string_values)
        return st.one_of(valid_value(spec), non_string_values, mixed, mixed, wrong_types, st.text(max_size=4))
    strings = timestamps if spec.get("format") == "date-time" else edge_strings(spec)
    return st.one_of(strings, strings, wrong_types)


@cache
def field_strategies(schema_file: str) -> dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    """(valid, anything) per property, built once: strategy construction (from_regex) is the slow part."""
    props = load_schema(schema_file)["properties"]
    return {name: (valid_value(spec), any_value(spec)) for name, spec in props.items()}


@st.composite
def documents(draw: st.DrawFn, schema_file: str) -> Any:
    schema = load_schema(schema_file)
    props: dict[str, Any] = schema["properties"]
    required = set(schema["required"])
    fields = field_strategies(schema_file)
    if draw(st.integers(0, 49)) == 0:
        return draw(wrong_types.filter(lambda v: not isinstance(v, dict)))
    doc = {name: draw(fields[name][0]) for name in props if name in required or draw(st.booleans())}
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):  # mostly one change, so it is the one that counts
        name = draw(st.sampled_from(sorted(props)))
        action = draw(st.sampled_from(["drop", "replace", "replace", "replace", "extra"]))
        if action == "drop":
            doc.pop(name, None)
        elif action == "replace":
            doc[name] = draw(fields[name][1])
        else:
            extra = draw(st.sampled_from(["extra", name.upper(), name + " ", "", "x\x00"]) | st.text(max_size=6))
            if extra not in props:
                doc[extra] = draw(json_values)
    return doc


# --- the properties -----------------------------------------------------------------------------------------

def instant_of(text: str) -> datetime:
    """Independent reading of an oracle-valid date-time (layout fixed by the schema's pattern)."""
    s = text.upper()
    base = datetime.fromisoformat(f"{s[:10]}T{s[11:19]}")
    rest = s[19:]
    frac, offset = "", rest
    if rest.startswith("."):
        frac = rest[1:].split("Z")[0].split("+")[0].split("-")[0]
        offset = rest[1 + len(frac):]
    if offset == "Z":
        tz = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    return base.replace(microsecond=int(frac[:6].ljust(6, "0")) if frac else 0, tzinfo=tz)


def check_agreement(stream: Stream, doc: Any) -> None:
    ecma, stock = oracles(stream)
    c = contract(stream)
    expected = ecma.is_valid(doc)
    if stock.is_valid(doc) != expected:  # the only allowed difference: Python's `$` before a final newline
        assert any(isinstance(v, str) and v.endswith("\n") for v in doc.values()), doc
    try:
        c.validate_schema_only(doc)
        accepted, why = True, None
    except Rejected as rej:
        accepted, why = False, rej.reason
    assert accepted == expected, (doc, why, [e.message for e in ecma.iter_errors(doc)])
    if not isinstance(doc, dict):  # extract() only ever sees decoded objects
        assert why is Reason.NOT_OBJECT
        return
    if not accepted:
        assert why in SCHEMA_REASONS
        with pytest.raises(Rejected) as info:
            c.extract(doc, NOW)
        assert info.value.reason is why
        return
    when = instant_of(doc["occurred_at"])
    if not NOW - WINDOW.max_age <= when <= NOW + WINDOW.max_ahead:
        with pytest.raises(Rejected) as info:
            c.extract(doc, NOW)
        assert info.value.reason in {Reason.TIMESTAMP_TOO_OLD, Reason.TIMESTAMP_IN_FUTURE}
        return
    values = c.extract(doc, NOW)
    assert len(values) == len(stream.columns)
    for column, value in zip(stream.columns, values, strict=True):
        if column not in doc:
            assert value is None
        elif column == "occurred_at":
            assert value == when and value.utcoffset() == when.utcoffset()
        elif isinstance(doc[column], dict):
            assert isinstance(value, bytes) and orjson.loads(value) == doc[column]
        else:
            assert value == doc[column]


FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = {"tenant_id": "t", "idempotency_key": "k", "event_type": "e", "source": "s", "action": "a",
        "actor_id": "u", "payload": {}, "occurred_at": "2024-06-15T11:00:00Z"}
FIELDS = [(stream, name) for stream in STREAMS for name in load_schema(stream.schema_file)["properties"]]


@FAST
@given(doc=documents(WEBHOOK.schema_file))
def test_webhook_contract_agrees_with_jsonschema(doc: Any) -> None:
    check_agreement(WEBHOOK, doc)


@FAST
@given(doc=documents(AUDIT.schema_file))
def test_audit_contract_agrees_with_jsonschema(doc: Any) -> None:
    check_agreement(AUDIT, doc)


@settings(max_examples=800, deadline=None)
@given(data=st.data())
def test_single_field_agreement(data: st.DataObject) -> None:
    """One property changed on an otherwise valid document, so that property alone decides."""
    stream, name = data.draw(st.sampled_from(FIELDS), label="field")
    check_agreement(stream, {**BASE, name: data.draw(field_strategies(stream.schema_file)[name][1], label=name)})


@settings(max_examples=300, deadline=None)
@given(stream=st.sampled_from(STREAMS), headers=st.dictionaries(st.text(max_size=4), st.text(max_size=4) | wrong_types,
                                                               max_size=3))
def test_string_map_agreement(stream: Stream, headers: dict[str, Any]) -> None:
    field = "headers" if stream is WEBHOOK else "metadata"  # additionalProperties: string vs anything
    check_agreement(stream, {**BASE, field: headers})


@settings(max_examples=400, deadline=None)
@given(stream=st.sampled_from(STREAMS), ts=timestamps)
def test_occurred_at_agreement(stream: Stream, ts: str) -> None:
    check_agreement(stream, {**BASE, "occurred_at": ts})


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
@pytest.mark.parametrize("ts", [
    "2024-06-15T11:00:00Z", "2024-06-15t11:00:00z", "2024-06-15T11:00:00.123456789+23:59",
    "2024-06-15T11:00:00-00:00", "2024-02-30T11:00:00Z", "2024-06-15T11:00:00", "2024-06-15 11:00:00Z",
    "2024-06-15T11:00:00+24:00", "2024-06-15T11:00:00.1234567890Z", "2024-06-15T11:00:00Z\n",
    "0000-06-15T11:00:00Z", "2024-06-15T11:00:60Z", "2024-13-15T11:00:00Z",
])
def test_occurred_at_examples(stream: Stream, ts: str) -> None:
    check_agreement(stream, {**BASE, "occurred_at": ts})


def test_generators_reach_both_outcomes() -> None:
    """Guard against a vacuous property: the document strategy must produce valid and invalid docs."""
    ecma, _ = oracles(WEBHOOK)
    seen: set[bool] = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(doc=documents(WEBHOOK.schema_file))
    def probe(doc: Any) -> None:
        seen.add(ecma.is_valid(doc))

    probe()
    assert seen == {True, False}
