"""consumers.cli.sample.generate: deterministic, contract-valid, and the requested share of re-deliveries."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest

from consumers.cli.sample import generate
from consumers.settings import from_env
from consumers.streams import AUDIT, WEBHOOK, Stream, load_schema
from ingest.codec import decode
from ingest.contract import Contract

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
STREAMS = [WEBHOOK, AUDIT]
DEFAULTS = from_env({})


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
def test_deterministic_per_seed(stream: Stream) -> None:
    a = list(generate(stream.name, 300, seed=7, now=NOW))
    b = list(generate(stream.name, 300, seed=7, now=NOW))
    c = list(generate(stream.name, 300, seed=8, now=NOW))
    assert len(a) == 300
    assert a == b
    assert a != c


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
def test_every_event_passes_the_contract(stream: Stream) -> None:
    contract = Contract(load_schema(stream.schema_file), stream.columns, DEFAULTS.window)
    events = list(generate(stream.name, 2000, n_tenants=25, dup_rate=0.2, seed=3, now=NOW))
    for event in events:
        for raw in (orjson.dumps(event), json.dumps(event).encode()):
            decoded = decode(raw, DEFAULTS.decode)
            assert not decoded.sanitized
            values = contract.extract(decoded.obj, NOW)
            assert values[:2] == (event["tenant_id"], event["idempotency_key"])
    assert len({e["tenant_id"] for e in events}) == 25


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.name)
@pytest.mark.parametrize("dup_rate", [0.0, 0.1, 0.5])
def test_dup_rate_is_the_share_of_repeated_keys(stream: Stream, dup_rate: float) -> None:
    count = 5000
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for event in generate(stream.name, count, dup_rate=dup_rate, seed=11, now=NOW):
        key = (event["tenant_id"], event["idempotency_key"])
        repeats += key in seen
        seen.add(key)
    assert abs(repeats / count - dup_rate) < 0.02  # binomial sd <= 0.0071 at n=5000
    assert len(seen) == count - repeats


def test_webhook_retry_keeps_key_and_bumps_delivery_attempt() -> None:
    first: dict[tuple[str, str], dict] = {}
    retries = 0
    for event in generate("webhook", 1000, dup_rate=0.3, seed=5, now=NOW):
        key = (event["tenant_id"], event["idempotency_key"])
        if key not in first:
            first[key] = event
            assert event["headers"]["x-delivery-attempt"] == "1"
            continue
        retries += 1
        original = first[key]
        assert {k: v for k, v in event.items() if k != "headers"} == {k: v for k, v in original.items() if k != "headers"}
        assert event["headers"]["x-delivery-attempt"] in {"2", "3", "4", "5"}
    assert retries > 0
