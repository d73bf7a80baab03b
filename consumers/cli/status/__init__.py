"""The operator's view: lag, progress, rates, tenants, dead letters, partition coverage and service health.

Reads only Kafka, Postgres and Redis (never a metrics endpoint), so it works from any machine with the same
settings. Used by ``ingest lag``, ``ingest status``, ``ingest partitions`` and ``ingest offsets``. One module per
job: ``kafka`` (probes), ``postgres`` (queries), ``lag`` (arithmetic), ``snapshot`` (the document), ``render``
(its text form).
"""

from consumers.cli.status.kafka import EndOffset, end_offsets, group_members, offsets_for_time
from consumers.cli.status.lag import lag_of, lag_report, mismatch_of, partition_row
from consumers.cli.status.postgres import connect_postgres, coverage, stored_offsets
from consumers.cli.status.render import render
from consumers.cli.status.snapshot import healthy, snapshot

__all__ = [
    "EndOffset", "connect_postgres", "coverage", "end_offsets", "group_members", "healthy", "lag_of",
    "lag_report", "mismatch_of", "offsets_for_time", "partition_row", "render", "snapshot", "stored_offsets",
]
