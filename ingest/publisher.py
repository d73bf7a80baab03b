"""Publishing events: validate against the contract first, then send keyed by tenant_id.

Rule: an event the consumer would dead-letter for a contract reason is refused here, before it reaches Kafka.
Values are encoded as compact JSON with orjson, which is also the consumer's fast path. A publisher is built from
the ``Config`` (``ingest.kafka_options``), so it uses the configured SASL/TLS settings and decode limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from ingest import kafka_options
from ingest.codec import DecodeLimits, decode
from ingest.config import Config
from ingest.contract import Contract
from ingest.reject import Rejected
from ingest.services import ServiceUnavailable, kafka_starting


def encode(event: Mapping[str, Any], contract: Contract, limits: DecodeLimits,
           now: datetime | None = None) -> tuple[bytes, bytes]:
    """Return ``(key, value)`` for ``event`` or raise ``Rejected`` with the reason the consumer would give."""
    value = orjson.dumps(event)
    decoded = decode(value, limits)
    values = contract.extract(decoded.obj, now or datetime.now(UTC))
    return values[0].encode(), value


class Publisher:
    """Sends events of one stream to ``topic`` on ``config``'s brokers, with its SASL/TLS settings and decode
    limits. Use as ``async with Publisher(config, topic=..., contract=...) as pub: await pub.send(e)``."""

    def __init__(self, config: Config, *, topic: str, contract: Contract, linger_ms: int = 5,
                 client_id: str = "ingest-publisher", **producer_options: Any) -> None:
        self.topic, self.contract = topic, contract
        self.limits = config.decode
        self._producer = AIOKafkaProducer(**kafka_options.producer(
            config, client_id=client_id, linger_ms=linger_ms, max_batch_size=256 * 1024, **producer_options))
        self._bootstrap = config.kafka_bootstrap
        self._pending: list[Any] = []

    async def __aenter__(self) -> Publisher:
        try:
            async with kafka_starting(self._bootstrap):
                await self._producer.start()
        except ServiceUnavailable:
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.flush()
        finally:
            await self._producer.stop()

    async def send(self, event: Mapping[str, Any]) -> None:
        """Validate and enqueue one event (raises ``Rejected``); ``flush`` waits for delivery."""
        key, value = encode(event, self.contract, self.limits)
        await self.send_raw(key, value)

    async def send_raw(self, key: bytes | None, value: bytes | None) -> None:
        """Enqueue bytes as they are, without validation (replay and tests)."""
        self._pending.append(await self._producer.send(self.topic, key=key, value=value))
        if len(self._pending) >= 10000:
            await self.flush()

    async def flush(self) -> None:
        """Wait until every enqueued event is acknowledged by the broker."""
        pending, self._pending = self._pending, []
        for fut in pending:
            await fut


__all__ = ["Publisher", "Rejected", "encode"]
