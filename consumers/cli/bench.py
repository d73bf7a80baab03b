"""``ingest bench``: the real consumer path on a fresh database and fresh topics, with figures.

Backlog mode publishes N events first (from a child process, so the consumer's RSS is its own), then drains them
with the same code as ``ingest consume``. Rate mode publishes at a steady rate while the consumer runs. Both
report steady-state events/s (first to last commit), wall time, Kafka-timestamp-to-commit latency percentiles,
peak RSS, consumer CPU seconds per million events, and the raw binary COPY ceiling for the same rows in the same
run. Everything created (database, topics, Redis keys) is removed afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import random
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from tqdm import tqdm

import consumers.cli.sample as sample
import consumers.cli.soak as soak
from consumers import run, streams
from consumers.cli.report import HOSTILE
from ingest import kafka_options, ledger
from ingest.broker import delete_topics
from ingest.config import Config
from ingest.consumer import StreamConsumer, Totals
from ingest.pipeline import Outcome, prepare
from ingest.rows import SimpleRecord
from ingest.services import create_pool, redis_client, with_database
from ingest.sql import ident


@dataclass
class BenchOptions:
    events: int = 1_000_000
    tenants: int = 1000
    dup_rate: float = 0.05
    invalid_rate: float = 0.001
    stream: str = streams.WEBHOOK.name
    partitions: int = 12
    rate: float = 0.0  # events/s; 0 = backlog mode
    duration: float = 60.0
    seed: int = 1
    prefill_keys: int = 0  # ledger keys written before the run (a deployment's steady state)
    sample: float = 0.0  # seconds between resource samples (a soak, rate mode only); 0 = none
    linger_ms: int = 5  # the producer's linger in rate mode (records of one partition sent together)


@dataclass
class Recorder:
    """Collects per-batch figures from ``Pipeline.on_commit``. With ``keep`` set, at most that many latencies
    are kept (a uniform reservoir sample: a soak's memory must not grow with its length), and the latencies and
    events of the current sampling interval are kept apart (``take_window``)."""

    first_commit: float | None = None
    last_commit: float = 0.0
    events_after_first: int = 0
    latencies: list[float] = field(default_factory=list)
    keep: int | None = None
    seen: int = 0
    window: list[float] = field(default_factory=list)
    window_events: int = 0

    def __call__(self, outcome: Outcome, latencies: list[float]) -> None:
        now = time.perf_counter()
        n = outcome.stored + outcome.duplicates + outcome.rejected + outcome.quota_exceeded
        if self.first_commit is None:
            self.first_commit = now
        else:
            self.events_after_first += n
        self.last_commit = now
        if self.keep is None:
            self.latencies.extend(latencies)
            return
        self.window.extend(latencies)
        self.window_events += n
        for value in latencies:
            self.seen += 1
            if len(self.latencies) < self.keep:
                self.latencies.append(value)
            elif (i := random.randrange(self.seen)) < self.keep:
                self.latencies[i] = value

    def take_window(self) -> tuple[list[float], int]:
        window, events = self.window, self.window_events
        self.window, self.window_events = [], 0
        return window, events


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _values(opts: BenchOptions) -> Any:
    """(key, value) pairs: realistic events, ``dup_rate`` re-deliveries, ``invalid_rate`` hostile records."""
    rng = random.Random(opts.seed + 1)
    bad = [h for h in HOSTILE if h is not None]
    for event in sample.generate(opts.stream, opts.events, n_tenants=opts.tenants, dup_rate=opts.dup_rate,
                                 seed=opts.seed):
        key = event["tenant_id"].encode()
        if rng.random() < opts.invalid_rate:
            yield key, rng.choice(bad)
        else:
            yield key, orjson.dumps(event)


async def _produce(config: Config, topic: str, opts: BenchOptions, progress: bool) -> int:
    """Backlog: records go straight into per-partition batches (murmur2 of the key, like Kafka's default
    partitioner). Rate: ordinary keyed sends with a linger of ``opts.linger_ms``, paced to ``opts.rate`` (the Kafka
    timestamp is taken when a record is handed to the producer, so latency includes the producer's linger)."""
    producer = AIOKafkaProducer(**kafka_options.producer(config, client_id="ingest-bench",
                                                         linger_ms=opts.linger_ms if opts.rate else 20,
                                                         max_batch_size=1 << 20))
    await producer.start()
    sent = 0
    try:
        bar = tqdm(total=opts.events, desc="produce", unit="ev", disable=not progress, mininterval=1)
        pending: list[Any] = []
        if opts.rate:
            started = time.perf_counter()
            for key, value in _values(opts):
                pending.append(await producer.send(topic, key=key, value=value))
                sent += 1
                bar.update()
                delay = started + sent / opts.rate - time.perf_counter()
                if delay > 0.002:
                    await asyncio.sleep(delay)
                if time.perf_counter() - started >= opts.duration:
                    break
                if len(pending) >= 10000:
                    await asyncio.gather(*pending)
                    pending.clear()
        else:
            partitions = sorted(await producer.partitions_for(topic))
            batches: dict[int, Any] = {}
            for key, value in _values(opts):
                p = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
                batch = batches.get(p) or batches.setdefault(p, producer.create_batch())
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=p))
                    batch = batches[p] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                sent += 1
                bar.update()
            for q, b in batches.items():
                pending.append(await producer.send_batch(b, topic, partition=q))
        await asyncio.gather(*pending)
        bar.close()
    finally:
        await producer.stop()
    return sent


