"""Hostile input among valid traffic: every record is accounted for, with its exact reason and original bytes.

The corpus below is interleaved with 6,000 valid events in the same batches and drained once by the real CLI
(``python -m consumers.cli consume --stream all --drain``). Afterwards each valid event is stored exactly once,
each hostile record is either stored after the documented sanitisation or is a dead letter carrying its exact
bytes, Kafka key, source partition/offset and the expected ``Reason``, and stored + duplicates + dead letters
equals what was published.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumers import settings, streams
from consumers.cli import sample
from ingest import kafka_options, ledger
from ingest.codec import NulPolicy
from ingest.config import Config
from ingest.pipeline import prepare
from ingest.reject import Reason
from tests.integration.helpers import drain, offsets_total, stored_keys, unique_keys

R = Reason
TENANT = "org-hostile"
AUTO = "auto"  # Case.key: a distinct key per record
DROP: Any = object()  # event(): remove the field
MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """A small message limit so that a ~100 KiB record is ``too_large``."""
    return {**env, "INGEST_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)}


# -- the corpus ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One hostile record; ``expect`` None means stored (after documented sanitisation), checked by ``check``."""

    name: str
    value: bytes | None
    expect: Reason | None
    stream: str = "webhook"
    key: bytes | str | None = AUTO
    check: Callable[[dict[str, Any]], bool] | None = field(default=None, compare=False)


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds")


def event(name: str, now: datetime, stream: str = "webhook", **changes: Any) -> dict[str, Any]:
    """A valid event of ``stream`` (idempotency key ``hostile-<name>``) with ``changes`` applied."""
    if stream == "webhook":
        e: dict[str, Any] = {"tenant_id": TENANT, "idempotency_key": f"hostile-{name}", "event_type": "invoice.paid",
                             "source": "stripe", "occurred_at": iso(now), "payload": {"id": name, "amount": 1},
                             "headers": {"x-try": "1"}}
    else:
        e = {"tenant_id": TENANT, "idempotency_key": f"hostile-{name}", "action": "user.login",
             "actor_id": "user_1", "occurred_at": iso(now), "resource": "api_key:key_1", "ip": "10.0.0.1",
             "metadata": {"mfa": True}}
    for k, v in changes.items():
        if v is DROP:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def j(obj: Any) -> bytes:
    return orjson.dumps(obj)


def spaced(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, indent=indent, ensure_ascii=False).encode()


def patched(name: str, now: datetime, old: bytes, new: bytes, **changes: Any) -> bytes:
    """A compact valid event whose bytes ``old`` are replaced by ``new`` (exactly once)."""
    raw = j(event(name, now, **changes))
    assert raw.count(old) == 1, (name, raw)
    return raw.replace(old, new)


def nested(levels: int, leaf: Any = 1, kind: str = "object") -> Any:
    value = leaf
    for _ in range(levels):
        value = {"n": value} if kind == "object" else [value]
    return value


