"""Settings come from the environment in one place, fail with the variable's name, and match the README."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from consumers.settings import SETTINGS, SettingsError, from_env
from ingest.codec import NulPolicy
from ingest.config import Config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_match_the_config_defaults() -> None:
    cfg = from_env({})
    assert cfg.kafka_bootstrap == "127.0.0.1:9092"
    assert cfg.database_url == "postgresql://127.0.0.1:5432/ingest"
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"
    assert cfg.batch == Config().batch
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


def test_config_is_frozen() -> None:
    cfg = from_env({})
    with pytest.raises(AttributeError):
        cfg.kafka_bootstrap = "x"  # type: ignore[misc]


def test_readme_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(INGEST_[A-Z0-9_]+)` \| (.+?) \|", README.read_text(), re.M))
    assert set(rows) == {s.env for s in SETTINGS}
    for s in SETTINGS:
        assert rows[s.env] == (f"`{s.default}`" if s.default else "_(empty)_"), s.env