def _sampler(config: Config, opts: BenchOptions, consumer: StreamConsumer, recorder: Recorder, redis: Any,
             stop: asyncio.Event, progress: bool) -> asyncio.Task[list[soak.Sample]] | None:
    """With ``opts.sample``: sample resources every ``opts.sample`` seconds until ``stop``."""
    if not opts.sample:
        return None

    def lag() -> int:
        kafka = consumer.consumer
        return 0 if kafka is None else sum(v or 0 for v in consumer.lag(kafka).values())

    def show(s: soak.Sample) -> None:  # on stderr, unbuffered: a run that dies keeps every sample so far
        if progress:
            tqdm.write(f"{s.t:7.0f} s  rss {s.rss_mib} MiB  fds {s.open_fds}  pg {s.pg_connections}  "
                       f"redis {s.redis_used_mib} MiB / {s.redis_keys} keys  lag {s.lag}  p99 {s.p99_ms} ms",
                       file=sys.stderr)

    sampler = soak.Sampler(interval=opts.sample, database_url=config.database_url, redis=redis, lag=lag,
                           take_window=recorder.take_window, on_sample=show)

    async def sample() -> list[soak.Sample]:
        await sampler.run(stop)
        return sampler.samples

    return asyncio.create_task(sample())


def _produce_in_child(config: Config, topic: str, opts: BenchOptions, progress: bool, out: Any) -> None:
    # The config travels as the (picklable) dataclass; the SSL context is built in the child.
    out.put(asyncio.run(_produce(config, topic, opts, progress)))