def webhook_corpus(now: datetime) -> list[Case]:
    def ev(name: str, **changes: Any) -> bytes:
        return j(event(name, now, **changes))

    def has(column: str, text: str) -> Callable[[dict[str, Any]], bool]:
        return lambda row: text in str(row[column])

    required = ("tenant_id", "idempotency_key", "event_type", "source", "occurred_at", "payload")
    depth32 = nested(31)  # payload is level 2: 1 (top) + 31 = 32 levels in all, the limit
    return [
        # -- not JSON
        Case("empty", b"", R.NOT_JSON),
        Case("whitespace", b" \n\t ", R.NOT_JSON),
        Case("plain-text", b"hello, world", R.NOT_JSON),
        Case("truncated", ev("truncated")[:-20], R.NOT_JSON),
        Case("trailing-garbage", ev("trailing-garbage") + b" trailing", R.NOT_JSON),
        Case("two-documents", ev("two-docs-1") + ev("two-docs-2"), R.NOT_JSON),
        Case("single-quotes", ev("single-quotes").replace(b'"', b"'"), R.NOT_JSON),
        Case("trailing-comma", ev("trailing-comma")[:-1] + b",}", R.NOT_JSON),
        Case("unquoted-key", patched("unquoted-key", now, b'"source"', b"source"), R.NOT_JSON),
        Case("nan", patched("nan", now, b'"amount":1', b'"amount":NaN'), R.NOT_JSON),
        Case("infinity-literal", patched("inf", now, b'"amount":1', b'"amount":Infinity'), R.NOT_JSON),
        Case("raw-nul-byte", patched("raw-nul", now, b"stripe", b"str\x00ipe"), R.NOT_JSON),
        Case("bad-escape", patched("bad-escape", now, b"stripe", b"str\\x69pe"), R.NOT_JSON),
        Case("comment", b"// a webhook\n" + ev("comment"), R.NOT_JSON),
        # -- not UTF-8 / lone surrogates
        Case("utf8-ff", patched("utf8-ff", now, b"stripe", b"str\xffipe"), R.INVALID_UTF8),
        Case("utf8-overlong", patched("utf8-overlong", now, b"stripe", b"str\xc0\xafipe"), R.INVALID_UTF8),
        Case("utf8-encoded-surrogate", patched("utf8-sur", now, b"stripe", b"str\xed\xa0\x80ipe"),
             R.INVALID_UTF8),
        Case("utf8-truncated-sequence", patched("utf8-trunc", now, b"stripe", b"str\xe2\x82ipe"), R.INVALID_UTF8),
        Case("latin1", patched("latin1", now, b"invoice.paid", b"factur\xe9e"), R.INVALID_UTF8),
        Case("bom", b"\xef\xbb\xbf" + ev("bom"), R.INVALID_UTF8),
        Case("lone-high-surrogate-escape", patched("lone-high", now, b"stripe", b"str\\ud800ipe"), R.INVALID_UTF8),
        Case("lone-low-surrogate-escape", patched("lone-low", now, b"stripe", b"str\\udc00ipe"), R.INVALID_UTF8),
        # -- JSON, but not an object
        Case("array", j([event("array", now)]), R.NOT_OBJECT),
        Case("string", b'"org-hostile"', R.NOT_OBJECT),
        Case("number", b"42", R.NOT_OBJECT),
        Case("null", b"null", R.NOT_OBJECT),
        Case("true", b"true", R.NOT_OBJECT),
        Case("false", b"false", R.NOT_OBJECT),
        # -- missing required fields
        *[Case(f"missing-{f}", ev(f"missing-{f}", **{f: DROP}), R.MISSING_FIELD) for f in required],
        Case("empty-object", b"{}", R.MISSING_FIELD),
        Case("audit-event-on-webhook-topic", j(event("audit-on-webhook", now, "audit")), R.MISSING_FIELD),
        # -- wrong types
        Case("tenant-number", ev("tenant-number", tenant_id=12345), R.WRONG_TYPE),
        Case("idem-bool", ev("idem-bool", idempotency_key=True), R.WRONG_TYPE),
        Case("event-type-array", ev("event-type-array", event_type=["invoice.paid"]), R.WRONG_TYPE),
        Case("source-null", ev("source-null", source=None), R.WRONG_TYPE),
        Case("occurred-at-epoch", ev("occurred-at-epoch", occurred_at=int(now.timestamp())), R.WRONG_TYPE),
        Case("payload-string", ev("payload-string", payload="{}"), R.WRONG_TYPE),
        Case("payload-array", ev("payload-array", payload=[1, 2]), R.WRONG_TYPE),
        Case("payload-null", ev("payload-null", payload=None), R.WRONG_TYPE),
        Case("headers-string", ev("headers-string", headers="x-try: 1"), R.WRONG_TYPE),
        Case("headers-array", ev("headers-array", headers=[["x-try", "1"]]), R.WRONG_TYPE),
        Case("header-value-int", ev("header-value-int", headers={"x-try": 1}), R.WRONG_TYPE),
        Case("header-value-null", ev("header-value-null", headers={"x-try": None}), R.WRONG_TYPE),
        Case("header-value-object", ev("header-value-object", headers={"x-try": {"n": "1"}}), R.WRONG_TYPE),
        Case("header-value-bool", ev("header-value-bool", headers={"x-try": True}), R.WRONG_TYPE),
        # -- tenant_id
        Case("tenant-empty", ev("tenant-empty", tenant_id=""), R.INVALID_TENANT_ID),
        Case("tenant-65-chars", ev("tenant-65", tenant_id="t" * 65), R.INVALID_TENANT_ID),
        Case("tenant-space", ev("tenant-space", tenant_id="org hostile"), R.INVALID_TENANT_ID),
        Case("tenant-slash", ev("tenant-slash", tenant_id="org/hostile"), R.INVALID_TENANT_ID),
        Case("tenant-unicode", ev("tenant-unicode", tenant_id="org-hostilé"), R.INVALID_TENANT_ID),
        Case("tenant-nul", ev("tenant-nul", tenant_id="org\x00hostile"), R.INVALID_TENANT_ID),
        Case("tenant-trailing-newline", ev("tenant-newline", tenant_id="org-hostile\n"), R.INVALID_TENANT_ID),
        # -- idempotency_key
        Case("idem-empty", ev("idem-empty", idempotency_key=""), R.INVALID_IDEMPOTENCY_KEY),
        Case("idem-256-chars", ev("idem-256", idempotency_key="k" * 256), R.INVALID_IDEMPOTENCY_KEY),
        Case("idem-control-char", ev("idem-ctl", idempotency_key="hostile-\x01"), R.INVALID_IDEMPOTENCY_KEY),
        Case("idem-del", ev("idem-del", idempotency_key="hostile-\x7f"), R.INVALID_IDEMPOTENCY_KEY),
        Case("idem-non-ascii", ev("idem-non-ascii", idempotency_key="hostile-clé"), R.INVALID_IDEMPOTENCY_KEY),
        Case("idem-nul", ev("idem-nul", idempotency_key="hostile-\x00"), R.INVALID_IDEMPOTENCY_KEY),
        # -- other contract fields
        Case("event-type-empty", ev("event-type-empty", event_type=""), R.INVALID_FIELD),
        Case("event-type-129-chars", ev("event-type-129", event_type="e" * 129), R.INVALID_FIELD),
        Case("event-type-ansi-escape", ev("event-type-esc", event_type="\x1b[31mpaid"), R.INVALID_FIELD),
        Case("source-tab", ev("source-tab", source="str\tipe"), R.INVALID_FIELD),
        Case("source-65-chars", ev("source-65", source="s" * 65), R.INVALID_FIELD),
        # -- occurred_at
        Case("ts-words", ev("ts-words", occurred_at="yesterday"), R.INVALID_TIMESTAMP),
        Case("ts-empty", ev("ts-empty", occurred_at=""), R.INVALID_TIMESTAMP),
        Case("ts-no-zone", ev("ts-no-zone", occurred_at=now.replace(tzinfo=None).isoformat()), R.INVALID_TIMESTAMP),
        Case("ts-date-only", ev("ts-date-only", occurred_at=now.date().isoformat()), R.INVALID_TIMESTAMP),
        Case("ts-space-separator", ev("ts-space", occurred_at=now.isoformat(sep=" ")), R.INVALID_TIMESTAMP),
        Case("ts-feb-29-2023", ev("ts-feb29", occurred_at="2023-02-29T00:00:00Z"), R.INVALID_TIMESTAMP),
        Case("ts-offset-24h", ev("ts-offset24", occurred_at=now.strftime("%Y-%m-%dT%H:%M:%S+24:00")),
             R.INVALID_TIMESTAMP),
        Case("ts-year-0", ev("ts-year0", occurred_at="0000-01-01T00:00:00Z"), R.INVALID_TIMESTAMP),
        Case("ts-leap-second", ev("ts-leap", occurred_at=now.strftime("%Y-%m-%dT23:59:60Z")), R.INVALID_TIMESTAMP),
        Case("ts-10-fraction-digits", ev("ts-frac10", occurred_at=now.strftime("%Y-%m-%dT%H:%M:%S.1234567891Z")),
             R.INVALID_TIMESTAMP),
        Case("ts-10-days-old", ev("ts-old10", occurred_at=iso(now - timedelta(days=10))), R.TIMESTAMP_TOO_OLD),
        Case("ts-epoch-zero", ev("ts-epoch", occurred_at="1970-01-01T00:00:00Z"), R.TIMESTAMP_TOO_OLD),
        Case("ts-year-1-plus-23h59", ev("ts-year1", occurred_at="0001-01-01T00:00:00+23:59"), R.TIMESTAMP_TOO_OLD),
        Case("ts-4-days-old-offset", ev("ts-old4", occurred_at=(now - timedelta(days=4)).astimezone(
            timezone(timedelta(hours=5, minutes=30))).isoformat()), R.TIMESTAMP_TOO_OLD),
        Case("ts-2-days-ahead", ev("ts-ahead2", occurred_at=iso(now + timedelta(days=2))), R.TIMESTAMP_IN_FUTURE),
        Case("ts-year-9999", ev("ts-9999", occurred_at="9999-12-31T23:59:59Z"), R.TIMESTAMP_IN_FUTURE),
        Case("ts-year-9999-minus-23h59", ev("ts-9999m", occurred_at="9999-12-31T23:59:59-23:59"),
             R.TIMESTAMP_IN_FUTURE),
        # -- transport limits
        Case("too-large", ev("too-large", payload={"blob": "x" * (100 * 1024)}), R.TOO_LARGE),
        Case("too-large-garbage", b"\xff" * (100 * 1024), R.TOO_LARGE),
        Case("depth-33", ev("depth-33", payload=nested(32)), R.TOO_DEEP),
        Case("deep-objects-40", ev("deep-40", payload=nested(40)), R.TOO_DEEP),
        Case("deep-arrays-200", ev("deep-200", payload={"a": nested(200, kind="array")}), R.TOO_DEEP),
        Case("deep-arrays-5000", patched("deep-5000", now, b'"amount":1',
                                         b'"amount":' + b"[" * 5000 + b"]" * 5000), R.TOO_DEEP),
        Case("int-2^64", patched("int-2-64", now, b'"amount":1', b'"amount":18446744073709551616'),
             R.UNREPRESENTABLE_NUMBER),
        Case("int-below-int64", patched("int-neg", now, b'"amount":1', b'"amount":-9223372036854775809'),
             R.UNREPRESENTABLE_NUMBER),
        Case("int-2^64-top-level-unknown-field", ev("int-top")[:-1] + b',"big":18446744073709551616}',
             R.UNREPRESENTABLE_NUMBER),
        Case("int-10^30-spaced", spaced(event("int-spaced", now, payload={"amount": 10**30})),
             R.UNREPRESENTABLE_NUMBER),
        Case("float-1e400", patched("1e400", now, b'"amount":1', b'"amount":1e400'), R.UNREPRESENTABLE_NUMBER),
        Case("float-minus-1e400", patched("-1e400", now, b'"amount":1', b'"amount":-1e400'),
             R.UNREPRESENTABLE_NUMBER),
        # -- duplicate keys
        Case("dup-top-compact", ev("dup-top")[:-1] + b',"tenant_id":"org-other"}', R.DUPLICATE_KEY),
        Case("dup-top-spaced", spaced(event("dup-top-spaced", now), indent=2)[:-2] + b',\n  "source": "github"\n}',
             R.DUPLICATE_KEY),
        Case("dup-nested-compact", patched("dup-nested", now, b'"amount":1', b'"amount":1,"amount":2'),
             R.DUPLICATE_KEY),
        Case("dup-nested-spaced", spaced(event("dup-nested-spaced", now)).replace(
            b'"amount": 1', b'"amount": 1, "amount": 1'), R.DUPLICATE_KEY),
        Case("dup-via-escape", patched("dup-escape", now, b'"amount":1', b'"amount":1,"\\u0061mount":2'),
             R.DUPLICATE_KEY),
        Case("dup-in-headers", patched("dup-headers", now, b'"x-try":"1"', b'"x-try":"1","x-try":"2"'),
             R.DUPLICATE_KEY),
        Case("dup-in-array-of-objects", ev("dup-array", payload={"items": [{"sku": "a"}]}).replace(
            b'{"sku":"a"}', b'{"sku":"a","sku":"b"}'), R.DUPLICATE_KEY),
        # -- Kafka tombstones
        Case("tombstone", None, R.TOMBSTONE),
        Case("tombstone-empty-key", None, R.TOMBSTONE, key=b""),
        # -- stored after documented sanitisation, or at a limit
        Case("nul-in-payload-value", ev("nul-payload", payload={"note": "a\x00b"}), None,
             check=lambda row: "a\ufffdb" in row["payload"] and "\\u0000" not in row["payload"]),
        Case("nul-in-payload-key", ev("nul-key", payload={"k\x00": "v"}), None,
             check=has("payload", "k\ufffd")),
        Case("nul-in-header-value", ev("nul-header", headers={"x-try": "1\x00"}), None,
             check=has("headers", "1\ufffd")),
        Case("unknown-top-level-field", ev("unknown-field", extra={"deep": [1, 2]}), None,
             check=lambda row: "extra" not in row["payload"]),
        Case("ts-nanoseconds", ev("ts-nanos", occurred_at=now.strftime("%Y-%m-%dT%H:%M:%S.123456789Z")), None,
             check=lambda row: row["occurred_at"].microsecond == 123456),
        Case("ts-lowercase-t-z", ev("ts-lower", occurred_at=now.strftime("%Y-%m-%dt%H:%M:%Sz")), None),
        Case("tenant-64-chars", ev("tenant-64", tenant_id="t" * 64), None),
        Case("idem-255-chars", ev("idem-255", idempotency_key="k" * 255), None),
        Case("depth-32", ev("depth-32", payload=depth32), None),
        Case("int-u64-max", patched("u64max", now, b'"amount":1', b'"amount":18446744073709551615'), None,
             check=has("payload", "18446744073709551615")),
        Case("unicode-payload", ev("unicode", payload={"note": "naïve café 💳 مرحبا"}), None,
             check=has("payload", "💳")),
        Case("escaped-unicode", patched("escaped", now, b'"amount":1', b'"amount":1,"note":"caf\\u00e9"'), None,
             check=has("payload", "café")),
        Case("pretty-printed", spaced(event("pretty", now), indent=4), None),
        Case("no-headers", ev("no-headers", headers=DROP), None, check=lambda row: row["headers"] is None),
        Case("binary-kafka-key", ev("binary-key"), None, key=b"\x00\xff\xfe"),
        Case("null-kafka-key", ev("null-key"), None, key=None),
    ]


