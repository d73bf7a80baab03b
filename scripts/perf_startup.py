"""Start-up time: from starting ``ingest consume --stream webhook`` to its first committed batch.

Against a database migrated beforehand, with 1,000 events already published; the broker is
``INGEST_KAFKA_BOOTSTRAP`` (default 127.0.0.1:19093, e.g. from ``ingest dev up``). Polls ``consumer_offsets``
every 20 ms. Runs with the metrics/health server on (a free port), as in production; afterwards terminates the process and drops the database and topics.

    .venv/bin/python scripts/perf_startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid

import asyncpg

from consumers import run, settings, streams
from consumers.cli import sample
from ingest import broker
from ingest.publisher import Publisher
from ingest.services import with_database
from ingest.sql import ident


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def once() -> float:
    uid = uuid.uuid4().hex[:8]
    base = os.environ.get("INGEST_DATABASE_URL", "postgresql://127.0.0.1:5432/ingest")
    env = {"INGEST_KAFKA_BOOTSTRAP": os.environ.get("INGEST_KAFKA_BOOTSTRAP", "127.0.0.1:19093"),
           "INGEST_DATABASE_URL": with_database(base, f"startup_{uid}"),
           "INGEST_REDIS_PREFIX": f"startup_{uid}", "INGEST_TOPIC_PREFIX": f"startup_{uid}.",
           "INGEST_GROUP_PREFIX": f"startup_{uid}", "INGEST_SESSION_TIMEOUT_MS": "6000",
           "INGEST_REBALANCE_TIMEOUT_MS": "1000", "INGEST_HEARTBEAT_INTERVAL_MS": "500",
           "INGEST_METRICS_PORT": str(free_port()), "INGEST_LOG_LEVEL": "WARNING",
           "INGEST_TOPIC_REPLICATION_FACTOR": "1", "INGEST_TOPIC_MIN_INSYNC_REPLICAS": "1",
           "INGEST_PRODUCER_IDEMPOTENCE": "false"}
    cfg = settings.from_env(env)
    await run.run_migrations(cfg)
    await run.ensure_all_topics(cfg)
    stream = streams.WEBHOOK
    async with Publisher(cfg, topic=stream.topic_for(cfg), contract=stream.contract(cfg)) as pub:
        for event in sample.generate("webhook", 1000, n_tenants=10):
            await pub.send(event)
    conn = await asyncpg.connect(cfg.database_url)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "consumers.cli", "consume", "--stream", "webhook"],  # noqa: ASYNC220 - timed from here
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        offsets = stream.tables().offsets
        while not await conn.fetchval(f"SELECT count(*) FROM {ident(offsets)} WHERE next_offset > 0"):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
        await conn.close()
        await broker.delete_topics(cfg, [s.topic_for(cfg) for s in streams.STREAMS.values()])
        admin = await asyncpg.connect(with_database(base, "postgres"))
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(f'startup_{uid}')} WITH (FORCE)")
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    for _ in range(parser.parse_args().runs):
        print(f"start -> first committed batch: {await once():.2f} s", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
