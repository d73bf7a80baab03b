"""Shared test configuration: tests under tests/integration need real Postgres, Redis and the broker."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "faults" in parts:
            item.add_marker(pytest.mark.faults)
