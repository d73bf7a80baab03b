"""The two streams: which topic, schema, table and columns each uses. The only place these names live."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ingest.config import Config, PartitionConfig, partitions_for
from ingest.contract import Contract
from ingest.maintenance import TablePolicy
from ingest.quota.overrides import OverrideTables
from ingest.writer import StreamTables

META_COLUMNS = ("kafka_timestamp", "source_partition", "source_offset")
SHARED_TABLES = {"dead_letters": "dead_letters", "ledger": "dedupe_ledger", "offsets": "consumer_offsets",
                 "offset_changes": "offset_changes"}
"""The tables every stream shares: dead letters, the dedupe ledger, stored positions and their changes."""


@dataclass(frozen=True, slots=True)
class Stream:
    """A stream's fixed definition; ``columns`` start with tenant_id and idempotency_key (the dedupe key)."""

    name: str
    topic: str
    table: str
    schema_file: str
    columns: tuple[str, ...]

    def topic_for(self, config: Config) -> str:
        return config.topic_prefix + self.topic

    def group_for(self, config: Config) -> str:
        return f"{config.group_prefix}.{self.name}"

    def contract(self, config: Config) -> Contract:
        return Contract(load_schema(self.schema_file), self.columns, config.window)

    def tables(self) -> StreamTables:
        return StreamTables(events=self.table, columns=(*self.columns, *META_COLUMNS), **SHARED_TABLES)


WEBHOOK = Stream("webhook", "events.webhook", "webhook_events", "webhook.v1.json",
                 ("tenant_id", "idempotency_key", "event_type", "source", "occurred_at", "payload", "headers"))
AUDIT = Stream("audit", "events.audit", "audit_events", "audit.v1.json",
               ("tenant_id", "idempotency_key", "action", "actor_id", "occurred_at", "resource", "ip", "metadata"))
STREAMS: dict[str, Stream] = {s.name: s for s in (WEBHOOK, AUDIT)}
ALL = "all"
CHOICES: tuple[str, ...] = (*STREAMS, ALL)
"""What a ``--stream`` option that may name every stream accepts (``select`` resolves it)."""


def shared_tables() -> StreamTables:
    """For code that reads across streams: a ``StreamTables`` whose ``dead_letters``, ``ledger``, ``offsets`` and
    ``offset_changes`` are every stream's (checked here). Its ``events`` are the first stream's: take event tables
    from each stream."""
    tables = [s.tables() for s in STREAMS.values()]
    shared = {(t.dead_letters, t.ledger, t.offsets, t.offset_changes) for t in tables}
    if len(shared) != 1:
        raise RuntimeError(f"streams use different dead-letter, ledger, offsets or offset-changes tables "
                           f"{sorted(shared)}; code that reads across streams expects one of each")
    return tables[0]


def select(name: str) -> list[Stream]:
    """The stream called ``name``, or every stream for ``all``."""
    if name == ALL:
        return list(STREAMS.values())
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose {', '.join(CHOICES[:-1])} or {ALL}")
    return [STREAMS[name]]


def policies(config: Config, streams: Sequence[Stream],
             per_stream: Mapping[str, PartitionConfig] | None = None) -> list[TablePolicy]:
    """Partitioning policy of each stream's table. Retention is ``max(retention, accepted age)`` and premake
    ``max(premake, accepted ahead)``, so that every event the validator accepts has a partition (otherwise a
    valid row would land in DEFAULT)."""
    out = []
    for s in streams:
        cfg = (per_stream or {}).get(s.name) or partitions_for(config, s.name)
        out.append(TablePolicy(s.table, cfg.granularity, max(cfg.retention, config.window.max_age),
                               max(cfg.premake, config.window.max_ahead)))
    return out


@cache
def load_schema(filename: str) -> dict[str, Any]:
    """A published JSON Schema from the ``schemas`` package."""
    return dict(json.loads(resources.files("schemas").joinpath(filename).read_text("utf-8")))


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every file ``schemas/sql/NNN_name.sql``."""
    out = []
    for item in resources.files("schemas").joinpath("sql").iterdir():
        if item.name.endswith(".sql"):
            version, _, rest = item.name.partition("_")
            out.append((int(version), rest.removesuffix(".sql"), item.read_text("utf-8")))
    return sorted(out)


QUOTA_TABLES = OverrideTables(overrides="quota_overrides", version="quota_overrides_version")
"""Per-tenant quota overrides (every stream's) and their version row (schemas/sql/002_quotas.sql)."""
