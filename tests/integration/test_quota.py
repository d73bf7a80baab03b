"""Quotas against the real Redis and Postgres: the Lua script and the Python GCRA agree (Redis alone), burst
then rate and the daily cap with a controlled clock, one budget across processes, live limit changes, Redis outages (paused and fail-open), one round trip for 5,000
tenants, the CLI, and the whole consumer (over-quota events dead-lettered, then replayed once)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from consumers import quotas, streams
from consumers.cli import sample
from ingest.config import Config
from ingest.metrics import Metrics
from ingest.quota.gcra import SCRIPT, LocalLimiter, parse_state, script_args, state_ttl_ms
from ingest.quota.keys import state_key
from ingest.quota.limits import US, LimitBook, Limits
from ingest.quota.overrides import PostgresOverrides
from ingest.quota.stage import RedisQuota
from ingest.services import create_pool
from tests.integration.conftest import REDIS_URL
from tests.integration.helpers import drain, publish, publish_raw, start_redis, stop_redis, stored_keys

UNLIMITED = Limits()
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def pool(config: Config) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(config.database_url, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def redis(config: Config) -> AsyncIterator[Redis]:
    client = Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=3)
    yield client
    await client.aclose()


@pytest.fixture
async def bare_redis() -> AsyncIterator[tuple[Redis, str]]:
    """Redis alone (no broker, no database) and a key prefix of this test's own; its keys are deleted after."""
    client = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=3)
    prefix = f"t_{uuid.uuid4().hex[:10]}"
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_lua_script_and_python_gcra_agree(bare_redis: tuple[Redis, str]) -> None:
    """The same calls (keys, counts, limits, now) to the Lua script in Redis and to the Python GCRA: the same
    admitted counts, the same stored state, the same expiry. Random limits per call (fractional rates, burst
    0 = default, caps, unlimited), repeated instants, and steps across UTC midnight and whole days."""
    redis, prefix = bare_redis
    script = redis.register_script(SCRIPT)
    local = LocalLimiter()
    rng = random.Random(11)
    profiles = [Limits(), Limits(0.5), Limits(3, 10), Limits(7, 3, 40), Limits(1000, 50, 120), Limits(12_345.6),
                Limits(per_day=25), Limits(2, 5, 30), Limits(1e-4, 4)]
    keys = [state_key(prefix, "gcra", f"t{i}") for i in range(8)]
    now = round(datetime(2024, 3, 1, 23, 58, 0, tzinfo=UTC).timestamp() * US)
    for _ in range(400):
        now += rng.choice([0, 0, 0, 1, 997, 100_000, 370_000, US, 3 * US, 40 * US, 86_400 * US])
        chosen = rng.sample(keys, rng.randint(1, len(keys)))
        batch = [(k, rng.choice([0, 1, 1, 2, 5, 30, 400]), rng.choice(profiles)) for k in chosen]
        expected = local.decide(batch, now)
        got = await script(keys=chosen, args=script_args(now, [(c, lim) for _, c, lim in batch]))
        assert [int(k) for k in got] == expected, (now, batch)
        pipe = redis.pipeline()
        for k in chosen:
            pipe.get(k)
            pipe.pttl(k)
        replies = await pipe.execute()
        for k, value, pttl in zip(chosen, replies[::2], replies[1::2], strict=True):
            assert parse_state(value) == local.states[k], (k, now)
            assert 0 <= state_ttl_ms(local.states[k], now) - pttl < 1000, (k, now)


def make(config: Config, redis: Redis, pool: asyncpg.Pool, *, clock: Clock | None, default: Limits = UNLIMITED,
         refresh_s: float = 2.0, **kw: Any) -> RedisQuota:
    metrics = kw.pop("metrics", None) or Metrics()
    book = LimitBook("webhook", default, PostgresOverrides(pool, streams.QUOTA_TABLES), refresh_s=refresh_s,
                     metrics=metrics)
    return RedisQuota(redis, prefix=config.redis_prefix, stream="webhook", book=book, clock=clock,
                      metrics=metrics, **kw)


async def set_quota(pool: asyncpg.Pool, tenant: str, **kw: Any) -> None:
    async with pool.acquire() as conn:
        await quotas.set_override(conn, tenant, **kw)