async def _ceiling(config: Config, stream: streams.Stream, opts: BenchOptions, limit: int) -> float:
    """Rows/s of plain binary COPY of the same kind of rows into the same table (no validation, no dedupe)."""
    contract = stream.contract(config)
    now = datetime.now(UTC)

    ts = int(time.time() * 1000)
    recs = [SimpleRecord("t", 0, i, k, v, ts) for i, (k, v) in enumerate(_values(dataclasses.replace(opts, events=limit)))]
    rows = [c.row for c in prepare(stream.name, recs, contract, config.decode, now).candidates]
    pool = await create_pool(config.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            columns = stream.tables().columns
            started = time.perf_counter()
            for i in range(0, len(rows), config.batch.max_rows):
                async with conn.transaction():
                    await conn.copy_records_to_table(stream.table, records=rows[i:i + config.batch.max_rows],
                                                     columns=columns)
            return len(rows) / (time.perf_counter() - started)
    finally:
        await pool.close()


async def _prefill(config: Config, stream: streams.Stream, keys: int, progress: bool) -> dict[str, Any]:
    """Fill the dedupe ledger with ``keys`` keys as a deployment that has run for a whole window holds them: spread
    over the open epoch and the ``INGEST_DEDUPE_EPOCHS`` older ones a claim still probes (none collides with the
    run's keys), then VACUUM ANALYZE it."""
    pool = await create_pool(config.database_url, max_size=1)
    table = stream.tables().ledger
    length = ledger.epoch_length(config.dedupe.window, config.dedupe.epochs)
    chunk = 1_000_000
    started = time.perf_counter()
    try:
        async with pool.acquire() as conn:
            current = await conn.fetchval(f"SELECT max(epoch) FROM {ident(ledger.epochs_table(table))} WHERE opened_at IS NOT NULL")
            epochs = [current - k * length for k in range(config.dedupe.epochs + 1)]
            for k, epoch in enumerate(epochs[1:], 1):
                await conn.execute(f"CREATE TABLE {ident(ledger.partition_name(table, epoch))} "
                                   f"PARTITION OF {ident(table)} FOR VALUES IN ({int(epoch)})")
                await conn.execute(f"INSERT INTO {ident(ledger.epochs_table(table))} VALUES ($1, now() - $2::interval)", epoch,
                                   timedelta(seconds=k * length))
            bar = tqdm(total=keys, desc="prefill ledger", unit="key", disable=not progress, mininterval=1)
            for n, first in enumerate(range(0, keys, chunk)):
                last = min(first + chunk, keys) - 1
                await conn.execute(
                    f"""INSERT INTO {ident(table)} (digest, epoch)
                        SELECT substring(sha256(int8send(i)) FOR 16), $3 FROM generate_series($1::bigint, $2) AS i""",
                    first, last, epochs[n % len(epochs)])
                bar.update(last + 1 - first)
            bar.close()
            await conn.execute(f"VACUUM ANALYZE {ident(table)}")
            size = await conn.fetchval(
                "SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits WHERE inhparent = $1::regclass",
                ident(table))
    finally:
        await pool.close()
    return {"prefill_keys": keys, "prefill_seconds": round(time.perf_counter() - started, 1),
            "ledger_mib_before_run": round(size / 2**20, 1)}


async def bench(base: Config, opts: BenchOptions, *, progress: bool = True) -> dict[str, Any]:
    """Run one benchmark and return its figures (see module docstring); cleans up after itself."""
    uid = uuid.uuid4().hex[:8]
    db = f"ingest_bench_{uid}"
    config = dataclasses.replace(
        base, database_url=with_database(base.database_url, db), topic_prefix=f"bench_{uid}.",
        group_prefix=f"bench_{uid}", redis_prefix=f"bench_{uid}", topic_partitions=opts.partitions,
        metrics_port=0, maintenance_database_url="", session_timeout_ms=min(base.session_timeout_ms, 6000),
        rebalance_timeout_ms=min(base.rebalance_timeout_ms, 1000), heartbeat_interval_ms=500,
        producer_idempotence=False)  # the load generator: duplicates are what ingest dedupes; dev brokers lack it
    stream = streams.STREAMS[opts.stream]
    topic = stream.topic_for(config)
    try:
        await run.run_migrations(config)
        await run.ensure_all_topics(config)
        prefill = await _prefill(config, stream, opts.prefill_keys, progress) if opts.prefill_keys else {}
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_produce_in_child,
                            args=(config, topic, opts, progress, out))
        recorder = Recorder(keep=200_000 if opts.sample else None)
        stop = asyncio.Event()
        produce_seconds = 0.0
        if not opts.rate:  # backlog: everything is in Kafka before the consumer starts
            produce_started = time.perf_counter()
            child.start()
            await asyncio.to_thread(child.join)
            produce_seconds = time.perf_counter() - produce_started
        rt = await run.open_runtime(config)
        run.tune_gc()
        consumer = run.build_consumer(config, stream, rt)
        samples: list[soak.Sample] = []
        consumer.pipeline.on_commit = recorder
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            if opts.rate:
                # Steady rate: start producing once the consumer owns positioned partitions, so that the
                # latencies measure the pipeline, not the group join.
                task = asyncio.create_task(consumer.run(stop))
                async with asyncio.timeout(60):
                    while not consumer.positioned():  # noqa: ASYNC110 - polls the consumer task's state
                        await asyncio.sleep(0.05)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                sampling = _sampler(config, opts, consumer, recorder, rt.redis, stop, progress)
                child.start()
                await asyncio.to_thread(child.join)
                await asyncio.sleep(1.0)  # let the tail commit
                stop.set()
                totals: Totals = await task
                if sampling is not None:
                    samples = await sampling
            else:
                totals = await consumer.run(stop, drain=True)
        finally:
            await rt.aclose()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        published = out.get(timeout=10)
        consumed = totals.stored + totals.duplicates + totals.rejected + totals.quota_exceeded
        steady_span = recorder.last_commit - (recorder.first_commit or recorder.last_commit)
        steady = recorder.events_after_first / steady_span if steady_span > 0 else float("nan")
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the ceiling's row list
        ceiling = await _ceiling(config, stream, opts, min(opts.events, 200_000))
        figures: dict[str, Any] = {
            "mode": "rate" if opts.rate else "backlog",
            "stream": opts.stream, "events_published": published, "events_consumed": consumed,
            "stored": totals.stored, "duplicates": totals.duplicates, "rejected": totals.rejected,
            "quota_exceeded": totals.quota_exceeded, "batches": totals.batches,
            "partitions": opts.partitions, "tenants": opts.tenants,
            "batch_max_rows": config.batch.max_rows,
            "batch_max_age_ms": int(config.batch.max_age.total_seconds() * 1000),
            "produce_seconds": round(produce_seconds, 2),
            "wall_seconds": round(wall, 2),
            "steady_events_per_s": round(steady),
            "latency_p50_ms": round(_percentile(recorder.latencies, 0.50) * 1000, 1),
            "latency_p95_ms": round(_percentile(recorder.latencies, 0.95) * 1000, 1),
            "latency_p99_ms": round(_percentile(recorder.latencies, 0.99) * 1000, 1),
            "peak_rss_mib": round(peak_rss, 1),
            "cpu_seconds_per_million": round(cpu * 1e6 / max(consumed, 1), 2),
            "copy_ceiling_rows_per_s": round(ceiling),
            "ratio_to_ceiling": round(steady / ceiling, 3) if ceiling else None,
        }
        if opts.rate:
            figures["target_rate"] = opts.rate
            figures["linger_ms"] = opts.linger_ms
        figures.update(prefill)
        if samples:
            figures["sample_seconds"] = opts.sample
            figures["growth_last_20_min"] = soak.growth(samples, 1200)
            figures["samples"] = soak.as_json(samples)
        return figures
    finally:
        await _cleanup(config, base, db)


async def _cleanup(config: Config, base: Config, db: str) -> None:
    await delete_topics(config, [s.topic_for(config) for s in streams.STREAMS.values()])
    admin = await asyncpg.connect(with_database(base.database_url, "postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(db)} WITH (FORCE)")
    finally:
        await admin.close()
    redis = redis_client(config.redis_url, cluster=config.redis_cluster)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{config.redis_prefix}:*", count=5000)]
        for i in range(0, len(keys), 5000):
            await redis.delete(*keys[i:i + 5000])
    except Exception:
        pass
    finally:
        await redis.aclose()


def table(figures: dict[str, Any]) -> str:
    """The figures as an aligned two-column table."""
    width = max(len(k) for k in figures)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in figures.items())
