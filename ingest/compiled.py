"""A C-speed decoder for the common case, compiled per stream from the same JSON Schema as ``Contract``.

``Compiled.extract_many`` takes a batch of raw Kafka values and returns, for each, the contract's column values
or ``None``. ``None`` means "not proven valid here": the caller then runs the exact path (``codec.decode`` then
``Contract.extract``), which decides and names the reason. The rule that keeps every guarantee: this module only
*accepts* a record when the exact path would accept it with the very same values, so acceptance, reject
reasons and stored values are those of the exact path by construction.

A record is accepted when all of these hold (checks that can run once per batch do):

- it is at most ``max_bytes``, contains no ``\\u0000`` escape, and has no more ``{``/``[`` bytes than
  ``max_depth`` (so no depth, NUL-policy or size question arises);
- a msgspec ``Struct`` generated from the schema decodes it: every required property present, strings of the
  declared length (code points, like ``len``), object properties kept as the exact JSON bytes (``msgspec.Raw``),
  unknown properties skipped;
- ``orjson.dumps(orjson.loads(raw)) == raw`` (the codec's own fast-path test): the input had no duplicate key and
  no integer outside 64 bits, and, being compact orjson output, each object property's bytes are exactly what the
  exact path would store (``orjson.dumps`` of that object);
- per batch: each ``^[class]+$`` pattern as one search for a forbidden character over the column's joined values
  (other patterns per value), ``additionalProperties: {"type": "string"}`` as one ``msgspec.convert`` of the
  column, date-times by a strict uppercase RFC 3339 regex then ``datetime.fromisoformat`` (the exact path's
  own fast path), and the time window as the column's min and max.

Any doubt about a whole batch column falls back to per-value checks for that column only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import repeat
from operator import attrgetter
from typing import Annotated, Any

import msgspec
import orjson

from ingest.codec import DecodeLimits

# RFC 3339 with an uppercase T and Z and an offset inside +-23:59: on these, ``contract.parse_rfc3339`` is exactly
# ``datetime.fromisoformat`` (lowercase and out-of-range offsets take the exact path).
_STRICT_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
# ``^[class]+$`` (one bracket class, no nested brackets): checkable as "no character outside the class".
_STRICT_TIMES = re.compile(f"(?:{_STRICT_TIME.pattern}\n)*")  # a whole column joined by newlines, in one call
_CLASS_PATTERN = re.compile(r"\^\[(\^?)((?:\\.|[^\]\\])+)\]\+\$")
_STRING_MAPS = msgspec.json.Decoder(list[dict[str, str]]).decode
_STRING_MAP = msgspec.json.Decoder(dict[str, str]).decode


def _is_string_map(raw: bytes) -> bool:
    try:
        _STRING_MAP(raw)
    except msgspec.DecodeError:
        return False
    return True
_DECODE_ERRORS = (msgspec.DecodeError, orjson.JSONDecodeError, orjson.JSONEncodeError)


class _StringColumn:
    """Per-batch check of one string property's pattern (lengths are checked by msgspec)."""

    def __init__(self, pattern: str | None, ecma: Callable[[str], str]) -> None:
        self.forbidden: re.Pattern[str] | None = None
        self.full: re.Pattern[str] | None = None
        self.joined: re.Pattern[str] | None = None  # the whole column joined by newlines, one call
        if pattern is None:
            return
        m = _CLASS_PATTERN.fullmatch(pattern)
        if m is not None:
            negated, body = m.groups()
            self.forbidden = re.compile(f"[{body}]" if negated else f"[^{body}]")
        else:
            self.full = re.compile(ecma(pattern))
            body = _joinable(pattern)
            if body is not None:
                self.joined = re.compile(f"(?:(?:{body})\n)*")

    def bad(self, column: list[str | None]) -> set[int]:
        """Indexes of values that fail the pattern (``None``: absent, not checked here)."""
        if None in column:
            present = [(j, v) for j, v in enumerate(column) if v is not None]
            return {present[k][0] for k in self._bad([v for _, v in present])}
        return self._bad(column)  # type: ignore[arg-type]  # no None in it

    def _bad(self, values: list[str]) -> set[int]:
        if self.forbidden is not None:
            if self.forbidden.search("".join(values)) is None:
                return set()
            search = self.forbidden.search
            return {i for i, v in enumerate(values) if search(v) is not None}
        if self.full is not None:
            search = self.full.search
            if self.joined is not None:
                text = "\n".join(values) + "\n"
                if text.count("\n") == len(values) and self.joined.fullmatch(text) is not None:
                    return set()
            elif all(map(search, values)):
                return set()
            return {i for i, v in enumerate(values) if search(v) is None}
        return set()


_SAFE_ESCAPES = frozenset(".d+-:/")


def _joinable(pattern: str) -> str | None:
    """The body of ``^BODY$`` when BODY can never match a string containing a newline and has no top-level
    ``|`` (so a column joined by newlines matches ``(?:BODY\\n)*`` exactly when every value matches), else None.
    Conservative: no negated class, no escape beyond ``\\. \\d \\+ \\- \\: \\/``, no other anchor."""
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or pattern.endswith("\\$"):
        return None
    body = pattern[1:-1]
    depth, i, in_class = 0, 0, False
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if body[i + 1:i + 2] not in _SAFE_ESCAPES or i + 1 >= len(body):
                return None
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            if body.startswith("[^", i):
                return None
            in_class = True
        elif ch in "^$":
            return None
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return None
        i += 1
    return body if depth == 0 and not in_class else None