def audit_corpus(now: datetime) -> list[Case]:
    def ev(name: str, **changes: Any) -> bytes:
        return j(event(name, now, "audit", **changes))

    return [
        Case("a-missing-actor", ev("a-missing-actor", actor_id=DROP), R.MISSING_FIELD, "audit"),
        Case("a-webhook-on-audit-topic", j(event("a-webhook", now)), R.MISSING_FIELD, "audit"),
        Case("a-metadata-string", ev("a-meta-str", metadata="mfa"), R.WRONG_TYPE, "audit"),
        Case("a-ip-number", ev("a-ip-int", ip=10), R.WRONG_TYPE, "audit"),
        Case("a-ip-garbage", ev("a-ip-bad", ip="not-an-ip"), R.INVALID_FIELD, "audit"),
        Case("a-resource-empty", ev("a-res-empty", resource=""), R.INVALID_FIELD, "audit"),
        Case("a-action-129-chars", ev("a-action-129", action="a" * 129), R.INVALID_FIELD, "audit"),
        Case("a-dup-in-metadata", ev("a-dup-meta").replace(b'"mfa":true', b'"mfa":true,"mfa":false'),
             R.DUPLICATE_KEY, "audit"),
        Case("a-not-json", b"{oops", R.NOT_JSON, "audit"),
        Case("a-tombstone", None, R.TOMBSTONE, "audit", key=b"org-hostile"),
        Case("a-too-old", ev("a-old", occurred_at=iso(now - timedelta(days=30))), R.TIMESTAMP_TOO_OLD, "audit"),
        Case("a-nul-in-metadata", ev("a-nul-meta", metadata={"ua": "x\x00y"}), None, "audit",
             check=lambda row: "x\ufffdy" in row["metadata"]),
        Case("a-minimal", ev("a-minimal", resource=DROP, ip=DROP, metadata=DROP), None, "audit",
             check=lambda row: row["resource"] is None and row["metadata"] is None),
    ]


