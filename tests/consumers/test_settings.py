"""Settings come from the environment in one place, fail with the variable's name, and match the README."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from consumers.settings import MARKDOWN_COMMAND, SETTINGS, SettingsError, from_env, main, markdown
from ingest.codec import NulPolicy
from ingest.config import BatchLimits

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "configuration.md"


def test_defaults() -> None:
    cfg = from_env({})
    assert cfg.kafka_bootstrap == "127.0.0.1:9092"
    assert cfg.database_url == "postgresql://127.0.0.1:5432/ingest"
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"
    assert cfg.batch == BatchLimits(max_rows=5000, max_bytes=16 * 1024 * 1024, max_age=timedelta(milliseconds=100))
    assert cfg.dedupe.window == timedelta(days=7)
    assert cfg.window.max_age == cfg.partitions.retention == timedelta(days=90)
    assert cfg.decode.nul_policy is NulPolicy.REPLACE
    assert cfg.instance_id is None


def test_values_are_parsed() -> None:
    cfg = from_env({"INGEST_BATCH_MAX_ROWS": "100", "INGEST_BATCH_MAX_AGE_MS": "20", "INGEST_RETENTION_DAYS": "30",
                    "INGEST_NUL_POLICY": "reject", "INGEST_INSTANCE_ID": "pod-1",
                    "INGEST_ACCEPT_MAX_AGE_SECONDS": "3600"})
    assert cfg.batch.max_rows == 100 and cfg.batch.max_age == timedelta(milliseconds=20)
    assert cfg.partitions.retention == timedelta(days=30)
    assert cfg.window.max_age == timedelta(hours=1)
    assert cfg.decode.nul_policy is NulPolicy.REJECT
    assert cfg.instance_id == "pod-1"


@pytest.mark.parametrize(("name", "value"), [
    ("INGEST_BATCH_MAX_ROWS", "0"), ("INGEST_BATCH_MAX_ROWS", "many"), ("INGEST_NUL_POLICY", "ignore"),
    ("INGEST_PARTITION_GRANULARITY", "hour"), ("INGEST_LOG_LEVEL", "LOUD"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        from_env({name: value})


def test_production_durability_defaults() -> None:
    """Topics survive one broker loss without losing acknowledged events; producers are idempotent; dead letters
    do not grow forever."""
    cfg = from_env({})
    assert (cfg.topic_replication_factor, cfg.topic_min_insync_replicas) == (3, 2)
    assert cfg.producer_idempotence is True
    assert cfg.dlq_retention == timedelta(days=30)
    dev = from_env({"INGEST_TOPIC_REPLICATION_FACTOR": "1", "INGEST_TOPIC_MIN_INSYNC_REPLICAS": "1",
                    "INGEST_PRODUCER_IDEMPOTENCE": "false", "INGEST_DLQ_RETENTION_DAYS": "0"})
    assert (dev.topic_replication_factor, dev.topic_min_insync_replicas, dev.producer_idempotence) == (1, 1, False)
    assert dev.dlq_retention == timedelta(0)


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"INGEST_TOPIC_MIN_INSYNC_REPLICAS=2 .* INGEST_TOPIC_REPLICATION_FACTOR"):
        from_env({"INGEST_TOPIC_REPLICATION_FACTOR": "1"})
    with pytest.raises(SettingsError, match="INGEST_TOPIC_REPLICATION_FACTOR"):
        from_env({"INGEST_TOPIC_REPLICATION_FACTOR": "0"})


def test_config_is_frozen() -> None:
    cfg = from_env({})
    with pytest.raises(AttributeError):
        cfg.kafka_bootstrap = "x"  # type: ignore[misc]


def test_readme_points_at_the_reference_page_and_repeats_no_default() -> None:
    """The settings' defaults are listed once, in docs/configuration.md (checked below); the README links there."""
    text = README.read_text()
    assert "docs/configuration.md" in text
    assert not re.findall(r"^\| `INGEST_[A-Z0-9_]+` \|", text, re.M), "a settings table in the README goes stale"


def test_the_reference_page_is_generated_from_the_table() -> None:
    assert REFERENCE.read_text("utf-8") == markdown(), f"docs/configuration.md is out of date: run {MARKDOWN_COMMAND}"


def test_the_reference_page_lists_every_setting_with_its_default_and_meaning() -> None:
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `(INGEST_[A-Z0-9_]+)` \| (.+?) \| (.+) \|$", markdown(), re.M)}
    assert list(rows) == [s.env for s in SETTINGS]
    for s in SETTINGS:
        default, meaning = rows[s.env]
        assert default == (f"`{s.default}`" if s.default else "_(empty)_"), s.env
        assert s.doc.strip() and meaning.startswith(s.doc[:10]), s.env
    assert MARKDOWN_COMMAND in markdown().split("|")[0]  # the page says how it is made, above the table


def test_the_markdown_command_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


def test_per_stream_partition_policies() -> None:
    from ingest.config import partitions_for

    cfg = from_env({"INGEST_AUDIT_PARTITION_GRANULARITY": "month", "INGEST_WEBHOOK_RETENTION_DAYS": "30",
                    "INGEST_RETENTION_ACTION": "archive", "INGEST_MAINTENANCE_INTERVAL_SECONDS": "0"})
    audit, webhook = partitions_for(cfg, "audit"), partitions_for(cfg, "webhook")
    assert (audit.granularity, audit.retention) == ("month", timedelta(days=90))
    assert (webhook.granularity, webhook.retention) == ("day", timedelta(days=30))
    assert audit.retention_action == webhook.retention_action == "archive"
    assert cfg.partitions.maintenance_interval == timedelta(0)
    assert partitions_for(from_env({}), "audit") == from_env({}).partitions
    with pytest.raises(SettingsError, match="INGEST_WEBHOOK_PARTITION_GRANULARITY"):
        from_env({"INGEST_WEBHOOK_PARTITION_GRANULARITY": "hour"})


def test_quota_settings() -> None:
    cfg = from_env({})
    assert (cfg.quota.default_per_second, cfg.quota.default_burst, cfg.quota.default_per_day) == (0, 0, 0)
    assert cfg.quota.refresh == timedelta(seconds=2) and cfg.quota.fail_open is False
    cfg = from_env({"INGEST_QUOTA_DEFAULT_PER_SECOND": "2.5", "INGEST_QUOTA_DEFAULT_BURST": "10",
                    "INGEST_QUOTA_DEFAULT_PER_DAY": "1000", "INGEST_QUOTA_REFRESH_SECONDS": "0.5",
                    "INGEST_QUOTA_FAIL_OPEN": "true"})
    assert (cfg.quota.default_per_second, cfg.quota.default_burst, cfg.quota.default_per_day) == (2.5, 10, 1000)
    assert cfg.quota.refresh == timedelta(milliseconds=500) and cfg.quota.fail_open is True
    for name, value in [("INGEST_QUOTA_DEFAULT_PER_SECOND", "-1"), ("INGEST_QUOTA_DEFAULT_BURST", "x"),
                        ("INGEST_QUOTA_REFRESH_SECONDS", "0"), ("INGEST_QUOTA_FAIL_OPEN", "maybe"),
                        ("INGEST_QUOTA_DEFAULT_PER_SECOND", "inf")]:
        with pytest.raises(SettingsError, match=name):
            from_env({name: value})