async def test_burst_then_rate_with_a_controlled_clock(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    await set_quota(pool, "t1", per_second=100, burst=200)
    clock = Clock()
    q = make(config, redis, pool, clock=clock)
    assert await q.admit(["t1"] * 250) == [True] * 200 + [False] * 50
    assert await q.admit(["t1"]) == [False]  # empty bucket, same instant
    clock.t += 0.5
    assert sum(await q.admit(["t1"] * 100)) == 50  # 100/s for half a second
    clock.t += 0.01
    assert await q.admit(["t1", "t1"]) == [True, False]
    clock.t += 60
    assert sum(await q.admit(["t1"] * 1000)) == 200  # idle: the burst is back, never more
    # Other tenants are unlimited by default and interleave freely; the order of t1's verdicts is kept.
    clock.t += 60
    batch = ["t1", "x", "t1", "y"] * 150
    verdicts = await q.admit(batch)
    t1 = [v for t, v in zip(batch, verdicts, strict=True) if t == "t1"]
    assert t1 == [True] * 200 + [False] * 100
    assert all(v for t, v in zip(batch, verdicts, strict=True) if t != "t1")


async def test_a_retried_batch_is_charged_once(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    """With the events' keys, judging the same events again (a retried batch) returns the first verdicts and
    charges nothing; new events in the retry are judged after them; ``settle`` drops the verdicts, and only
    for limited tenants."""
    await set_quota(pool, "t9", per_second=1, burst=3)
    clock = Clock()
    q = make(config, redis, pool, clock=clock)
    keys = [("t9", f"k{i}") for i in range(5)] + [("free", "f0")]
    tenants = [k[0] for k in keys]
    first = await q.admit(tenants, keys)
    assert first == [True] * 3 + [False] * 2 + [True]
    state = await redis.get(state_key(config.redis_prefix, "webhook", "t9"))
    for _ in range(3):  # the retries: same verdicts, the state (TAT, used, denied) untouched
        assert await q.admit(tenants, keys) == first
        assert await redis.get(state_key(config.redis_prefix, "webhook", "t9")) == state
    clock.t += 1.0  # one more token: a retry that also carries a new event charges only the new one
    assert await q.admit(["t9", "t9", "t9"], [("t9", "k0"), ("t9", "k4"), ("t9", "k5")]) == [True, False, True]
    assert parse_state(await redis.get(state_key(config.redis_prefix, "webhook", "t9"))).used == 4  # type: ignore[union-attr]
    judged = [k async for k in redis.scan_iter(match=f"{config.redis_prefix}:qj:*", count=1000)]
    assert len(judged) == 6  # t9's six events; the unlimited tenant's event is never kept
    await q.settle([*keys, ("t9", "k5")])
    assert [k async for k in redis.scan_iter(match=f"{config.redis_prefix}:qj:*", count=1000)] == []
    assert await q.admit(["t9"], [("t9", "k0")]) == [False]  # settled: judged afresh (a replay), bucket empty


async def test_daily_cap_and_utc_rollover(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    await set_quota(pool, "t2", per_day=1000)
    clock = Clock(datetime(2024, 3, 1, 23, 59, 58, tzinfo=UTC).timestamp())
    q = make(config, redis, pool, clock=clock)
    assert sum(await q.admit(["t2"] * 700)) == 700
    assert await q.admit(["t2"] * 400) == [True] * 300 + [False] * 100
    clock.t += 1.5
    assert await q.admit(["t2"]) == [False]  # 23:59:59.5: still the same UTC day
    clock.t += 0.5
    assert sum(await q.admit(["t2"] * 1200)) == 1000  # 00:00:00 on 2 March: a new day
    assert await q.admit(["t2"]) == [False]


async def test_lua_script_and_python_fallback_agree(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    rng = random.Random(5)
    lim = {"a": Limits(7, 3, 40), "b": Limits(0.5, 0, 0), "c": Limits(1000, 50, 120), "d": Limits(3, 10, 0)}
    default = Limits(2, 5, 30)
    for t, lm in lim.items():
        await set_quota(pool, t, per_second=lm.per_second, burst=lm.burst, per_day=lm.per_day)
    clock = Clock(datetime(2024, 3, 1, 23, 59, 0, tzinfo=UTC).timestamp())
    q = make(config, redis, pool, clock=clock, default=default)
    local = LocalLimiter()
    for _ in range(300):
        clock.t += rng.choice([0, 0, 0.001, 0.1, 0.37, 1, 3])
        batch = [rng.choice("abcde") for _ in range(rng.randint(1, 40))]
        verdicts = await q.admit(batch)
        counts: dict[str, int] = {}
        for t in batch:
            counts[t] = counts.get(t, 0) + 1
        expected = local.decide([(t, c, lim.get(t, default)) for t, c in counts.items()], round(clock.t * US))
        got = {t: sum(v for b, v in zip(batch, verdicts, strict=True) if b == t) for t in counts}
        assert got == dict(zip(counts, expected, strict=True))


async def test_two_processes_share_one_budget(config: Config, pool: asyncpg.Pool) -> None:
    await set_quota(pool, "shared", per_second=10, burst=100)
    clients = [Redis.from_url(config.redis_url) for _ in range(2)]
    clock = Clock()
    try:
        a, b = (make(config, c, pool, clock=clock) for c in clients)
        results = await asyncio.gather(*(q.admit(["shared"] * 30) for q in (a, b, a, b, a)))
        assert sum(map(sum, results)) == 100  # 150 asked, the one burst of 100 given once
        assert sum(await b.admit(["shared"] * 5)) == 0
        clock.t += 1
        assert sum(await a.admit(["shared"] * 5)) + sum(await b.admit(["shared"] * 10)) == 10
    finally:
        for c in clients:
            await c.aclose()


async def test_redis_time_is_the_default_clock(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    await set_quota(pool, "rt", per_second=1, burst=5)
    q = make(config, redis, pool, clock=None)
    assert await q.admit(["rt"] * 7) == [True] * 5 + [False] * 2
    state = parse_state(await redis.get(state_key(config.redis_prefix, "webhook", "rt")))
    assert state is not None
    tat = state.tat
    now = time.time() * US
    assert now + 4 * US <= tat <= now + 6 * US  # the TAT was set from Redis TIME, i.e. real time


async def test_limit_change_is_picked_up_within_the_refresh_interval(
        config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    await set_quota(pool, "live", per_second=1, burst=1)
    clock = Clock()
    q = make(config, redis, pool, clock=clock, refresh_s=0.3)
    assert await q.admit(["live"] * 3) == [True, False, False]
    changed = time.monotonic()
    await set_quota(pool, "live", per_second=0)  # unlimited from now on
    async with asyncio.timeout(5):
        while not all(await q.admit(["live"] * 3)):
            await asyncio.sleep(0.05)
    assert time.monotonic() - changed < 0.3 + 0.5
    # And back: a tenant-wide daily cap appears for a tenant that had no override at all.
    await set_quota(pool, "fresh", per_day=2)
    async with asyncio.timeout(5):
        while sum(await q.admit(["fresh"] * 3)) != 0:
            await asyncio.sleep(0.05)


async def test_redis_down_pauses_then_recovers(config: Config, redis: Redis, pool: asyncpg.Pool,
                                               redis_back: None) -> None:
    await set_quota(pool, "t3", per_second=100, burst=200)
    metrics = Metrics()
    q = make(config, redis, pool, clock=Clock(), metrics=metrics)
    assert sum(await q.admit(["t3"] * 10)) == 10
    stop_redis()
    try:
        for _ in range(2):
            with pytest.raises(Exception) as info:
                await q.admit(["t3"] * 10)
            assert type(info.value).__module__.startswith("redis")  # the consumer retries it as "redis"
        assert metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "paused"}) == 1
        assert await q.admit(["someone-unlimited"]) == [True]  # no limited tenant: no Redis needed
    finally:
        start_redis()
    assert sum(await q.admit(["t3"] * 10)) == 10
    assert metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "paused"}) == 0


async def test_fail_open_applies_local_limits_while_redis_is_down(config: Config, redis: Redis,
                                                                  pool: asyncpg.Pool, redis_back: None) -> None:
    await set_quota(pool, "t4", per_second=100, burst=200)
    metrics = Metrics()
    clock = Clock()
    q = make(config, redis, pool, clock=clock, metrics=metrics, fail_open=True, probe_interval_s=0.2)
    assert sum(await q.admit(["t4"] * 150)) == 150
    stop_redis()
    try:
        # Local state starts empty: this process gets a full burst of its own, then the rate.
        assert await q.admit(["t4"] * 250) == [True] * 200 + [False] * 50
        assert metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "fail_open"}) == 1
        clock.t += 1
        assert sum(await q.admit(["t4"] * 150)) == 100
    finally:
        start_redis()
    async with asyncio.timeout(10):
        while metrics.registry.get_sample_value("ingest_quota_degraded", {"mode": "fail_open"}) != 0:
            await q.admit(["t4"])
            await asyncio.sleep(0.05)
    await q.aclose()