# -- publishing with positions --------------------------------------------------------------------------------

Item = tuple[str, bytes | None, bytes | None, Case | None]  # stream, key, value, hostile case (None: valid)


async def send_with_positions(config: Config, items: list[Item]) -> list[tuple[int, int]]:
    """Send every item in order; return the (partition, offset) the broker acknowledged for each."""
    producer = AIOKafkaProducer(**kafka_options.producer(config, client_id="ingest-test-hostile", linger_ms=5,
                                                         max_request_size=4 * 1024 * 1024))
    await producer.start()
    try:
        futures = [await producer.send(streams.STREAMS[s].topic_for(config), key=k, value=v)
                   for s, k, v, _ in items]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


def interleave(rng: random.Random, stream: str, valid: Iterable[dict[str, Any]], cases: list[Case]) -> list[Item]:
    items: list[Item] = [(stream, e["tenant_id"].encode(), j(e), None) for e in valid]
    for i, c in enumerate(cases):
        key = f"hostile-{i % 7}".encode() if c.key == AUTO else c.key
        assert not isinstance(key, str)
        items.append((stream, key, c.value, c))
    rng.shuffle(items)
    return items


async def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.cli", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def stored_identity(c: Case) -> tuple[str, str]:
    assert c.value is not None
    obj = json.loads(c.value)
    return obj["tenant_id"], obj["idempotency_key"]


