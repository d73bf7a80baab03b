"""Shared test configuration.

Tests under tests/integration and tests/faults need real Postgres, Redis and the Kafka-protocol broker; one
embedded broker is started per session. The fault-injection suite (tests/faults) is slow and runs only with
``--faults`` (``make test`` and CI pass it; a bare ``pytest`` is the quick run).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest import broker as broker_mod


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--faults", action="store_true", default=False,
                     help="also run the fault-injection suite in tests/faults (slow; CI runs it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_faults = bool(config.getoption("--faults"))
    skip_faults = pytest.mark.skip(reason="fault-injection suite: run with --faults (make test does)")
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "faults" in parts:
            item.add_marker(pytest.mark.faults)
            if not run_faults:
                item.add_marker(skip_faults)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect garbage before the summary, so a client some test left unclosed is reported above pytest's last
    line (CI reads that line) rather than at interpreter exit."""
    gc.collect()


def deployment_env(uid: str, **settings: str) -> dict[str, str]:
    """Settings of an isolated test deployment: topic, group and Redis prefixes of its own (from ``uid``),
    4 partitions, 3-day retention and fast group timeouts for the embedded broker, which, like `ingest dev up`,
    gets single-replica topics and non-idempotent producers (it has no InitProducerId). ``settings`` add or
    replace (the broker, the service URLs)."""
    return {
        "INGEST_REDIS_PREFIX": uid,
        "INGEST_TOPIC_PREFIX": f"{uid}.",
        "INGEST_GROUP_PREFIX": f"g_{uid}",
        "INGEST_TOPIC_PARTITIONS": "4",
        "INGEST_TOPIC_REPLICATION_FACTOR": "1",
        "INGEST_TOPIC_MIN_INSYNC_REPLICAS": "1",
        "INGEST_PRODUCER_IDEMPOTENCE": "false",
        "INGEST_RETENTION_DAYS": "3",
        "INGEST_PARTITION_PREMAKE_DAYS": "2",
        "INGEST_SESSION_TIMEOUT_MS": "6000",
        "INGEST_REBALANCE_TIMEOUT_MS": "1000",
        "INGEST_HEARTBEAT_INTERVAL_MS": "500",
        "INGEST_BATCH_MAX_AGE_MS": "50",
        "INGEST_METRICS_PORT": "0",
        "INGEST_LOG_LEVEL": os.environ.get("TEST_LOG_LEVEL", "WARNING"),
        **settings,
    }


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM ``proc`` and wait; SIGKILL it if it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of a Tansu broker started for this test session (TEST_KAFKA_BOOTSTRAP overrides)."""
    if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
        yield os.environ["TEST_KAFKA_BOOTSTRAP"]
        return
    port = free_port()
    log = os.path.join(tempfile.gettempdir(), f"ingest-test-broker-{port}.log")
    proc = broker_mod.start_embedded("127.0.0.1", port, log_path=log)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)