async def test_5000_tenants_cost_one_round_trip(config: Config, redis: Redis, pool: asyncpg.Pool) -> None:
    q = make(config, redis, pool, clock=Clock(), default=Limits(per_second=1, burst=2))
    await q.admit(["warm-up"])  # loads the script into Redis (EVALSHA -> NOSCRIPT -> SCRIPT LOAD once)
    sent: list[tuple[Any, ...]] = []
    original = redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await original(*args, **options)

    redis.execute_command = counting  # type: ignore[method-assign]
    tenants = [f"tenant-{i:05d}" for i in range(5000)]
    batch = tenants * 3  # 15,000 events, each tenant's burst is 2
    verdicts = await q.admit(batch)
    redis.execute_command = original  # type: ignore[method-assign]
    assert len(sent) == 1 and sent[0][0] == "EVALSHA"
    assert sent[0][2] == 5000  # numkeys: one entry per distinct tenant, not per event
    assert verdicts == [True] * 10000 + [False] * 5000
    assert await redis.exists(state_key(config.redis_prefix, "webhook", "tenant-04999")) == 1


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "consumers.cli", "quota", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


async def test_cli_set_get_list_reset(config: Config, env: dict[str, str], redis: Redis, pool: asyncpg.Pool) -> None:
    assert cli(env, "set", "acme", "--per-second", "5", "--burst", "7").returncode == 0
    assert cli(env, "set", "acme", "--stream", "audit", "--per-day", "100").returncode == 0
    assert cli(env, "set", "bad{tenant}", "--per-day", "1").returncode == 2
    assert cli(env, "set", "acme").returncode == 2
    q = make(config, redis, pool, clock=None)
    assert sum(await q.admit(["acme"] * 10)) == 7
    got = cli(env, "get", "acme")
    assert got.returncode == 0, got.stderr
    assert "webhook: rate 5/s burst 7, per day unlimited" in got.stdout
    assert "audit: rate 5/s burst 7, per day 100" in got.stdout
    listed = cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("webhook") and "acme" in x).split()
    assert line[:7] == ["webhook", "acme", "5", "7", "unlimited", "7", "3"]
    assert 0 <= int(line[7]) <= 7  # burst_left refills at 5/s while the CLI starts
    assert cli(env, "reset", "acme").returncode == 0
    assert sum(await q.admit(["acme"] * 10)) == 7  # a full burst again
    assert cli(env, "unset", "acme").returncode == 0
    assert "no tenant" not in cli(env, "list").stdout  # acme/audit override remains


