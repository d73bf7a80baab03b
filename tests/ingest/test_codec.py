"""ingest.codec.decode: one test per rejection class, with the exact Reason."""

from __future__ import annotations

import dataclasses
import json

import pytest

from consumers.settings import from_env
from ingest.codec import DecodeLimits, NulPolicy, decode
from ingest.reject import Reason, Rejected

LIMITS = from_env({}).decode


def reason_of(raw: bytes | None, limits: DecodeLimits = LIMITS) -> Reason:
    with pytest.raises(Rejected) as info:
        decode(raw, limits)
    return info.value.reason


def test_tombstone() -> None:
    assert reason_of(None) is Reason.TOMBSTONE


def test_too_large_uses_the_configured_limit() -> None:
    limits = dataclasses.replace(LIMITS, max_bytes=64)
    at_limit = b'{"a":"' + b"x" * (64 - 8) + b'"}'
    assert len(at_limit) == 64
    assert decode(at_limit, limits).obj == {"a": "x" * 56}
    assert reason_of(at_limit + b" ", limits) is Reason.TOO_LARGE
    # refused unread: even garbage is "too large", not "not json"
    assert reason_of(b"\xff" * 65, limits) is Reason.TOO_LARGE


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":}', b"{'a': 1}", b'{"a":NaN}', b'{"a":1,}', b"nope"])
def test_not_json(raw: bytes) -> None:
    assert reason_of(raw) is Reason.NOT_JSON


@pytest.mark.parametrize("raw", [b'{"a":"\xff"}', b'{"\xfe":1}', b'{"a":"\xc3"}', b'{"a":"\\ud800"}',
                                 b'{"a":"\\udc00"}', b'{"a":"\\ud800x"}'])
def test_invalid_utf8_and_lone_surrogates(raw: bytes) -> None:
    assert reason_of(raw) is Reason.INVALID_UTF8


def test_surrogate_pair_is_fine() -> None:
    assert decode(b'{"a":"\\ud83d\\ude00"}', LIMITS).obj == {"a": "\U0001f600"}


@pytest.mark.parametrize("raw", [b"[]", b'[{"a":1}]', b'"s"', b"1", b"-1.5", b"null", b"true"])
def test_not_object(raw: bytes) -> None:
    assert reason_of(raw) is Reason.NOT_OBJECT


@pytest.mark.parametrize("raw", [
    b'{"a":1,"a":2}',                       # top level, compact
    b'{"a": 1, "a": 2}',                    # top level, spaced
    b'{"a":1,"a":1}',                       # same value twice still counts
    b'{"b":{"a":1,"a":2}}',                 # nested, compact
    b'{"b": {"a": 1, "a": 2}}',             # nested, spaced
    b'{"b":[{"x":1},{"a":1,"a":2}]}',       # inside an array
    b'{"\\u0061":1,"a":2}',                 # same key, spelled differently
])
def test_duplicate_key(raw: bytes) -> None:
    assert reason_of(raw) is Reason.DUPLICATE_KEY


def test_same_key_in_sibling_objects_is_not_duplicate() -> None:
    assert decode(b'{"a":{"k":1},"b":{"k":2}}', LIMITS).obj == {"a": {"k": 1}, "b": {"k": 2}}


@pytest.mark.parametrize("literal", [str(2**64), str(-(2**63) - 1), str(10**30), "1e400", "-1e400", "1E400",
                                     "1" + "0" * 400, "1" + "0" * 5000])
@pytest.mark.parametrize("spaced", [False, True])
def test_unrepresentable_number(literal: str, spaced: bool) -> None:
    raw = (f'{{"a": {literal}}}' if spaced else f'{{"a":{literal}}}').encode()
    assert reason_of(raw) is Reason.UNREPRESENTABLE_NUMBER


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 0, 2**63])
def test_64_bit_bounds_are_exact(value: int) -> None:
    for raw in (f'{{"a":{value}}}'.encode(), f'{{"a": {value}}}'.encode()):
        got = decode(raw, LIMITS).obj["a"]
        assert type(got) is int
        assert got == value


