"""A hot-path validator compiled from a published JSON Schema file.

Only the subset of JSON Schema that the contracts use is understood (``type``, ``required``, ``properties``,
``minLength``, ``maxLength``, ``pattern``, ``format: date-time`` and ``additionalProperties`` with a ``type``).
Any other keyword raises ``UnsupportedSchema`` at load time, so the hot path can never silently ignore a rule the
published file states. ``Contract.extract`` returns the column values in the order the caller asked for:
strings as ``str``, date-times as aware ``datetime``, objects as compact JSON ``bytes`` ready for a jsonb column.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from ingest.codec import DecodeLimits
from ingest.compiled import Compiled
from ingest.reject import Reason, Rejected

_ALLOWED_TOP = {"$schema", "$id", "title", "description", "type", "required", "properties"}
_ALLOWED_FIELD = {"type", "minLength", "maxLength", "pattern", "format", "additionalProperties", "description"}
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


class UnsupportedSchema(ValueError):
    """The schema uses a keyword the hot-path validator does not implement."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Accepted ``occurred_at`` range relative to ``now()``: older or newer events are dead-lettered."""

    max_age: timedelta
    max_ahead: timedelta


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with offset (nanoseconds are truncated to microseconds).

    Raises ``ValueError`` for anything else, including impossible dates such as 2023-02-29.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError("not an RFC 3339 date-time with offset")
    offset_minutes = m.group(11)
    if offset_minutes is None or offset_minutes < "60":
        # Fast path (C): same result on everything the pattern admitted, except lowercase t/z (handled below)
        # and offset minutes >= 60, which fromisoformat would wrongly accept.
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text)
    year, month, day, hour, minute, second, frac, zulu, sign, oh, om = m.groups()
    if zulu:
        tz = UTC
    else:
        if int(oh) > 23 or int(om) > 59:
            raise ValueError("offset out of range")
        delta = timedelta(hours=int(oh), minutes=int(om))
        tz = timezone(-delta if sign == "-" else delta)
    micro = int((frac or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz)


_Check = Callable[[Any], Any]


def _reason_for(field: str) -> Reason:
    if field == "tenant_id":
        return Reason.INVALID_TENANT_ID
    if field == "idempotency_key":
        return Reason.INVALID_IDEMPOTENCY_KEY
    return Reason.INVALID_FIELD


def _ecma_anchors(pattern: str) -> str:
    """Give ``$`` its ECMA-262 meaning (JSON Schema's regex dialect): the very end of the string.

    Python's ``$`` also matches just before a final newline, so ``^[a-z]+$`` would accept ``"abc\\n"``.
    """
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if pattern.startswith("^]", i + 1) or pattern.startswith("]", i + 1):  # leading ']' is literal
                skip = 3 if pattern[i + 1] == "^" else 2
                out.append(pattern[i:i + skip])
                i += skip
                continue
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
        i += 1
    return "".join(out)


def _string_check(field: str, spec: dict[str, Any]) -> _Check:
    lo = int(spec.get("minLength", 0))
    hi = spec.get("maxLength")
    pattern = re.compile(_ecma_anchors(spec["pattern"])) if "pattern" in spec else None
    is_datetime = spec.get("format") == "date-time"
    reason = Reason.INVALID_TIMESTAMP if is_datetime else _reason_for(field)

    def check(value: Any) -> Any:
        if type(value) is not str:
            raise Rejected(Reason.WRONG_TYPE, f"{field} must be a string")
        n = len(value)
        if n < lo or (hi is not None and n > hi):
            raise Rejected(reason, f"{field} must be {lo}..{hi} characters, got {n}")
        if pattern is not None and pattern.search(value) is None:
            raise Rejected(reason, f"{field} does not match {pattern.pattern}")
        if is_datetime:
            try:
                return parse_rfc3339(value)
            except ValueError as exc:
                raise Rejected(reason, f"{field}: {exc}") from None
        return value

    return check


def _object_check(field: str, spec: dict[str, Any]) -> _Check:
    extra = spec.get("additionalProperties")
    if extra is not None and extra != {"type": "string"}:
        raise UnsupportedSchema(f"{field}: only additionalProperties {{'type': 'string'}} is supported")

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise Rejected(Reason.WRONG_TYPE, f"{field} must be an object")
        if extra is not None:
            for key, item in value.items():
                if type(item) is not str:
                    raise Rejected(Reason.WRONG_TYPE, f"{field}.{key[:64]} must be a string")
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError as exc:  # decoded input: only nesting beyond 254 levels gets here
            raise Rejected(Reason.TOO_DEEP, f"{field} cannot be encoded: {exc}") from None

    return check


def _compile_field(field: str, spec: dict[str, Any]) -> _Check:
    unknown = set(spec) - _ALLOWED_FIELD
    if unknown:
        raise UnsupportedSchema(f"{field}: unsupported keywords {sorted(unknown)}")
    kind = spec.get("type")
    if kind == "string":
        if spec.get("format") not in (None, "date-time"):
            raise UnsupportedSchema(f"{field}: unsupported format {spec['format']!r}")
        return _string_check(field, spec)
    if kind == "object":
        if set(spec) & {"minLength", "maxLength", "pattern", "format"}:
            raise UnsupportedSchema(f"{field}: string keywords on an object")
        return _object_check(field, spec)
    raise UnsupportedSchema(f"{field}: unsupported type {kind!r}")


class Contract:
    """Validator for one event schema; call ``extract`` once per decoded object."""

    def __init__(self, schema: dict[str, Any], columns: Sequence[str], window: TimeWindow) -> None:
        unknown = set(schema) - _ALLOWED_TOP
        if unknown or schema.get("type") != "object":
            raise UnsupportedSchema(f"top level: unsupported keywords {sorted(unknown)} or type is not object")
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        missing = [c for c in columns if c not in props]
        if missing:
            raise UnsupportedSchema(f"columns {missing} are not properties of the schema")
        self.columns = tuple(columns)
        self.window = window
        self._schema = schema
        self._compiled: dict[DecodeLimits, Compiled] = {}
        self.required = tuple(sorted(required))
        checks = {name: _compile_field(name, spec) for name, spec in props.items()}
        # Validate every declared property (even ones not stored) so acceptance equals the schema's.
        self._plan = tuple((name, name in required, checks[name]) for name in props)
        self._index = {name: i for i, (name, _, _) in enumerate(self._plan)}
        self._out = tuple(self._index[c] for c in self.columns)
        self._time_fields = tuple(
            self._index[name] for name, spec in props.items() if spec.get("format") == "date-time"
        )

    def compiled(self, limits: DecodeLimits) -> Compiled:
        """The C-speed decoder for ``limits`` (built once): it accepts only what ``decode`` + ``extract`` accept,
        with the same values, and leaves every other record to them (see ``ingest.compiled``)."""
        fast = self._compiled.get(limits)
        if fast is None:
            fast = self._compiled[limits] = Compiled(self._schema, self.columns, limits, _ecma_anchors)
        return fast

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """The accepted ``occurred_at`` range at ``now`` (inclusive)."""
        return now - self.window.max_age, now + self.window.max_ahead

    def extract(self, obj: dict[str, Any], now: datetime) -> tuple[Any, ...]:
        """Return the column values of ``obj`` or raise ``Rejected``; ``now`` anchors the time window."""
        values: list[Any] = []
        append = values.append
        for name, required, check in self._plan:
            value = obj.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    raise Rejected(Reason.MISSING_FIELD, f"required field {name} is missing")
                append(None)
            else:
                append(check(value))
        for i in self._time_fields:
            ts = values[i]
            if ts is None:
                continue
            if ts < now - self.window.max_age:
                raise Rejected(Reason.TIMESTAMP_TOO_OLD, f"{self._plan[i][0]} {ts.isoformat()} is older than "
                               f"the accepted window ({self.window.max_age.days} days)")
            if ts > now + self.window.max_ahead:
                raise Rejected(Reason.TIMESTAMP_IN_FUTURE, f"{self._plan[i][0]} {ts.isoformat()} is more than "
                               f"{self.window.max_ahead} ahead of now")
        return tuple(values[i] for i in self._out)

    def validate_schema_only(self, obj: Any) -> None:
        """Check ``obj`` against the schema alone (no time window); raise ``Rejected`` if it fails."""
        if type(obj) is not dict:
            raise Rejected(Reason.NOT_OBJECT, "not an object")
        for name, required, check in self._plan:
            value = obj.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    raise Rejected(Reason.MISSING_FIELD, f"required field {name} is missing")
            else:
                check(value)


_MISSING: Any = object()
