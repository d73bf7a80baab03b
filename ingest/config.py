"""The one frozen configuration object. Built from the environment by ``consumers.settings``, nowhere else.

No field has a default: every default is written once, in ``consumers.settings.SETTINGS`` (tests that want the
defaults build ``consumers.settings.from_env({})``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta

from ingest.breaker import BreakerConfig
from ingest.codec import DecodeLimits
from ingest.contract import TimeWindow
from ingest.redaction import redact


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """A batch closes at whichever comes first: ``max_rows`` records, ``max_bytes`` of values, ``max_age``, or
    (the consumer's rule) the end of the previous batch's write."""

    max_rows: int
    max_bytes: int
    max_age: timedelta


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    """A (stream, tenant, idempotency key) seen within ``window`` is a duplicate; Redis remembers keys for
    ``hint_ttl`` (a hint only: Postgres covers the whole window, cut into ``epochs`` ledger partitions)."""

    window: timedelta
    hint_ttl: timedelta
    epochs: int


@dataclass(frozen=True, slots=True)
class PartitionConfig:
    """Partitions cover ``[now - retention, now + premake]``; a DEFAULT partition catches the rest (alerted)."""

    granularity: str
    premake: timedelta
    retention: timedelta
    lock_timeout_ms: int
    maintenance_interval: timedelta
    retention_action: str  # or "archive": detach and move to schema archive
    export_dir: str  # when set, partitions are exported to DIR/<name>.csv.gz before removal


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Default per-tenant, per-stream limits (0 = unlimited; ``burst`` 0 = one second's worth of ``per_second``).
    Overrides live in Postgres and are re-read every ``refresh``; with ``fail_open`` an unreachable Redis means
    per-process in-memory limits instead of paused consumption."""

    default_per_second: float
    default_burst: int
    default_per_day: int
    refresh: timedelta
    fail_open: bool


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client authenticates and encrypts: ``protocol`` PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL;
    SASL needs a mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), a username and a password; TLS verifies the broker
    against ``ssl_cafile`` (empty = the system store). Checked by ``ingest.security.check_kafka``, turned into client
    options by ``ingest.security.kafka_security``. Passwords are left out of the repr."""

    protocol: str
    sasl_mechanism: str
    sasl_username: str
    sasl_password: str = field(repr=False)
    ssl_cafile: str
    ssl_certfile: str
    ssl_keyfile: str
    ssl_key_password: str = field(repr=False)
    ssl_check_hostname: bool


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ingest needs to run; immutable once built."""

    kafka_bootstrap: str
    database_url: str
    maintenance_database_url: str  # the owner's URL for DDL; empty = database_url (see maintenance_url)
    redis_url: str
    redis_cluster: bool  # redis_url names one node of a Redis Cluster
    redis_prefix: str
    topic_prefix: str
    group_prefix: str
    instance_id: str | None
    topic_partitions: int
    topic_replication_factor: int
    topic_min_insync_replicas: int
    producer_idempotence: bool  # enable.idempotence on every producer (kafka_options.producer)
    dlq_retention: timedelta  # dead letters older than this are deleted by maintenance; 0 = kept forever
    batch: BatchLimits
    dedupe: DedupeConfig
    decode: DecodeLimits
    breaker: BreakerConfig
    window: TimeWindow
    partitions: PartitionConfig
    stream_partitions: tuple[tuple[str, PartitionConfig], ...]
    metrics_host: str
    metrics_port: int
    tenant_label_limit: int
    log_mismatch: str  # "reset" or "stop": ingest.positions (a stored position the log no longer holds)
    session_timeout_ms: int
    rebalance_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int
    shutdown_timeout_s: float
    log_level: str
    log_format: str  # ingest.logs.FORMATS
    dev_dir: str  # where `ingest dev up` keeps its services' data (consumers.cli.dev)
    quota: QuotaConfig
    kafka_security: KafkaSecurity

    def __repr__(self) -> str:
        """The generated repr, but with every URL's password masked (a Config may end up in a log or traceback)."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={redact(value) if isinstance(value, str) else value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def maintenance_url(config: Config) -> str:
    """The URL for migrations and partition maintenance (the owner role): ``maintenance_database_url``, or
    ``database_url`` when that is empty. Callers doing DDL must use this, never ``database_url``."""
    return config.maintenance_database_url or config.database_url


def partitions_for(config: Config, stream: str) -> PartitionConfig:
    """The partition policy of ``stream``: its own when configured, else the global one."""
    return dict(config.stream_partitions).get(stream, config.partitions)
