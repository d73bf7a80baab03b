"""Quotas under Postgres faults: a batch whose transaction fails after its quota call is retried and charged once.

Every case ends with the invariant check (quota dead letters allowed) and with exact per-tenant counts: with a
daily cap C per tenant and U > C unique events of a tenant, exactly C are stored and U - C are ``quota_exceeded``
dead letters, and Redis counts C used today and one denial per refused record — what one admission of each record
gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from consumers import quotas
from ingest.config import Config
from ingest.quota.gcra import parse_state
from ingest.quota.keys import state_key
from tests.faults.helpers import (
    Consumer,
    Published,
    RedisServer,
    check_invariants,
    publish_mix,
    wait_caught_up,
    wait_event,
    wait_positioned,
    wait_until,
)
from tests.faults.proxy import CUT_AFTER, CUT_BEFORE, Proxy, pg_query

CASE_ENV = {"INGEST_BATCH_MAX_ROWS": "200", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"}
CAP = 150  # per tenant and UTC day; each tenant publishes ~270 unique events


@pytest.mark.parametrize(("at", "action"), [("copy", CUT_BEFORE), ("commit", CUT_BEFORE), ("commit", CUT_AFTER)])
async def test_a_batch_retried_after_its_quota_call_is_charged_once(
        config: Config, env: dict[str, str], db_url: str, published: Published, pg_proxy: Proxy,
        redis_server: RedisServer, spawn: Callable[..., Consumer], at: str, action: str) -> None:
    """Every webhook tenant has a daily cap; the consumer's Postgres connection is cut (RST) after a batch's
    quota call: when its event COPY is sent (``copy``) or at its COMMIT, before it reaches the server
    (``cut_before``: rolled back) or after the server committed (``cut_after``: the retry is fenced).

    Expected: the retry succeeds (or is fenced) and the events judged before the cut keep their verdicts
    without being charged again: per tenant, stored = the cap and refused = unique - cap exactly, and Redis
    counts the same."""
    conn = await asyncpg.connect(db_url)
    try:
        for tenant in ("org-0000", "org-0001", "org-0002"):
            await quotas.set_override(conn, tenant, stream="webhook", per_day=CAP)
    finally:
        await conn.close()
    consumer = spawn({**env, **CASE_ENV}, "webhook")
    await wait_positioned(db_url, config, ["webhook"], consumers=[consumer])  # from now on, only batches commit
    pattern = b'COPY "webhook_events"' if at == "copy" else pg_query("COMMIT;")
    cut = pg_proxy.on(pattern, action, skip=1)
    await publish_mix(config, published, "webhook", 900, tenants=3, dup_rate=0.1, invalid=4, seed=81)
    await wait_event(cut.done, 60, f"{action} at the 2nd {at}", consumers=[consumer])
    await wait_until(consumer.reached("ingest_retries_total", 1, component="postgres"), 30, "a retry",
                     consumers=[consumer])
    await wait_caught_up(db_url, config, published, consumers=[consumer], timeout=90)
    fenced = await consumer.ametric("ingest_fenced_batches_total")
    assert fenced == (1 if action == CUT_AFTER else 0), f"fenced {fenced}\n{consumer.log(tail=20000)}"
    assert await consumer.aterminate() == 0
    print(await check_invariants(db_url, config, published, dead_lettered_ok=True))

    unique = Counter(t for t, _ in published.unique("webhook"))
    conn = await asyncpg.connect(db_url)
    redis = Redis.from_url(redis_server.url())
    try:
        stored = Counter({r[0]: r[1] for r in await conn.fetch(
            "SELECT tenant_id, count(*) FROM webhook_events GROUP BY tenant_id")})
        # A re-delivered copy of a refused event is judged again (its claim was given back), so it is refused
        # again and counted denied again: refused keys are per event, refused rows per record.
        refused = Counter({r[0]: r[1] for r in await conn.fetch(
            "SELECT tenant_id, count(DISTINCT idempotency_key) FROM dead_letters "
            "WHERE reason = 'quota_exceeded' GROUP BY tenant_id")})
        rows = Counter({r[0]: r[1] for r in await conn.fetch(
            "SELECT tenant_id, count(*) FROM dead_letters WHERE reason = 'quota_exceeded' GROUP BY tenant_id")})
        states = {t: parse_state(await redis.get(state_key(config.redis_prefix, "webhook", t))) for t in unique}
        judged = [k async for k in redis.scan_iter(match=f"{config.redis_prefix}:qj:*", count=1000)]
    finally:
        await conn.close()
        await redis.aclose()
    print(f"\n{at} {action}: unique {dict(unique)}, stored {dict(stored)}, refused {dict(refused)}, "
          f"redis {states}, fenced {fenced}")
    for tenant, n in unique.items():
        assert n > CAP, "every tenant must cross its cap"
        assert stored[tenant] == CAP, f"{tenant}: {stored[tenant]} stored, cap {CAP} (charged twice?)"
        assert refused[tenant] == n - CAP, f"{tenant}: {refused[tenant]} refused of {n} unique"
        state = states[tenant]
        assert state is not None and state.used == CAP, f"{tenant}: redis {state}"
        if action == CUT_AFTER:
            # The batch whose answer was lost committed but never settled: its verdicts stay (until they expire),
            # so a later copy of one of its refused events is refused again without being counted again.
            assert state.denied <= rows[tenant], f"{tenant}: redis {state}, {rows[tenant]} refused records"
        else:
            assert state.denied == rows[tenant], f"{tenant}: redis {state}, {rows[tenant]} refused records"
    if action != CUT_AFTER:
        assert judged == [], "committed batches leave no verdicts behind"
