"""Per-batch flow: decode/validate -> in-batch dedupe -> Redis hint -> one Postgres transaction -> hints, metrics.

``prepare`` is pure CPU work with no I/O (unit-testable). ``Pipeline.process`` does one Redis round trip before
the transaction and one after it, and one Postgres transaction, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

from ingest.breaker import Breaker
from ingest.codec import DecodeLimits, decode
from ingest.contract import Contract
from ingest.dedupe import RedisHints
from ingest.metrics import Metrics
from ingest.reject import Rejected
from ingest.rows import Candidate, DeadLetter, Key, Record
from ingest.writer import Writer, WriteResult

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

_KAFKA_TIME, _KEY, _TENANT = attrgetter("kafka_time"), attrgetter("key"), itemgetter(0)


def _text(value: object, limit: int) -> str | None:
    """A string Postgres can always store (no NUL, no lone surrogates), or None."""
    if not isinstance(value, str):
        return None
    return value[:limit].replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def _kafka_time(ms: int, now: datetime) -> datetime:
    """The record's Kafka timestamp; ``now`` when it is missing (-1) or outside what Postgres can hold."""
    if not 0 <= ms <= _MAX_MS:
        return now
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(slots=True)
class Prepared:
    """The outcome of the CPU stages for one batch."""

    candidates: list[Candidate] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    in_batch_duplicates: int = 0
    sanitized: int = 0
    advance: dict[int, int] = field(default_factory=dict)
    seen: set[Key] = field(default_factory=set)


def prepare(stream: str, records: Sequence[Record], contract: Contract, limits: DecodeLimits,
            now: datetime, into: Prepared | None = None) -> Prepared:
    """Validate every record; the contract's first two columns must be tenant_id and idempotency_key.

    Records go through the contract's compiled decoder first (one call per slice); the few it does not prove
    valid take the exact path (``decode`` + ``extract``), which names the reason. ``into`` continues an earlier
    call (same batch, next slice of records)."""
    out = into if into is not None else Prepared()
    seen = out.seen
    advance = out.advance
    fast = contract.compiled(limits).extract_many([r.value for r in records], now, contract.bounds(now))
    times: dict[int, datetime] = {}  # Kafka timestamps repeat within a batch (producer batches)
    candidates, dead_letters = out.candidates, out.dead_letters
    for rec, values in zip(records, fast, strict=True):
        p, off = rec.partition, rec.offset
        if advance.get(p, -1) <= off:
            advance[p] = off + 1
        ms = rec.timestamp
        ts = times.get(ms)
        if ts is None:
            ts = times[ms] = _kafka_time(ms, now)
        sanitized = False
        if values is None:
            obj: Any = None
            try:
                decoded = decode(rec.value, limits)
                obj = decoded.obj
                values = contract.extract(obj, now)
                sanitized = decoded.sanitized
            except Rejected as rej:
                tenant = obj.get("tenant_id") if isinstance(obj, dict) else None
                idem = obj.get("idempotency_key") if isinstance(obj, dict) else None
                dead_letters.append(DeadLetter(stream, str(rej.reason), _text(rej.detail, 1000), rec.value,
                                               _text(tenant, 256), _text(idem, 512), rec.topic, p, off, rec.key,
                                               ts))
                continue
        key: Key = (values[0], values[1])
        if key in seen:
            out.in_batch_duplicates += 1
            continue
        seen.add(key)
        out.sanitized += sanitized
        candidates.append(Candidate(key, (*values, ts, p, off), rec, ts))
    return out


@dataclass(slots=True)
class Outcome:
    """Counts for one committed batch."""

    stored: int
    duplicates: int
    rejected: int
    quota_exceeded: int
    write_seconds: float


@dataclass(slots=True)
class Staged:
    """A batch after the CPU stages and the Redis hint lookup, ready for ``Pipeline.commit``."""

    records: Sequence[Record]
    prepared: Prepared
    candidates: list[Candidate]
    hint_duplicates: int  # candidates Redis already knew as stored: counted as duplicates, never written
    digests: dict[Key, bytes] = field(default_factory=dict)  # Redis hint digest of each key, hashed once