def _min_length(spec: dict[str, Any]) -> int:
    lo = int(spec.get("minLength", 0))
    return max(lo, 1) if _CLASS_PATTERN.fullmatch(spec.get("pattern", "")) else lo  # "+": at least one


class Compiled:
    """The fast decoder for one contract and one set of decode limits; see the module rules."""

    def __init__(self, schema: dict[str, Any], columns: Sequence[str], limits: DecodeLimits,
                 ecma: Callable[[str], str]) -> None:
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        self.limits = limits
        fields: list[tuple[str, Any, Any] | tuple[str, Any]] = []
        self._strings: list[tuple[int, _StringColumn]] = []
        self._times: list[int] = []
        self._objects: list[int] = []
        self._string_maps: list[int] = []
        self._names = tuple(props)
        for i, (name, spec) in enumerate(props.items()):
            if spec.get("type") == "object":
                kind: Any = msgspec.Raw
                self._objects.append(i)
                if spec.get("additionalProperties") is not None:
                    self._string_maps.append(i)
            else:
                meta = msgspec.Meta(min_length=_min_length(spec), max_length=spec.get("maxLength"))
                kind = Annotated[str, meta]
                self._strings.append((i, _StringColumn(spec.get("pattern"), ecma)))
                if spec.get("format") == "date-time":
                    self._times.append(i)
            fields.append((name, kind) if name in required else (name, kind, None))
        fields.sort(key=lambda f: len(f) == 3)  # required fields first (msgspec's rule for defaults)
        struct = msgspec.defstruct("Event", fields, kw_only=True)
        self._decode = msgspec.json.Decoder(struct).decode
        self._out = tuple(self._names.index(c) for c in columns)
        self._getters = tuple(attrgetter(n) for n in self._names)

    def extract_many(self, values: Sequence[bytes | None], now: datetime,
                     window: tuple[datetime, datetime]) -> list[tuple[Any, ...] | None]:
        """Column values for each raw value proven valid, else ``None`` (take the exact path)."""
        max_bytes, max_depth = self.limits.max_bytes, self.limits.max_depth
        decode, loads, dumps = self._decode, orjson.loads, orjson.dumps
        events: list[Any] = []
        index: list[int] = []  # position in ``values`` of each event
        for pos, raw in enumerate(values):
            if (raw is None or len(raw) > max_bytes or raw.count(b"{") + raw.count(b"[") > max_depth
                    or (b"\\" in raw and b"\\u0000" in raw)):  # a one-byte memchr first: most events have no escape
                continue
            try:
                event = decode(raw)
                if dumps(loads(raw)) != raw:  # the parsed object is dropped at once: keeping it costs more
                    continue
            except _DECODE_ERRORS:
                continue
            events.append(event)
            index.append(pos)
        bad: set[int] = set()
        columns = [list(map(getter, events)) for getter in self._getters]  # one C pass per property
        for i in self._objects:
            bad.update(_object_column(columns, i))
        for i in self._string_maps:
            bad.update(_string_map_column(columns[i]))
        for i, column in self._strings:
            bad.update(column.bad(columns[i]))
        for i in self._times:
            bad.update(_time_column(columns, i, window))
        out: list[tuple[Any, ...] | None] = [None] * len(values)
        for j, row in enumerate(zip(*[columns[k] for k in self._out], strict=True)):
            out[index[j]] = row
        for j in bad:
            out[index[j]] = None
        return out


def _object_column(columns: list[list[Any]], i: int) -> set[int]:
    """``msgspec.Raw`` -> ``bytes`` in place; a value that is not an object fails."""
    raws = columns[i]
    if None in raws:
        col: list[bytes | None] = [None if r is None else bytes(r) for r in raws]
    else:
        col = list(map(bytes, raws))
    columns[i] = col
    if None not in col and all(map(bytes.startswith, col, repeat(b"{"))):  # type: ignore[arg-type]
        return set()
    return {j for j, v in enumerate(col) if v is not None and v[:1] != b"{"}


def _string_map_column(col: list[bytes | None]) -> set[int]:
    present = [(j, v) for j, v in enumerate(col) if v is not None]
    try:  # every map of the batch as one JSON array, one C call
        _STRING_MAPS(b"[" + b",".join([v for _, v in present]) + b"]")
    except msgspec.DecodeError:
        return {j for j, v in present if not _is_string_map(v)}
    return set()


def _time_column(columns: list[list[Any]], i: int, window: tuple[datetime, datetime]) -> set[int]:
    """Parse column ``i`` in place; return the rows that fail. One pass in C when every value is fine."""
    lo, hi = window
    texts = columns[i]
    if None not in texts and _STRICT_TIMES.fullmatch("\n".join(texts) + "\n") is not None:
        try:
            parsed = list(map(datetime.fromisoformat, texts))
        except ValueError:
            pass
        else:
            columns[i] = parsed
            if not parsed or (lo <= min(parsed) and max(parsed) <= hi):
                return set()
            return {j for j, ts in enumerate(parsed) if not lo <= ts <= hi}
    bad: set[int] = set()
    out: list[datetime | None] = []
    for j, text in enumerate(texts):
        ts = None
        if text is not None:
            try:
                if _STRICT_TIME.fullmatch(text) is None:
                    raise ValueError(text)
                ts = datetime.fromisoformat(text)
                if not lo <= ts <= hi:
                    bad.add(j)
            except ValueError:
                bad.add(j)
        out.append(ts)
    columns[i] = out
    return bad
