"""Membership on the real broker: a gracefully stopped consumer's partitions move to the survivor promptly.

The Kubernetes manifests run consumers as a Deployment with dynamic membership (no INGEST_INSTANCE_ID; see
docs/scaling.md): a consumer stopping on SIGTERM leaves the group, so the survivor takes its partitions after one
rebalance instead of after the session timeout. This test uses the production group timings (the settings'
defaults: 30 s session, 3 s heartbeat, 60 s rebalance) and measures the hand-off from the moment the stopping
consumer's ``run`` returned to the moment the survivor owns every partition. The figure is printed (run with
``-s``) and must stay well below the session timeout, which is what a static member would cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from consumers import run, settings, streams
from ingest.config import Config
from ingest.consumer import consumer_partitions

pytestmark = pytest.mark.integration

HANDOFF_LIMIT_S = 10.0  # a third of the 30 s session timeout a static member's partitions would wait


async def test_graceful_stop_hands_partitions_to_the_survivor_within_seconds(config: Config) -> None:
    defaults = settings.from_env({})
    config = dataclasses.replace(
        config, instance_id=None,
        heartbeat_interval_ms=defaults.heartbeat_interval_ms, rebalance_timeout_ms=int(__import__("os").environ.get("RB", defaults.rebalance_timeout_ms)), session_timeout_ms=int(__import__("os").environ.get("SS", defaults.session_timeout_ms)))
    rt_a, rt_b = await run.open_runtime(config), await run.open_runtime(config)
    a, b = run.build_consumer(config, streams.WEBHOOK, rt_a), run.build_consumer(config, streams.WEBHOOK, rt_b)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    task_b = asyncio.create_task(b.run(stop_b))
    everything = set(range(config.topic_partitions))
    try:
        async with asyncio.timeout(120):
            while True:
                pa = consumer_partitions(a.consumer, a.topic) if a.consumer else set()
                pb = consumer_partitions(b.consumer, b.topic) if b.consumer else set()
                if pa and pb and not (pa & pb) and pa | pb == everything:
                    break
                await asyncio.sleep(0.05)
        stopping = time.monotonic()
        stop_b.set()
        await asyncio.wait_for(task_b, 40)
        stopped = time.monotonic()
        async with asyncio.timeout(config.session_timeout_ms / 1000 + 30):
            while consumer_partitions(a.consumer, a.topic) != everything:
                await asyncio.sleep(0.02)
        handed = time.monotonic()
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(task_a, task_b, return_exceptions=True)
        await rt_a.aclose()
        await rt_b.aclose()
    handoff = handed - stopped
    print(f"\ngraceful stop took {stopped - stopping:.2f} s; partitions reached the survivor {handoff:.2f} s later "
          f"(session timeout {config.session_timeout_ms / 1000:.0f} s)")
    assert handoff < HANDOFF_LIMIT_S
