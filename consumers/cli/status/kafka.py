"""Kafka probes for the status view: beginning and end offsets, offsets by time, consumer group members.

Kafka end offsets: the embedded broker (Tansu) answers ListOffsets(latest) with a stale value, while the high
watermark in a fetch response is right. ``end_offsets`` therefore assigns a throwaway consumer (no group) to the
partitions, seeks to the end and fetches once, and takes ``max(highwater, ListOffsets)`` per partition
(ListOffsets alone is the fallback when no fetch answered in time — real Kafka gives the same value for both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from ingest import kafka_options
from ingest.config import Config
from ingest.services import ServiceUnavailable, kafka_starting


@dataclass(frozen=True, slots=True)
class EndOffset:
    beginning: int
    end: int
    highwater: int | None
    listed: int | None


@contextlib.asynccontextmanager
async def _probe(config: Config, client_id: str, budget_s: float) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer outside any group (nothing auto-commits, nothing resets by itself); any failure to reach
    or use the broker becomes ``ServiceUnavailable``."""
    bootstrap = config.kafka_bootstrap
    consumer = AIOKafkaConsumer(**kafka_options.consumer(
        config, client_id=client_id, enable_auto_commit=False, group_id=None, auto_offset_reset="none",
        fetch_max_wait_ms=100, max_partition_fetch_bytes=64 * 1024, request_timeout_ms=int(budget_s * 1000)))
    try:
        try:
            async with kafka_starting(bootstrap):
                await asyncio.wait_for(consumer.start(), budget_s)
            yield consumer
        except ServiceUnavailable:
            raise
        except Exception as exc:
            raise ServiceUnavailable("kafka", bootstrap, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _log_ends(config: Config, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                    budget_s: float) -> dict[TopicPartition, EndOffset]:
    """Beginning and end of each assigned partition: ``max(highwater, ListOffsets)`` (see the module note)."""
    listed: dict[Any, int] = {}
    with contextlib.suppress(Exception):
        listed = await consumer.end_offsets(tps)
    beginning: dict[Any, int] = {}
    with contextlib.suppress(Exception):
        beginning = await consumer.beginning_offsets(tps)
    await consumer.seek_to_end(*tps)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        pending = [tp for tp in tps if consumer.highwater(tp) is None]
        if not pending:
            break
        await consumer.getmany(*pending, timeout_ms=200)
    out = {}
    for tp in tps:
        hw, lo = consumer.highwater(tp), listed.get(tp)
        known = [v for v in (hw, lo) if v is not None]
        if not known:
            raise ServiceUnavailable("kafka", config.kafka_bootstrap, f"no end offset for {tp.topic}[{tp.partition}]")
        out[tp] = EndOffset(beginning.get(tp, 0), max(known), hw, lo)
    return out


async def end_offsets(config: Config, topics: Sequence[str], *,
                      budget_s: float = 5.0) -> dict[str, dict[int, EndOffset]]:
    """Per topic and partition: beginning and end offsets (see the module note). Missing topics map to ``{}``.

    Raises ``ServiceUnavailable`` when the broker cannot be reached."""
    async with _probe(config, "ingest-status", budget_s) as consumer:
        present = await consumer.topics()
        tps = [TopicPartition(t, p) for t in topics if t in present
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        out: dict[str, dict[int, EndOffset]] = {t: {} for t in topics}
        if tps:
            consumer.assign(tps)
            for tp, e in (await _log_ends(config, consumer, tps, budget_s)).items():
                out[tp.topic][tp.partition] = e
        return out


async def offsets_for_time(config: Config, topic: str, partitions: Sequence[int], ts_ms: int, *,
                           budget_s: float = 10.0) -> dict[int, int | None]:
    """Per partition: the first offset whose record timestamp is at or after ``ts_ms`` (None: none is, i.e. the
    log end). Asks the broker (ListOffsets by time); an answer that breaks that rule (a record timestamped before
    ``ts_ms``, as the embedded broker returns) is replaced by a bisection over the log, reading one record per
    step (record timestamps are taken as non-decreasing within a partition)."""
    async with _probe(config, "ingest-offsets", budget_s) as consumer:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        answers = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
        bounds = await _log_ends(config, consumer, tps, budget_s)
        out: dict[int, int | None] = {}
        for tp in tps:
            a = answers.get(tp)
            if a is None or a.timestamp >= ts_ms:
                out[tp.partition] = None if a is None else a.offset
                continue
            lo, hi = bounds[tp].beginning, bounds[tp].end  # first offset in [lo, hi) with timestamp >= ts_ms
            while lo < hi:
                mid = (lo + hi) // 2
                consumer.seek(tp, mid)
                got: list[Any] = []
                deadline = time.monotonic() + budget_s
                while not got and time.monotonic() < deadline:
                    got = (await consumer.getmany(tp, timeout_ms=200, max_records=1)).get(tp, [])
                if not got:
                    raise ServiceUnavailable("kafka", config.kafka_bootstrap,
                                             f"no record at {topic}[{tp.partition}]@{mid}")
                if got[0].timestamp >= ts_ms:
                    hi = mid
                else:
                    lo = got[0].offset + 1
            out[tp.partition] = lo if lo < bounds[tp].end else None
        return out


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence logger ``name`` below CRITICAL for the duration."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(saved)


async def group_members(config: Config, groups: Sequence[str], *,
                        budget_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """``describe_consumer_groups``: state and members (id, client, host, instance id, assigned partitions).

    Tansu answers with member ids and the group state but empty client ids, hosts and assignments; what is
    missing is reported as ``None``."""
    bootstrap = config.kafka_bootstrap
    admin = AIOKafkaAdminClient(**kafka_options.admin(config, client_id="ingest-status",
                                                      request_timeout_ms=int(budget_s * 1000)))
    try:
        async with kafka_starting(bootstrap):
            await asyncio.wait_for(admin.start(), budget_s)
        with _quiet("aiokafka.conn"):  # a failure is reported in the view; its traceback in the log adds nothing
            responses = await asyncio.wait_for(admin.describe_consumer_groups(list(groups)), budget_s)
    except ServiceUnavailable:
        raise
    except Exception as exc:
        raise ServiceUnavailable("kafka", bootstrap, exc) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    out: dict[str, dict[str, Any]] = {}
    for resp in responses:
        for g in resp.to_object().get("groups", []):
            members = []
            for m in g.get("members", []):
                assigned: list[int] | None = None
                raw = m.get("member_assignment") or b""
                if raw:
                    with contextlib.suppress(Exception):
                        assigned = sorted(tp.partition for tp in ConsumerProtocolMemberAssignment.decode(raw).partitions())
                members.append({"member_id": m.get("member_id"), "client_id": m.get("client_id") or None,
                                "host": m.get("client_host") or None,
                                "instance_id": m.get("group_instance_id") or None, "partitions": assigned})
            out[g["group"]] = {"state": g.get("state") or None, "error_code": g.get("error_code", 0),
                               "members": members}
    return out