async def test_consumer_dead_letters_over_quota_then_replays_once(config: Config, db: asyncpg.Connection,
                                                                   pool: asyncpg.Pool) -> None:
    # `ingest quota set tenant-x --per-second 100 --burst 200`
    await set_quota(pool, "tenant-x", per_second=100, burst=200)
    xs = [{**e, "tenant_id": "tenant-x", "idempotency_key": f"x-{i}"}
          for i, e in enumerate(sample.generate("webhook", 3000, n_tenants=1, dup_rate=0, seed=41))]
    others = list(sample.generate("webhook", 3000, n_tenants=30, dup_rate=0, seed=42))
    mixed = [e for pair in zip(xs, others, strict=True) for e in pair]
    await publish(config, "webhook", mixed)

    started = time.monotonic()
    totals = await drain(config, "webhook")
    elapsed = time.monotonic() - started

    stored = await stored_keys(db, "webhook")
    stored_x = sum(1 for (t, _) in stored if t == "tenant-x")
    assert 200 <= stored_x <= 200 + 100 * elapsed + 20, (stored_x, elapsed)
    assert sum(1 for (t, _) in stored if t != "tenant-x") == 3000
    assert max(stored.values()) == 1
    dead = await db.fetch("SELECT tenant_id, reason, raw FROM dead_letters")
    assert {(r["tenant_id"], r["reason"]) for r in dead} == {("tenant-x", "quota_exceeded")}
    assert len(dead) == 3000 - stored_x == totals["webhook"].quota_exceeded

    # `ingest quota set tenant-x --per-second 0`, then replay the dead-lettered bytes as they were.
    await set_quota(pool, "tenant-x", per_second=0)
    await publish_raw(config, "webhook", [(b"tenant-x", r["raw"]) for r in dead])
    await drain(config, "webhook")
    stored = await stored_keys(db, "webhook")
    x_keys = {k: n for k, n in stored.items() if k[0] == "tenant-x"}
    assert set(x_keys) == {("tenant-x", e["idempotency_key"]) for e in xs}
    assert set(x_keys.values()) == {1}
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == len(dead)  # nothing new refused
