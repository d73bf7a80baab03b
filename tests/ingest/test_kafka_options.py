"""ingest.kafka_options: the one place that builds Kafka client options (bootstrap, SASL/TLS, client id)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from consumers.settings import from_env
from ingest import kafka_options

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("ingest/**/*.py"), *ROOT.glob("consumers/**/*.py"), *ROOT.glob("scripts/*.py")])
CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}
CONFIG = dataclasses.replace(from_env({}), kafka_bootstrap="broker-1:9092,broker-2:9092")


def test_every_kind_has_the_bootstrap_security_and_client_id() -> None:
    for build in (kafka_options.consumer, kafka_options.producer, kafka_options.admin):
        options = build(CONFIG, client_id="ingest-x")
        assert options["bootstrap_servers"] == "broker-1:9092,broker-2:9092"
        assert options["client_id"] == "ingest-x" and options["security_protocol"] == "PLAINTEXT"


def test_consumers_never_auto_commit_and_producers_wait_for_all_replicas() -> None:
    assert kafka_options.consumer(CONFIG, client_id="c")["enable_auto_commit"] is False
    assert kafka_options.producer(CONFIG, client_id="p")["acks"] == "all"
    assert kafka_options.producer(CONFIG, client_id="p")["enable_idempotence"] is True  # the default
    off = dataclasses.replace(CONFIG, producer_idempotence=False)
    assert kafka_options.producer(off, client_id="p")["enable_idempotence"] is False
    assert "acks" not in kafka_options.admin(CONFIG, client_id="a")


def test_callers_add_options_but_cannot_replace_the_configured_connection() -> None:
    assert kafka_options.consumer(CONFIG, client_id="c", group_id="g", fetch_max_wait_ms=100)["group_id"] == "g"
    for key in ("bootstrap_servers", "security_protocol", "ssl_context"):
        with pytest.raises(TypeError, match=key):
            kafka_options.admin(CONFIG, client_id="a", **{key: "x"})


def test_no_client_is_built_by_hand() -> None:
    """Every aiokafka client in the code takes ``**`` options (from this module) and no ``bootstrap_servers``."""
    bad = []
    for file in SOURCES:
        path = file.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(file.read_text("utf-8"), path)):
            if not isinstance(node, ast.Call) or getattr(node.func, "id", getattr(node.func, "attr", None)) not in CLIENTS:
                continue
            names = {k.arg for k in node.keywords}
            if "bootstrap_servers" in names or None not in names:
                bad.append(f"{path}:{node.lineno}")
    assert bad == []
    assert not [f for f in SOURCES if f.name != "kafka_options.py" and "bootstrap_servers" in f.read_text("utf-8")]