class Pipeline:
    """Processes batches for one stream. Rules: ``stage`` may run while the previous batch's ``commit`` is in
    flight, but commits run one at a time and in order; ``aclose`` waits for the last Redis hint write."""

    SLICE = 200  # records validated between two yields to the event loop (keeps the write in flight moving)

    def __init__(self, *, stream: str, contract: Contract, limits: DecodeLimits, writer: Writer,
                 hints: RedisHints | None, metrics: Metrics, breaker: Breaker | None = None) -> None:
        self.stream, self.contract, self.limits = stream, contract, limits
        self.writer, self.hints, self.metrics = writer, hints, metrics
        self.breaker = breaker
        self.on_commit: Callable[[Outcome, list[float]], None] | None = None
        """Called after each commit with the outcome and each stored event's Kafka-to-commit latency (bench)."""
        self._remembering: asyncio.Task[None] | None = None
        self._batch_id = 0
        self._rejects: Counter[str] = Counter()  # since the last reject log line
        self._last_reject_log = 0.0

    REJECT_LOG_INTERVAL = 10.0  # seconds: at most one reject summary per stream in this interval

    async def stage(self, records: Sequence[Record]) -> Staged:
        """Validate (yielding to the loop every ``SLICE`` records), check the breaker, drop Redis-hinted
        duplicates. Raises ``breaker.CircuitOpen``; touches no Postgres."""
        now = datetime.now(UTC)
        prepared = Prepared()
        for i in range(0, len(records), self.SLICE):
            prepare(self.stream, records[i:i + self.SLICE], self.contract, self.limits, now, into=prepared)
            if len(records) > self.SLICE:
                await asyncio.sleep(0)
        if self.breaker is not None:
            reasons = Counter(d.reason for d in prepared.dead_letters)
            self.breaker.check(self.stream, len(records), len(prepared.dead_letters), reasons)
        candidates = prepared.candidates
        digests: dict[Key, bytes] = {}
        if self.hints is not None and candidates:
            digest = self.hints.digest
            digests = {c.key: digest(c.key) for c in candidates}
            seen = await self.hints.seen(list(digests.values()))
            candidates = [c for c, s in zip(candidates, seen, strict=True) if not s]
        return Staged(records, prepared, candidates, len(prepared.candidates) - len(candidates), digests)

    def stage_subset(self, records: Sequence[Record]) -> Staged:
        """``stage`` for a subset of an already staged batch (no breaker, no Redis: Postgres decides)."""
        prepared = prepare(self.stream, records, self.contract, self.limits, datetime.now(UTC))
        return Staged(records, prepared, prepared.candidates, 0)

    async def commit(self, conn: Conn, staged: Staged, expected: dict[int, int]) -> Outcome:
        """One Postgres transaction for ``staged``; raises ``offsets.Fenced`` or a database error (nothing
        committed). Redis learns the stored keys only after COMMIT, in the background."""
        prepared = staged.prepared
        started = time.perf_counter()
        result = await self.writer.write(conn, staged.candidates, prepared.dead_letters, expected,
                                         prepared.advance)
        elapsed = time.perf_counter() - started
        if self.hints is not None:
            if self._remembering is not None:
                await self._remembering  # at most one hint write outstanding
            known, digest = staged.digests, self.hints.digest
            digests = [known.get(c.key) or digest(c.key) for c in (*result.stored, *result.duplicates)]
            self._remembering = asyncio.create_task(self.hints.remember(digests))
        outcome = Outcome(
            stored=len(result.stored),
            duplicates=prepared.in_batch_duplicates + staged.hint_duplicates + len(result.duplicates),
            rejected=len(prepared.dead_letters) + len(result.refused),
            quota_exceeded=len(result.over_quota),
            write_seconds=elapsed,
        )
        self._observe(staged, result, outcome)
        self._log(staged, result, outcome)
        return outcome

    def _log(self, staged: Staged, result: WriteResult, outcome: Outcome) -> None:
        """One DEBUG line per batch; rejects summarised at WARNING at most every ``REJECT_LOG_INTERVAL``.
        Never payloads: reasons, counts and source coordinates only."""
        self._batch_id += 1
        prepared = staged.prepared
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch committed", extra={
                "stream": self.stream, "batch_id": self._batch_id, "records": len(staged.records),
                "offsets": {p: [min(r.offset for r in staged.records if r.partition == p), n - 1]
                            for p, n in prepared.advance.items()},
                "stored": outcome.stored, "duplicates": outcome.duplicates, "rejected": outcome.rejected,
                "quota_exceeded": outcome.quota_exceeded, "write_s": round(outcome.write_seconds, 4)})
        rejected = [*prepared.dead_letters, *result.refused]
        if not rejected and not result.over_quota:
            return
        self._rejects.update(d.reason for d in rejected)
        if result.over_quota:
            self._rejects["quota_exceeded"] += len(result.over_quota)
        now = time.monotonic()
        if now - self._last_reject_log >= self.REJECT_LOG_INTERVAL:
            example = rejected[0] if rejected else result.over_quota[0].dead_letter(self.stream, "quota_exceeded", "")
            log.warning("records dead-lettered", extra={
                "stream": self.stream, "batch_id": self._batch_id, "by_reason": dict(self._rejects),
                "example": {"reason": example.reason, "topic": example.source_topic,
                            "partition": example.source_partition, "offset": example.source_offset}})
            self._rejects.clear()
            self._last_reject_log = now

    async def process(self, conn: Conn, records: Sequence[Record], expected: dict[int, int]) -> Outcome:
        """``stage`` then ``commit`` (for callers that do not overlap batches)."""
        return await self.commit(conn, await self.stage(records), expected)

    async def aclose(self) -> None:
        """Wait for the last Redis hint write (it never raises)."""
        if self._remembering is not None:
            await self._remembering
            self._remembering = None

    def _observe(self, staged: Staged, result: WriteResult, outcome: Outcome) -> None:
        m, s, prepared = self.metrics, self.stream, staged.prepared
        m.events.labels(s, "stored").inc(outcome.stored)
        m.events.labels(s, "duplicate").inc(outcome.duplicates)
        m.events.labels(s, "rejected").inc(outcome.rejected)
        m.events.labels(s, "quota_exceeded").inc(outcome.quota_exceeded)
        reasons = Counter(d.reason for d in prepared.dead_letters)
        reasons.update(d.reason for d in result.refused)
        if result.over_quota:
            reasons["quota_exceeded"] += len(result.over_quota)
        for reason, n in reasons.items():
            m.dead_letters.labels(s, reason).inc(n)
        if prepared.sanitized:
            m.sanitized.labels(s, self.limits.nul_policy.value).inc(prepared.sanitized)
        if result.splits:
            m.poison_splits.labels(s).inc(result.splits)
        m.batches.labels(s).inc()
        m.batch_rows.labels(s).observe(outcome.stored)
        m.batch_write.labels(s).observe(outcome.write_seconds)
        now = time.time()
        latencies: list[float] = []  # one subtraction per distinct Kafka timestamp (they repeat within a batch)
        for kafka_time, n in Counter(map(_KAFKA_TIME, result.stored)).items():
            latencies += [max(0.0, now - kafka_time.timestamp())] * n
        m.latency.observe_many((s,), latencies)
        if self.on_commit is not None:
            self.on_commit(outcome, latencies)
        # Per tenant (bounded label, see Metrics.observe_tenants). Every record counted above is attributed, so
        # the per-tenant sums equal ingest_events_total; in-batch duplicates carry no tenant here (None).
        stored: Counter[str | None] = Counter(map(_TENANT, map(_KEY, result.stored)))
        quota: Counter[str | None] = Counter(c.key[0] for c in result.over_quota)
        refused: Counter[str | None] = Counter(d.tenant_id for d in result.refused)
        rejected: Counter[str | None] = Counter(d.tenant_id for d in prepared.dead_letters)
        rejected.update(refused)
        duplicates: Counter[str | None] = Counter(c.key[0] for c in result.duplicates)
        if staged.hint_duplicates:  # Redis-hinted duplicates never reached the writer
            kept = {id(c) for c in staged.candidates}
            duplicates.update(c.key[0] for c in prepared.candidates if id(c) not in kept)
        if prepared.in_batch_duplicates:
            duplicates[None] += prepared.in_batch_duplicates
        m.observe_tenants(s, {"stored": stored, "duplicate": duplicates, "rejected": rejected,
                              "quota_exceeded": quota})