# -- the tests -----------------------------------------------------------------------------------------------

def test_corpus_is_large_distinct_and_covers_every_input_reason() -> None:
    now = datetime.now(UTC)
    corpus = webhook_corpus(now) + audit_corpus(now)
    assert len(corpus) >= 40
    assert len({c.name for c in corpus}) == len(corpus)
    assert len({(c.stream, c.key, c.value) for c in corpus}) == len(corpus), "every hostile record is distinct"
    # Every reason the decoder and validator can give (the rest need a policy, a quota or Postgres).
    assert {c.expect for c in corpus} - {None} == set(Reason) - {
        R.NUL_CHARACTER, R.QUOTA_EXCEEDED, R.DB_REJECTED}


@pytest.mark.parametrize("stream", ["webhook", "audit"])
def test_corpus_expectations_match_the_pure_stages(stream: str) -> None:
    """Fast feedback: the same verdicts from ``prepare`` alone (no services); the drain test re-checks them."""
    config = settings.from_env({"INGEST_RETENTION_DAYS": "3", "INGEST_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)})
    now = datetime.now(UTC)
    cases = [c for c in webhook_corpus(now) + audit_corpus(now) if c.stream == stream]
    records = [_Rec(i, c.value) for i, c in enumerate(cases)]
    out = prepare(stream, records, streams.STREAMS[stream].contract(config), config.decode, now)
    got = {row[8]: row[1] for row in out.dead_letters}
    wrong = {c.name: (got.get(i), c.expect and str(c.expect)) for i, c in enumerate(cases)
             if got.get(i) != (c.expect and str(c.expect))}
    assert wrong == {}, "case: (got, expected)"


@dataclass
class _Rec:
    offset: int
    value: bytes | None
    topic: str = "t"
    partition: int = 0
    key: bytes | None = None
    timestamp: int = 0


async def test_hostile_corpus_among_valid_traffic_is_fully_accounted_for(
        config: Config, env: dict[str, str], db: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    cases = webhook_corpus(now) + audit_corpus(now)
    valid_w = list(sample.generate("webhook", 5000, n_tenants=40, dup_rate=0.1, seed=101))
    valid_a = list(sample.generate("audit", 1000, n_tenants=40, dup_rate=0.1, seed=102))
    rng = random.Random(9)
    items = (interleave(rng, "webhook", valid_w, [c for c in cases if c.stream == "webhook"])
             + interleave(rng, "audit", valid_a, [c for c in cases if c.stream == "audit"]))
    positions = await send_with_positions(config, items)
    published = Counter(s for s, *_ in items)

    code, out, err = await run_cli(env, "consume", "--stream", "all", "--drain")
    assert code == 0, err[-3000:]
    totals = json.loads(out.strip().splitlines()[-1])

    # Dead letters: exactly the rejected hostile records, each with its bytes, key, position and reason.
    rows = await db.fetch("SELECT * FROM dead_letters")
    dead = {(r["source_topic"], r["source_partition"], r["source_offset"]): r for r in rows}
    assert len(dead) == len(rows), "one dead letter per source record"
    expected_dead: dict[tuple[str, int, int], tuple[Case, bytes | None]] = {}
    for (stream, key, _, case), (partition, offset) in zip(items, positions, strict=True):
        if case is not None and case.expect is not None:
            expected_dead[(streams.STREAMS[stream].topic_for(config), partition, offset)] = (case, key)
    assert set(dead) == set(expected_dead), "dead letters are exactly the rejected hostile records"
    mismatches = {}
    for where, (case, key) in expected_dead.items():
        row = dead[where]
        got = (row["reason"], row["stream"], bytes(row["raw"]) if row["raw"] is not None else None,
               row["kafka_key"] and bytes(row["kafka_key"]))
        want = (str(case.expect), case.stream, case.value, key)
        if got != want:
            mismatches[case.name] = (got[0], got[1], want[0], want[1], got[2] == want[2], got[3] == want[3])
        assert row["detail"], case.name
        assert row["replayed_at"] is None
    assert mismatches == {}, "name: (reason, stream, expected reason, expected stream, raw equal, key equal)"

    # Stored: every unique valid event once, and every hostile record the contract accepts (sanitised).
    stored_cases = [c for c in cases if c.expect is None]
    for stream, valid in (("webhook", valid_w), ("audit", valid_a)):
        mine = [c for c in stored_cases if c.stream == stream]
        stored = await stored_keys(db, stream)
        assert set(stored) == unique_keys(valid) | {stored_identity(c) for c in mine}
        assert max(stored.values()) == 1
        table = streams.STREAMS[stream].table
        for c in mine:
            tenant, idem = stored_identity(c)
            found = await db.fetchrow(f"SELECT * FROM {table} WHERE tenant_id = $1 AND idempotency_key = $2",
                                      tenant, idem)
            assert found is not None, c.name
            assert c.check is None or c.check(dict(found)), (c.name, dict(found))

        # Accounting: stored + duplicates + dead letters = published, and the offsets reached the end.
        t = totals[stream]
        rejected = sum(1 for c in cases if c.stream == stream and c.expect is not None)
        assert t["rejected"] == rejected
        assert t["stored"] == len(unique_keys(valid)) + len(mine)
        assert t["stored"] + t["duplicates"] + t["rejected"] + t["quota_exceeded"] == published[stream]
        assert await offsets_total(db, config, stream) == published[stream]
    sanitized_tenants = await db.fetchval(
        "SELECT count(*) FROM dead_letters WHERE tenant_id LIKE '%' || chr(65533) || '%'")
    assert sanitized_tenants == 1, "the NUL inside tenant_id is recorded as U+FFFD in the dead letter"


async def test_row_postgres_refuses_is_dead_lettered_and_the_rest_of_its_batch_stored(
        config: Config, db: asyncpg.Connection) -> None:
    await db.execute("ALTER TABLE webhook_events ADD CONSTRAINT no_evil CHECK (source <> 'evil')")
    now = datetime.now(UTC)
    valid = list(sample.generate("webhook", 3000, n_tenants=20, dup_rate=0.05, seed=41))
    evil = [event(f"evil-{i}", now, source="evil", tenant_id=f"org-{i:04d}") for i in range(7)]
    rng = random.Random(4)
    items: list[Item] = [("webhook", e["tenant_id"].encode(), j(e), None) for e in valid]
    items += [("webhook", e["tenant_id"].encode(), j(e), Case(e["idempotency_key"], j(e), R.DB_REJECTED))
              for e in evil]
    rng.shuffle(items)
    positions = await send_with_positions(config, items)

    totals = await drain(config, "webhook")

    topic = streams.WEBHOOK.topic_for(config)
    rows = await db.fetch("SELECT * FROM dead_letters ORDER BY id")
    want = {(topic, p, o): v for (_, _, v, c), (p, o) in zip(items, positions, strict=True) if c is not None}
    assert {(r["source_topic"], r["source_partition"], r["source_offset"]): bytes(r["raw"]) for r in rows} == want
    assert {r["reason"] for r in rows} == {"db_rejected"}
    assert all("23514" in r["detail"] and "no_evil" in r["detail"] for r in rows)
    assert {(r["tenant_id"], r["idempotency_key"]) for r in rows} == unique_keys(evil)
    stored = await stored_keys(db, "webhook")
    assert set(stored) == unique_keys(valid) and max(stored.values()) == 1
    # The refused rows gave their dedupe claims back, so a corrected or replayed copy is judged again.
    claimed = await ledger.holds(db, "dedupe_ledger", "webhook",
                                 [(e["tenant_id"], e["idempotency_key"]) for e in evil])
    assert claimed == set()
    t = totals["webhook"]
    assert (t.stored, t.rejected) == (len(unique_keys(valid)), len(evil))
    assert t.stored + t.duplicates + t.rejected == len(items)
    assert await offsets_total(db, config, "webhook") == len(items)


# -- NUL policy, and known defects (pure: no services) ---------------------------------------------------------

def _verdict(value: bytes, policy: NulPolicy = NulPolicy.REPLACE, stream: str = "webhook") -> tuple[str, Any]:
    config = settings.from_env({"INGEST_RETENTION_DAYS": "3", "INGEST_NUL_POLICY": policy.value})
    out = prepare(stream, [_Rec(0, value)], streams.STREAMS[stream].contract(config), config.decode,
                  datetime.now(UTC))
    if out.dead_letters:
        return "rejected", out.dead_letters[0][1]
    return "stored", out.candidates[0].row


@pytest.mark.parametrize(("policy", "outcome", "payload"), [
    (NulPolicy.REPLACE, "stored", b'{"note":"a\xef\xbf\xbdb"}'),
    (NulPolicy.STRIP, "stored", b'{"note":"ab"}'),
    (NulPolicy.REJECT, "rejected", "nul_character"),
])
def test_nul_policy(policy: NulPolicy, outcome: str, payload: Any) -> None:
    now = datetime.now(UTC)
    verdict, detail = _verdict(j(event("nul-policy", now, payload={"note": "a\x00b"})), policy)
    assert verdict == outcome
    assert (detail[5] if verdict == "stored" else detail) == payload


@pytest.mark.parametrize("policy", [NulPolicy.REPLACE, NulPolicy.STRIP])
def test_nul_sanitising_never_merges_payload_keys(policy: NulPolicy) -> None:
    merged = b'"a\\u0000":1,"a\\ufffd":2' if policy is NulPolicy.REPLACE else b'"a\\u0000":1,"a":2'
    value = patched("nul-merge", datetime.now(UTC), b'"amount":1', merged)
    assert _verdict(value, policy) == ("rejected", "duplicate_key")


@pytest.mark.parametrize("policy", list(NulPolicy))
def test_nul_in_a_top_level_key_never_overrides_a_contract_field(policy: NulPolicy) -> None:
    base = event("nul-strip", datetime.now(UTC))
    verdict, row = _verdict(j(base)[:-1] + b',"tenant_id\\u0000":"org-other"}', policy)
    assert verdict == "stored" and row[0] == base["tenant_id"]  # an unknown top-level field, ignored


@pytest.mark.parametrize(("stream", "field_name"), [
    ("webhook", "event_type"), ("webhook", "source"), ("audit", "action"), ("audit", "actor_id"),
    ("audit", "resource")])
def test_nul_in_contract_text_field_is_rejected(stream: str, field_name: str) -> None:
    value = j(event(f"nul-{field_name}", datetime.now(UTC), stream, **{field_name: "a\x00b"}))
    assert _verdict(value, stream=stream) == ("rejected", "invalid_field")
