"""`ingest lag` and `ingest status` against the real broker, Postgres and Redis: what a test produced is what
they report (lag before draining, stored offsets and counts after), exit codes, and no secrets printed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import asyncpg
import orjson
import pytest

from consumers import streams
from consumers.cli import build_parser, sample, status
from ingest.config import Config
from tests.conftest import free_port
from tests.integration.helpers import drain, publish, publish_raw


async def run_cli(config: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run one ``ingest`` command handler in-process; return (exit code, stdout)."""
    capsys.readouterr()
    args = build_parser().parse_args(list(argv))
    rc = await args.handler(args, config)
    return rc, capsys.readouterr().out


def stream_doc(doc: dict[str, Any], name: str = "webhook") -> dict[str, Any]:
    return dict(doc["streams"][name])


async def test_status_and_lag_report_what_was_published_and_stored(
        config: Config, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    events = list(sample.generate("webhook", 120, n_tenants=4, dup_rate=0.0, seed=7))
    n = await publish(config, "webhook", events)
    bad = await publish_raw(config, "webhook", [(b"org-x", b"not json")] * 3)
    total = n + bad

    # before draining: everything is lag; `ingest lag --max-lag 0` exits 1
    rc, out = await run_cli(config, capsys, "lag", "--stream", "webhook", "--max-lag", "0", "--json")
    lag = orjson.loads(out)
    assert rc == 1 and not lag["ok"]
    assert lag["streams"]["webhook"]["total_lag"] == total
    assert sum(p["end_offset"] for p in lag["streams"]["webhook"]["partitions"]) == total
    rc, out = await run_cli(config, capsys, "lag", "--stream", "webhook")  # default --max-lag 1000
    assert rc == 0 and "ok: worst partition lag" in out

    rc, out = await run_cli(config, capsys, "status", "--json", "--stream", "webhook")
    doc = orjson.loads(out)
    assert rc == 0 and all(s["ok"] for s in doc["services"].values())
    st = stream_doc(doc)
    assert st["total_lag"] == total and st["stored_total"] == 0

    await drain(config, "webhook")

    rc, out = await run_cli(config, capsys, "lag", "--stream", "webhook", "--max-lag", "0", "--json")
    assert rc == 0 and orjson.loads(out)["streams"]["webhook"]["total_lag"] == 0

    rc, out = await run_cli(config, capsys, "status", "--json", "--stream", "webhook")
    st = stream_doc(orjson.loads(out))
    assert rc == 0
    assert st["stored_total"] == total  # offsets stored in Postgres: every record consumed
    assert all(p["lag"] == 0 and max(p["stored_offset"], 0) == p["end_offset"] for p in st["partitions"])
    assert st["last_minute"]["stored"] == n and st["last_minute"]["rejected"] == bad
    assert st["last_minute"]["duplicates"] is None  # not recorded in Postgres
    assert st["dead_letters_last_hour"] == {"not_json": bad}
    by_tenant: dict[str, int] = {}
    for e in events:
        by_tenant[e["tenant_id"]] = by_tenant.get(e["tenant_id"], 0) + 1
    assert {t["tenant_id"]: t["stored"] for t in st["top_tenants_by_volume"]} == by_tenant
    cov = st["partition_coverage"]
    assert cov["default_rows"] == 0 and cov["missing"] == [] and cov["ahead_seconds"] > 86400

    # quota rejections by tenant come from dead_letters
    await db.executemany(
        "INSERT INTO dead_letters (stream, reason, detail, tenant_id, source_topic, source_partition, source_offset)"
        " VALUES ('webhook', 'quota_exceeded', 'tenant over its quota', $1, 't', 0, $2)",
        [("org-q", i) for i in range(4)] + [("org-r", 9)])
    doc = await status.snapshot(config, [streams.WEBHOOK])
    assert stream_doc(doc)["top_tenants_by_quota_rejections"] == [
        {"tenant_id": "org-q", "rejected": 4}, {"tenant_id": "org-r", "rejected": 1}]
    assert stream_doc(doc)["last_minute"]["quota_exceeded"] == 5

    # the human view renders the same snapshot
    rc, out = await run_cli(config, capsys, "status", "--once")
    assert rc == 0 and "[webhook]" in out and "[audit]" in out and "quota rejections (1h): org-q 4" in out
    rc, out = await run_cli(config, capsys, "partitions", "list", "--stream", "webhook", "--json")
    listed = orjson.loads(out)["webhook"]["partitions"]
    assert sum(p["rows"] for p in listed if p["rows_exact"]) == n
    assert [p["name"] for p in listed if p["default"]] == ["webhook_events_default"]


def test_unreachable_services_exit_3_without_printing_secrets(env: dict[str, str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    secret_db = f"postgresql://root:s3cr3t-pw@{dead}/ingest"
    base = {**os.environ, **env, "INGEST_DATABASE_URL": secret_db,
            "INGEST_REDIS_URL": f"redis://:s3cr3t-pw@{dead}/0"}

    def ingest(*argv: str, **over: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "consumers.cli", *argv], env={**base, **over},
                              capture_output=True, text=True, timeout=60)

    lag = ingest("lag", INGEST_KAFKA_BOOTSTRAP=dead)
    assert lag.returncode == 3 and "kafka is unreachable" in lag.stderr
    lag = ingest("lag")  # Kafka is fine, Postgres is not
    assert lag.returncode == 3 and "postgres is unreachable" in lag.stderr
    st = ingest("status", "--json")
    doc = orjson.loads(st.stdout)
    assert st.returncode == 3
    assert not doc["services"]["postgres"]["ok"] and not doc["services"]["redis"]["ok"]
    assert doc["services"]["kafka"]["ok"]
    for proc in (lag, st):
        assert "s3cr3t-pw" not in proc.stdout + proc.stderr
