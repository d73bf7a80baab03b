"""Sub-commands of ``ingest``, one module per group; each has ``register(sub)``."""

from __future__ import annotations

from types import ModuleType

from consumers.cli.commands import bench, config, core, dev, dlq, offsets, ops, quota

COMMAND_MODULES: list[ModuleType] = [core, dev, config, dlq, quota, ops, offsets, bench]
