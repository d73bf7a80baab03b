"""The Kafka loop for one stream: positions come from Postgres, batches close by rows/bytes/age, commits are fenced.

Rules kept here:
- Partitions are paused on assignment and resumed only after ``seek`` to the offset stored in Postgres. Their
  state (``ingest.partition_state``) has one owner: this class, through ``Partitions``' transitions.
- A stored offset the Kafka log no longer holds (past its end: topic recreated, cluster switched; below its start:
  records expired unread) is never read past silently. It is detected on positioning (the log's bounds), on an
  out-of-range fetch and when a fetch's high watermark falls below the cursor. With ``log_mismatch="reset"`` the
  partition moves to the log start and the move (with any gap) is recorded in Postgres in the same transaction;
  with ``"stop"`` the stream stops (``LogMismatch``) and nothing moves.
- A batch covers every consumed record (stored, duplicate or rejected) of the partitions it touches.
- Write failures are retried with backoff while every partition stays paused and the loop keeps polling, so the
  process keeps its group membership. ``Fenced`` drops the batch and re-seeks its partitions.
- The Kafka commit after the Postgres commit is best effort, for lag tools only.
- On stop, the in-flight batch finishes (or is abandoned by the caller's deadline) and the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

from ingest import kafka_options, offsets, retry
from ingest.breaker import CircuitOpen
from ingest.config import Config
from ingest.metrics import Metrics
from ingest.partition_state import Partitions
from ingest.pipeline import Outcome, Pipeline, Staged
from ingest.positions import LogMismatch, Positions
from ingest.retry import Backoff
from ingest.services import kafka_starting

log = logging.getLogger(__name__)

_VALUE = operator.attrgetter("value")


@dataclass(slots=True)
class Totals:
    """Running totals since start (for ``--drain`` summaries and tests)."""

    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    quota_exceeded: int = 0
    batches: int = 0
    stopped_by: str | None = None  # why the stream stopped by itself (circuit breaker, log mismatch)
    stop_kind: str | None = None  # "circuit_open" or "log_mismatch"

    def add(self, o: Outcome) -> None:
        self.stored += o.stored
        self.duplicates += o.duplicates
        self.rejected += o.rejected
        self.quota_exceeded += o.quota_exceeded
        self.batches += 1


@dataclass(slots=True)
class ConsumerHealth:
    """What health checks read: assigned partitions, last loop turn, pause reasons."""

    assigned: set[int] = field(default_factory=set)
    joined: bool = False
    last_turn: float = field(default_factory=time.monotonic)
    paused_reason: str | None = None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StreamConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.on_assigned({tp.partition for tp in assigned})


class StreamConsumer:
    """Consumes one topic into one table. Use ``run`` once; it returns when ``stop`` is set or, with
    ``drain``, when every assigned partition is caught up."""

    def __init__(self, *, config: Config, stream: str, topic: str, group: str, pipeline: Pipeline,
                 pool: asyncpg.Pool, metrics: Metrics, offsets_table: str, changes_table: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.stream, self.topic, self.group = config, stream, topic, group
        self.pipeline, self.pool, self.metrics, self.offsets_table = pipeline, pool, metrics, offsets_table
        self.clock = clock
        self.totals = Totals()
        self.state = ConsumerHealth()
        self.parts = Partitions()
        self.positions = Positions(stream=stream, group=group, topic=topic, offsets_table=offsets_table,
                                   changes_table=changes_table, policy=config.log_mismatch, metrics=metrics)
        self._lock = asyncio.Lock()
        self._backoff = Backoff()
        self._kafka_commit: asyncio.Task[None] | None = None
        self._last_kafka_commit = 0.0
        self._last_lag_refresh = -1.0
        self.consumer: AIOKafkaConsumer | None = None

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    # -- rebalance ---------------------------------------------------------------------------------------------
    def on_assigned(self, parts: set[int]) -> None:
        """Pause new partitions until they are positioned from Postgres (nothing here may fail)."""
        self.state.joined = True
        self.metrics.rebalances.labels(self.stream).inc()
        self.state.assigned = set(parts)
        self.metrics.assigned.labels(self.stream).set(len(parts))
        for p in self.parts.assigned() - parts:
            self._forget(p)
        waiting = self.parts.assign(parts)
        if self.consumer is not None and waiting:
            self.consumer.pause(*[self._tp(p) for p in waiting])
        log.info("partitions assigned", extra={"stream": self.stream, "partitions": sorted(parts)})

    async def on_revoked(self, parts: set[int]) -> None:
        """Let the in-flight batch finish (bounded wait: the fence keeps a late commit safe), then forget."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._lock.acquire()
                self._lock.release()
        for p in parts:
            self._forget(p)
        log.info("partitions revoked", extra={"stream": self.stream, "partitions": sorted(parts)})

    def _forget(self, p: int) -> None:
        self.parts.revoke(p)
        with contextlib.suppress(KeyError):
            self.metrics.lag.remove(self.stream, str(p))

    def _reposition(self, consumer: AIOKafkaConsumer, parts: Mapping[int, tuple[int, int | None] | None]) -> None:
        """Read ``parts`` again from the position Postgres holds (paused until then); each maps to the evidence
        that the log ends before its position, if that is why (see ``PartitionState.end_seen``)."""
        for p, end_seen in parts.items():
            self.parts.reposition(p, end_seen=end_seen)
        self._apply_pause(consumer)

    async def _position(self, consumer: AIOKafkaConsumer) -> None:
        """Seek every unpositioned partition to its Postgres offset, then resume it. A stored offset outside the
        log is handled by the ``log_mismatch`` policy first (see the module rules)."""
        parts = sorted(self.parts.unpositioned() & consumer_partitions(consumer, self.topic))
        if not parts:
            return
        async with self._lock:  # serialised with writes: never read a position a write is about to move
            bounds = await self._log_bounds(consumer, parts)
            try:
                async with self.pool.acquire() as conn:
                    stored = await self.positions.resume_at(conn, parts, bounds)
            except offsets.Fenced as fenced:  # another owner moved them meanwhile: read them again next turn
                log.info("positions moved while positioning; reading them again",
                         extra={"stream": self.stream, "partitions": list(fenced.partitions)})
                return
            await self._seek(consumer, parts, stored, bounds)
        self._apply_pause(consumer)
        log.info("partitions positioned from postgres", extra={"stream": self.stream, "offsets": stored})

    async def _log_bounds(self, consumer: AIOKafkaConsumer, parts: list[int]) -> dict[int, offsets.LogBounds]:
        """What the log of each partition holds now. The start comes from ListOffsets(earliest). The end only
        from evidence gathered at the position (``PartitionState.end_seen``): the high watermark of a fetch made
        there, or ListOffsets(latest) after the broker refused to fetch there. Otherwise it is unknown, and the
        stored position is sought and judged by the first fetch there (``_refresh_lag``): a high watermark seen
        earlier may be stale, and the embedded broker's ListOffsets(latest) lags behind what it holds."""
        tps = [self._tp(p) for p in parts]
        start = await consumer.beginning_offsets(tps)
        seen = {tp: s.end_seen for tp in tps if (s := self.parts.get(tp.partition)) is not None and s.end_seen}
        refused = [tp for tp, (_, end) in seen.items() if end is None]
        listed = await consumer.end_offsets(refused) if refused else {}
        out = {}
        for tp in tps:
            if tp not in seen:
                out[tp.partition] = offsets.LogBounds(start[tp], None)
                continue
            at, end = seen[tp]
            end = listed[tp] if end is None else end
            out[tp.partition] = offsets.LogBounds(start[tp], max(start[tp], end), seen_at=at)
        return out

    async def _seek(self, consumer: AIOKafkaConsumer, parts: list[int], stored: dict[int, int],
                    bounds: dict[int, offsets.LogBounds]) -> None:
        """Seek to the stored offsets (``UNSET``: the log start); a new epoch makes records staged before this
        unwritable."""
        for p in parts:
            start = bounds[p].start
            if self.parts.position(p, stored[p], start, consumer.last_poll_timestamp(self._tp(p))):
                consumer.seek(self._tp(p), stored[p] if stored[p] != offsets.UNSET else start)

    def _apply_pause(self, consumer: AIOKafkaConsumer, everything: bool = False) -> None:
        assigned = consumer_partitions(consumer, self.topic)
        paused = assigned if everything else (self.parts.unpositioned() & assigned)
        consumer.pause(*[self._tp(p) for p in paused])
        consumer.resume(*[self._tp(p) for p in assigned - paused])

    # -- main loop ---------------------------------------------------------------------------------------------
    def build_consumer(self) -> AIOKafkaConsumer:
        """The aiokafka consumer with the settings this design depends on (no auto commit, earliest)."""
        batch = self.config.batch
        kwargs = kafka_options.consumer(
            self.config,
            group_id=self.group,
            enable_auto_commit=False,
            # Positions come from Postgres and are always sought explicitly; an out-of-range fetch must raise
            # (OffsetOutOfRangeError) instead of silently jumping to an end of the log.
            auto_offset_reset="none",
            session_timeout_ms=self.config.session_timeout_ms,
            max_poll_interval_ms=self.config.max_poll_interval_ms,
            rebalance_timeout_ms=self.config.rebalance_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=100,  # an idle long-poll must not hold new records back for the 500 ms default
            fetch_max_bytes=max(batch.max_bytes, 8 * 1024 * 1024),
            # One client id per process, so operators (and the fault proxy) can tell group members apart.
            client_id=f"ingest-{self.stream}-{self.config.instance_id or f'{socket.gethostname()}-{os.getpid()}'}",
        )
        if self.config.instance_id:
            kwargs["group_instance_id"] = f"{self.config.instance_id}-{self.stream}"
        kwargs.update(self.config_overrides())
        return AIOKafkaConsumer(**kwargs)

    def config_overrides(self) -> dict[str, Any]:
        """Extra aiokafka options supplied by a subclass; none by default (SASL/TLS come from the config)."""
        return {}

    async def run(self, stop: asyncio.Event, *, drain: bool = False, ready: asyncio.Event | None = None) -> Totals:
        """Consume until ``stop`` is set or, with ``drain``, until caught up. Returns the totals.

        With ``ready``, the group join starts at once but nothing is positioned or read before ``ready`` is set:
        the caller's own start-up work (schema check, partitions) overlaps the join instead of preceding it."""
        consumer = self.build_consumer()
        self.consumer = consumer
        consumer.subscribe([self.topic], listener=_Listener(self))
        try:
            async with kafka_starting(self.config.kafka_bootstrap):  # a failure: one-line ServiceUnavailable
                await consumer.start()
        except BaseException:  # failed or cancelled mid-start: release its connections and tasks
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        pending: tuple[asyncio.Task[None], Staged, dict[int, int]] | None = None  # the write in flight
        try:
            while ready is not None and not ready.is_set() and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), 0.05)
            try:
                while not stop.is_set():
                    self.state.last_turn = self.clock()
                    if self.parts.unpositioned() and not await self._with_retries(
                            consumer, stop, lambda: self._position(consumer)):
                        break
                    records, epochs = await self._collect(consumer, stop, pending[0] if pending else None)
                    staged = await self.pipeline.stage(records) if records else None  # overlaps the write
                    if pending is not None:
                        await self._finish_write(consumer, stop, *pending)
                        pending = None
                    if staged is not None:
                        pending = (asyncio.create_task(self._write(consumer, staged, epochs)), staged, epochs)
                    else:
                        self._refresh_lag(consumer)
                        if drain and self._caught_up(consumer):
                            break
            except (CircuitOpen, LogMismatch) as exc:  # the in-flight write (if any) still finishes below
                self._stop_stream(exc)
            if pending is not None:
                await self._finish_write(consumer, stop, *pending)
                pending = None
        except BaseException:
            if pending is not None:
                pending[0].cancel()
                with contextlib.suppress(BaseException):
                    await pending[0]
            raise
        finally:
            await self.pipeline.aclose()
            if self._kafka_commit is not None:
                await _finish_quietly(self._kafka_commit, 5)
            await consumer.stop()
            self.metrics.assigned.labels(self.stream).set(0)
        return self.totals

    async def _collect(self, consumer: AIOKafkaConsumer, stop: asyncio.Event,
                       in_flight: asyncio.Task[None] | None) -> tuple[list[Any], dict[int, int]]:
        """Records for one batch, and the position epoch of each partition they came from.

        A batch closes at the row, byte or age limit, or as soon as it has records and no write is in flight
        (``in_flight`` is None or done): waiting longer then only adds latency. While the previous batch is being
        written, records accumulate, so batches grow with load by themselves (group commit)."""
        limits = self.config.batch
        epochs: dict[int, int] = {}
        max_age = limits.max_age.total_seconds()
        records: list[Any] = []
        size = 0
        started: float | None = None
        while not stop.is_set():
            wait = 0.1 if started is None else max(0.0, max_age - (self.clock() - started))
            got = await self._poll(consumer, timeout_ms=int(wait * 1000), max_records=limits.max_rows - len(records))
            self.state.last_turn = self.clock()
            for tp, msgs in got.items():
                epoch = epochs.setdefault(tp.partition, self.parts.epoch(tp.partition))
                # Only records at or past the cursor of a partition still positioned as at the batch's start;
                # the rest is re-read after (re)positioning.
                taken = self.parts.accept(tp.partition, epoch, [m.offset for m in msgs])
                chosen = msgs if len(taken) == len(msgs) else [msgs[i] for i in taken]
                records += chosen
                size += sum([len(v) for v in map(_VALUE, chosen) if v is not None])
            if records and started is None:
                started = self.clock()
            if not records:
                break
            if len(records) >= limits.max_rows or size >= limits.max_bytes or self.clock() - (started or 0) >= max_age:
                break
            if in_flight is None or in_flight.done():
                break
        # A partition re-positioned while we collected: its records here are stale (it will be re-read).
        stale = {p for p, e in epochs.items() if self.parts.epoch(p) != e}
        if stale:
            records = [r for r in records if r.partition not in stale]
        return records, {p: e for p, e in epochs.items() if p not in stale}

    async def _poll(self, consumer: AIOKafkaConsumer, *, timeout_ms: int,
                    max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        """``getmany``; a partition whose fetch position is out of range is re-positioned (and judged against
        the log's bounds there) instead of raising."""
        try:
            return dict(await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        except OffsetOutOfRangeError as exc:
            refused = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            seen: dict[int, tuple[int, int | None] | None] = {
                tp.partition: (at, None) for tp, at in refused.items() if tp.topic == self.topic}
            log.warning("fetch position out of range; re-positioning",
                        extra={"stream": self.stream, "partitions": sorted(seen)})
            self._reposition(consumer, seen)
        except NoOffsetForPartitionError:
            pass  # an unpositioned partition (paused): it is sought explicitly before it is read
        return {}

    def _stop_stream(self, why: CircuitOpen | LogMismatch) -> None:
        kind = "circuit_open" if isinstance(why, CircuitOpen) else "log_mismatch"
        log.error("stream stopped", extra={"stream": self.stream, "reason": kind, "detail": str(why)})
        gauge = self.metrics.circuit_open if kind == "circuit_open" else self.metrics.log_mismatch_stopped
        gauge.labels(self.stream).set(1)
        self.totals.stopped_by, self.totals.stop_kind = str(why), kind

    async def _write(self, consumer: AIOKafkaConsumer, staged: Staged, epochs: dict[int, int]) -> None:
        """One attempt to commit ``staged``. Only records of partitions still positioned as when they were
        fetched (same epoch) and at or past the stored position are written: a rebalance or a fence may have
        moved them since, and those records are re-read from the new position instead."""
        async with self._lock:
            records = staged.records
            first: dict[int, int] = {}  # lowest offset of each partition in the batch (one pass, then per partition)
            for r in reversed(records):
                first[r.partition] = r.offset
            if all(self.parts.writable(p, epochs.get(p), off) for p, off in first.items()):
                live = records
            else:
                live = [r for r in records if self.parts.writable(r.partition, epochs.get(r.partition), r.offset)]
            if not live:
                return
            if len(live) != len(staged.records):
                staged = self.pipeline.stage_subset(live)
            expected = self.parts.expected(staged.prepared.advance)
            async with self.pool.acquire() as conn:
                outcome = await self.pipeline.commit(conn, staged, expected)
            for p, nxt in staged.prepared.advance.items():
                self.parts.advance(p, nxt)  # a partition revoked while we wrote stays forgotten
        self.totals.add(outcome)
        self._after_commit(consumer)

    async def _finish_write(self, consumer: AIOKafkaConsumer, stop: asyncio.Event, task: asyncio.Task[None],
                            staged: Staged, epochs: dict[int, int]) -> None:
        """Wait for a write in flight; on failure retry it (nothing else overlaps while retrying). A write that
        is fenced, or abandoned because ``stop`` was set mid-retry, re-positions its partitions: records staged
        after it must never be written past its unwritten records."""
        retried = False
        try:
            try:
                await task
                return
            except offsets.Fenced:
                raise
            except Exception as exc:
                retried = True
                if await self._with_retries(consumer, stop, lambda: self._write(consumer, staged, epochs),
                                            failed=exc):
                    self._retry_ended("committed", staged)
                    return
                self._retry_ended("abandoned", staged)
                log.warning("stopping with a batch unwritten; it will be re-read", extra={"stream": self.stream})
        except offsets.Fenced as fenced:
            if retried:
                self._retry_ended("fenced", staged)
            self.metrics.fenced.labels(self.stream).inc()
            log.warning("batch fenced: another owner moved the offsets; re-seeking",
                        extra={"stream": self.stream, "partitions": list(fenced.partitions)})
        self._reposition(consumer, dict.fromkeys({r.partition for r in staged.records}))

    def _retry_ended(self, outcome: str, staged: Staged) -> None:
        """One line per retried batch saying how its retries ended: ``committed`` (the first attempt had not
        committed), ``fenced`` (it had, or another owner moved on) or ``abandoned`` (stopping)."""
        log.info("retried write ended", extra={
            "stream": self.stream, "outcome": outcome,
            "offsets": {p: n for p, n in sorted(staged.prepared.advance.items())}})

    async def _with_retries(self, consumer: AIOKafkaConsumer, stop: asyncio.Event,
                            action: Callable[[], Awaitable[object]], failed: BaseException | None = None) -> bool:
        """``retry.until_done`` for this consumer: while failing, every partition is paused and the loop keeps
        polling, so the group membership survives. True once ``action`` succeeded; False when ``stop`` was set."""
        return await retry.until_done(
            action, stop=stop, backoff=self._backoff, fatal=(offsets.Fenced, CircuitOpen, LogMismatch),
            wait=lambda delay: self._poll_for(consumer, delay),
            on_failure=lambda exc, attempt, delay: self._failed(consumer, exc, attempt, delay),
            on_recovered=lambda: self._set_paused(consumer, None), failed=failed)

    def _failed(self, consumer: AIOKafkaConsumer, exc: BaseException, attempt: int, delay: float) -> None:
        component = retry.component_of(exc)
        self.metrics.retries.labels(component).inc()
        if component == "redis":
            self.metrics.redis_errors.inc()
        else:
            self.metrics.postgres_errors.inc()
        log.warning("transient failure; retrying", extra={
            "stream": self.stream, "component": component, "error": type(exc).__name__,
            "detail": str(exc)[:200], "attempt": attempt + 1, "retry_in_s": round(delay, 2)})
        if component != self.state.paused_reason:  # the pause names what the consumer waits on now
            self._set_paused(consumer, component)

    async def _poll_for(self, consumer: AIOKafkaConsumer, seconds: float) -> None:
        """Keep polling (records of paused partitions are not returned) for ``seconds``."""
        deadline = self.clock() + seconds
        while self.clock() < deadline:
            await self._poll(consumer, timeout_ms=int(max(0.01, deadline - self.clock()) * 1000))
            self.state.last_turn = self.clock()

    def _set_paused(self, consumer: AIOKafkaConsumer, reason: str | None) -> None:
        if self.state.paused_reason is not None:
            self.metrics.paused.labels(self.stream, self.state.paused_reason).set(0)
        self.state.paused_reason = reason
        if reason is not None:
            self.metrics.paused.labels(self.stream, reason).set(1)
        self._apply_pause(consumer, everything=reason is not None)

    def _refresh_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Lag gauges from the last fetch's high watermarks (at most once a second). A high watermark below the
        cursor means the log lost what we read (recreated, truncated): the partition is re-positioned, where the
        log's bounds are checked (a broker may answer such fetches with no error and no records)."""
        now = self.clock()
        if now - self._last_lag_refresh < 1.0:
            return
        self._last_lag_refresh = now
        shrunk: dict[int, tuple[int, int | None] | None] = {}
        for p, s in self.parts.positioned().items():
            tp = self._tp(p)
            high = consumer.highwater(tp)
            if high is None:
                continue
            if high >= s.cursor:
                self.metrics.lag.labels(self.stream, str(p)).set(high - s.position)
            elif consumer.last_poll_timestamp(tp) != s.poll_mark:  # reported by a fetch at this position
                shrunk[p] = (s.cursor, high)
                self.metrics.lag.labels(self.stream, str(p)).set(high)  # unknown, but never 0 while unread
        if shrunk:
            log.warning("high watermark below the position; re-positioning",
                        extra={"stream": self.stream, "partitions": sorted(shrunk)})
            self._reposition(consumer, shrunk)

    def _after_commit(self, consumer: AIOKafkaConsumer) -> None:
        self._refresh_lag(consumer)
        now = self.clock()
        if (self._kafka_commit is None or self._kafka_commit.done()) and now - self._last_kafka_commit >= 1.0:
            self._last_kafka_commit = now
            snapshot = {self._tp(p): s.stored for p, s in self.parts.positioned().items() if s.stored >= 0}
            self._kafka_commit = asyncio.create_task(self._commit_kafka(consumer, snapshot))

    async def _commit_kafka(self, consumer: AIOKafkaConsumer, snapshot: dict[TopicPartition, int]) -> None:
        """Best effort: Kafka's committed offsets only feed lag tools; Postgres holds the truth."""
        if not snapshot:
            return
        try:
            await consumer.commit(snapshot)
        except Exception as exc:
            log.debug("kafka commit skipped", extra={"stream": self.stream, "error": type(exc).__name__})

    def _caught_up(self, consumer: AIOKafkaConsumer) -> bool:
        """Every assigned partition is positioned and its position is exactly the high watermark (a position
        past it is a mismatch, never "caught up")."""
        if not self.state.joined or self.parts.unpositioned():
            return False
        positioned = self.parts.positioned()
        for p in consumer_partitions(consumer, self.topic):
            high = consumer.highwater(self._tp(p))
            s = positioned.get(p)
            if high is None or s is None or s.position != high:
                return False
        return True

    def positioned(self) -> bool:
        """True when every assigned partition has been positioned from Postgres."""
        return bool(self.state.assigned) and set(self.parts.positioned()) >= self.state.assigned

    def lag(self, consumer: AIOKafkaConsumer) -> dict[int, int | None]:
        """Per assigned partition: high watermark minus the position (None until positioned and fetched; the
        high watermark itself when the position is past it)."""
        out: dict[int, int | None] = {}
        positioned = self.parts.positioned()
        for p in consumer_partitions(consumer, self.topic):
            high, s = consumer.highwater(self._tp(p)), positioned.get(p)
            out[p] = None if high is None or s is None else (high - s.position if s.position <= high else high)
        return out


def consumer_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """Partitions of ``topic`` currently assigned to ``consumer``."""
    return {tp.partition for tp in consumer.assignment() if tp.topic == topic}


async def _finish_quietly(task: asyncio.Task[None], grace_s: float) -> None:
    """Give a best-effort task up to ``grace_s`` seconds, then cancel it. Its outcome never propagates, not even a
    cancellation of its own (a pending aiokafka commit can end cancelled after the broker was unreachable); only
    a cancellation of the caller does."""
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit
