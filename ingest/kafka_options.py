"""The options of every Kafka client, built in one place: bootstrap servers, SASL/TLS and a client id.

Rules kept here:
- Every ``AIOKafkaConsumer``, ``AIOKafkaProducer`` and ``AIOKafkaAdminClient`` gets its keyword arguments from
  ``consumer``, ``producer`` or ``admin``; nothing else passes ``bootstrap_servers`` or security options (a caller
  that tries gets ``TypeError``), so no client can miss the configured SASL/TLS settings.
- Every client names itself (``client_id``, ``ingest-<role>``) so broker logs and group listings tell them apart.
- The SSL context is built anew for each call (``ingest.security.kafka_security``), so a rotated certificate file
  is picked up by the next client.
- Consumers never auto-commit (progress lives in Postgres; aiokafka's default is to auto-commit); producers wait
  for every in-sync replica (``acks="all"``; with the topics' ``min.insync.replicas`` of 2, an acknowledged event
  is on two brokers) and are idempotent unless ``config.producer_idempotence`` is off (their own retries then
  neither duplicate nor reorder a partition). Callers add what is particular to them.
"""

from __future__ import annotations

from typing import Any

from ingest.config import Config
from ingest.security import kafka_security

_FROM_CONFIG = frozenset({"bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_plain_username",
                          "sasl_plain_password", "ssl_context"})


def common(config: Config, *, client_id: str) -> dict[str, Any]:
    """What every client kind takes: the bootstrap servers, the SASL/TLS options and ``client_id``."""
    return {"bootstrap_servers": config.kafka_bootstrap, "client_id": client_id,
            **kafka_security(config.kafka_security)}


def consumer(config: Config, *, client_id: str, **options: Any) -> dict[str, Any]:
    """``AIOKafkaConsumer`` options: ``common`` plus ``enable_auto_commit=False`` plus ``options``."""
    return _with(common(config, client_id=client_id), {"enable_auto_commit": False, **options})


def producer(config: Config, *, client_id: str, **options: Any) -> dict[str, Any]:
    """``AIOKafkaProducer`` options: ``common`` plus ``acks="all"`` and ``enable_idempotence`` (from the config)
    plus ``options``."""
    return _with(common(config, client_id=client_id),
                 {"acks": "all", "enable_idempotence": config.producer_idempotence, **options})


def admin(config: Config, *, client_id: str, **options: Any) -> dict[str, Any]:
    """``AIOKafkaAdminClient`` options: ``common`` plus ``options``."""
    return _with(common(config, client_id=client_id), options)


def _with(base: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    clash = _FROM_CONFIG & options.keys()
    if clash:
        raise TypeError(f"{', '.join(sorted(clash))} come from the configuration (INGEST_KAFKA_*), not from a caller")
    return {**base, **options}