def nested(depth: int) -> bytes:
    """An object whose nesting depth (the top-level object counts as 1) is ``depth``."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_too_deep_at_the_limit() -> None:
    limits = dataclasses.replace(LIMITS, max_depth=8)
    assert decode(nested(8), limits).obj is not None
    assert reason_of(nested(9), limits) is Reason.TOO_DEEP
    assert reason_of(b'{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{}}}}}}}}}', limits) is Reason.TOO_DEEP


@pytest.mark.parametrize("depth", [255, 300, 1023, 1025, 5000])
def test_very_deep_is_too_deep_not_a_crash(depth: int) -> None:
    # 255+ levels used to make orjson.dumps raise TypeError out of decode()
    assert reason_of(nested(depth)) is Reason.TOO_DEEP


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    limits = dataclasses.replace(LIMITS, max_depth=4)
    raw = json.dumps({"a": "[" * 50 + "{" * 50, "b": [{"c": "]]]"}]}).encode()
    assert raw.count(b"[") + raw.count(b"{") > 4
    assert decode(raw, limits).obj["a"] == "[" * 50 + "{" * 50


def test_nul_reject() -> None:
    limits = dataclasses.replace(LIMITS, nul_policy=NulPolicy.REJECT)
    assert reason_of(b'{"p":{"a":"x\\u0000y"}}', limits) is Reason.NUL_CHARACTER
    assert reason_of(b'{"p":{"k\\u0000":1}}', limits) is Reason.NUL_CHARACTER
    assert reason_of(b'{"a": ["x", {"b": "\\u0000"}]}', limits) is Reason.NUL_CHARACTER


@pytest.mark.parametrize("policy", list(NulPolicy))
def test_top_level_keys_and_strings_are_left_to_the_schema(policy: NulPolicy) -> None:
    """Contract fields are top-level strings: the schema (no control characters) must see the NUL and refuse."""
    d = decode(b'{"event_type":"a\\u0000b","tenant_id\\u0000":"x"}', dataclasses.replace(LIMITS, nul_policy=policy))
    assert d.obj == {"event_type": "a\x00b", "tenant_id\x00": "x"}
    assert d.sanitized is False


def test_nul_replace() -> None:
    limits = dataclasses.replace(LIMITS, nul_policy=NulPolicy.REPLACE)
    d = decode(b'{"a":"x\\u0000y","p":{"k\\u0000":["\\u0000"]}}', limits)
    assert d.obj == {"a": "x\x00y", "p": {"k\ufffd": ["\ufffd"]}}
    assert d.sanitized is True


def test_nul_strip() -> None:
    limits = dataclasses.replace(LIMITS, nul_policy=NulPolicy.STRIP)
    d = decode(b'{"p": {"a": "x\\u0000y", "k\\u0000": {"n": "\\u0000\\u0000"}}}', limits)
    assert d.obj == {"p": {"a": "xy", "k": {"n": ""}}}
    assert d.sanitized is True


@pytest.mark.parametrize(("policy", "raw"), [
    (NulPolicy.REPLACE, b'{"p":{"a\\u0000":1,"a\\ufffd":2}}'),
    (NulPolicy.STRIP, b'{"p":{"a\\u0000":1,"a":2}}'),
])
def test_sanitising_never_merges_keys(policy: NulPolicy, raw: bytes) -> None:
    assert reason_of(raw, dataclasses.replace(LIMITS, nul_policy=policy)) is Reason.DUPLICATE_KEY


def test_default_policy_is_replace() -> None:
    assert decode(b'{"p":{"a":"\\u0000"}}', LIMITS).obj == {"p": {"a": "\ufffd"}}


@pytest.mark.parametrize("policy", list(NulPolicy))
def test_escaped_backslash_then_u0000_text_is_not_nul(policy: NulPolicy) -> None:
    raw = b'{"a":"\\\\u0000"}'  # JSON text {"a":"\\u0000"}: a backslash followed by the characters u0000
    assert raw == json.dumps({"a": "\\u0000"}).replace(" ", "").encode()
    d = decode(raw, dataclasses.replace(LIMITS, nul_policy=policy))
    assert d.obj == {"a": "\\u0000"}
    assert d.sanitized is False


@pytest.mark.parametrize("policy", list(NulPolicy))
def test_no_nul_means_not_sanitized(policy: NulPolicy) -> None:
    d = decode(b'{"a":"plain"}', dataclasses.replace(LIMITS, nul_policy=policy))
    assert d.obj == {"a": "plain"} and d.sanitized is False


def test_compact_and_spaced_json_decode_equal() -> None:
    value = {"t": "x", "n": [1, -2, 3.5, 2**63, None, True, False], "o": {"é": "\U0001f600", "e": {}}}
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    spaced = json.dumps(value, indent=2).encode()
    assert compact != spaced
    a, b = decode(compact, LIMITS), decode(spaced, LIMITS)
    assert a.obj == b.obj == value
    assert not a.sanitized and not b.sanitized
