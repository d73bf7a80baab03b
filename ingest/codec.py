"""Strict JSON decoding of one Kafka value, before any schema check.

Rules (each a dead-letter reason, see ``ingest.reject.Reason``): a null value is a tombstone; values larger than
``max_bytes`` are refused unread; the bytes must be UTF-8 JSON without lone surrogates; the top level must be an
object; object keys must be unique; integers must fit in 64 bits (orjson would silently turn them into floats);
nesting may not exceed ``max_depth``. ``\\u0000`` (which Postgres text/jsonb cannot hold) inside a top-level object
or array (``payload``, ``headers``, ``metadata``) follows ``nul_policy``; top-level keys and strings are never
altered, so the contract judges its own fields (they forbid control characters). A replacement that would merge
two keys of one object is a ``duplicate_key`` rejection, never a silent overwrite.

The common case costs one ``orjson.loads`` and one ``orjson.dumps``: when re-encoding the parsed object gives back
the exact input bytes, the input can have had neither duplicate keys nor numbers that lost precision. Only inputs
that are not compact orjson-style JSON pay for the slower exact check with the standard library parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from ingest.reject import Reason, Rejected

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class NulPolicy(StrEnum):
    """What to do with U+0000 inside strings and keys (Postgres cannot store it)."""

    REJECT = "reject"
    REPLACE = "replace"  # with U+FFFD, the Unicode replacement character
    STRIP = "strip"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Transport limits applied before schema validation."""

    max_bytes: int
    max_depth: int
    nul_policy: NulPolicy


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded object; ``sanitized`` is True when the NUL policy changed it."""

    obj: dict[str, Any]
    sanitized: bool


def decode(raw: bytes | None, limits: DecodeLimits) -> Decoded:
    """Decode ``raw`` into a JSON object or raise ``Rejected`` with the reason; never raises anything else."""
    if raw is None:
        raise Rejected(Reason.TOMBSTONE, "Kafka record has a null value (tombstone)")
    if len(raw) > limits.max_bytes:
        raise Rejected(Reason.TOO_LARGE, f"value is {len(raw)} bytes, limit is {limits.max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _classify_decode_error(str(exc)) from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.NOT_OBJECT, f"top-level JSON value is {_json_type(obj)}, not an object")
    try:
        compact = orjson.dumps(obj) == raw
    except orjson.JSONEncodeError:  # nested deeper than orjson's encoder allows (254 levels)
        compact = False
    if not compact:
        _exact_check(raw)
    if raw.count(b"{") + raw.count(b"[") > limits.max_depth:
        depth = _depth(obj)
        if depth > limits.max_depth:
            raise Rejected(Reason.TOO_DEEP, f"nesting depth {depth} exceeds {limits.max_depth}")
    sanitized = False
    if b"\\u0000" in raw:
        obj, sanitized = _apply_nul_policy(obj, limits.nul_policy)
    return Decoded(obj, sanitized)


def _apply_nul_policy(obj: dict[str, Any], policy: NulPolicy) -> tuple[dict[str, Any], bool]:
    """Apply ``policy`` to the containers under the top level; return the object and whether it changed."""
    changed = False
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict | list) and _has_nul(value):
            if policy is NulPolicy.REJECT:
                raise Rejected(Reason.NUL_CHARACTER, f"{key[:64]!r} contains \\u0000")
            value = _replace_nul(value, "\ufffd" if policy is NulPolicy.REPLACE else "")
            changed = True
        out[key] = value
    return out, changed


def _classify_decode_error(message: str) -> Rejected:
    lowered = message.lower()
    if "utf-8" in lowered or "surrogate" in lowered:
        return Rejected(Reason.INVALID_UTF8, message)
    if "infinity" in lowered:
        return Rejected(Reason.UNREPRESENTABLE_NUMBER, message)
    if "depth limit" in lowered:
        return Rejected(Reason.TOO_DEEP, message)
    return Rejected(Reason.NOT_JSON, message)


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null"
    )


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Rejected(Reason.DUPLICATE_KEY, f"object key {key[:64]!r} appears more than once")
            seen.add(key)
    return result


def _parse_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise Rejected(Reason.UNREPRESENTABLE_NUMBER, f"integer {text[:40]} does not fit in 64 bits")
    return value


def _exact_check(raw: bytes) -> None:
    """Slow path: the standard parser sees every key pair and every integer literal."""
    try:
        json.loads(raw, object_pairs_hook=_pairs_hook, parse_int=_parse_int)
    except Rejected:
        raise
    except (ValueError, RecursionError):  # orjson already accepted it; nothing else to report
        return


def _depth(value: object) -> int:
    depth = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in item)
    return depth


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _replace_nul(value: Any, replacement: str) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", replacement)
    if isinstance(value, dict):
        out = {k.replace("\x00", replacement): _replace_nul(v, replacement) for k, v in value.items()}
        if len(out) != len(value):
            raise Rejected(Reason.DUPLICATE_KEY, "replacing \\u0000 would merge two keys of one object")
        return out
    if isinstance(value, list):
        return [_replace_nul(v, replacement) for v in value]
    return value
