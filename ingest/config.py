"""The one frozen configuration object. Built from the environment by ``consumers.settings``, nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta

from ingest.breaker import BreakerConfig
from ingest.codec import DecodeLimits
from ingest.contract import TimeWindow
from ingest.security import redact


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """A batch closes at whichever comes first: ``max_rows`` records, ``max_bytes`` of values, ``max_age``, or
    (the consumer's rule) the end of the previous batch's write."""

    max_rows: int = 5000
    max_bytes: int = 16 * 1024 * 1024
    max_age: timedelta = timedelta(milliseconds=100)


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    """A (stream, tenant, idempotency key) seen within ``window`` is a duplicate; Redis remembers keys for
    ``hint_ttl`` (a hint only: Postgres covers the whole window)."""

    window: timedelta = timedelta(days=7)
    hint_ttl: timedelta = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class PartitionConfig:
    """Partitions cover ``[now - retention, now + premake]``; a DEFAULT partition catches the rest (alerted)."""

    granularity: str = "day"
    premake: timedelta = timedelta(days=7)
    retention: timedelta = timedelta(days=90)
    lock_timeout_ms: int = 2000
    maintenance_interval: timedelta = timedelta(minutes=10)
    retention_action: str = "drop"  # or "archive": detach and move to schema archive
    export_dir: str = ""  # when set, partitions are exported to DIR/<name>.csv.gz before removal


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Default per-tenant, per-stream limits (0 = unlimited; ``burst`` 0 = one second's worth of ``per_second``).
    Overrides live in Postgres and are re-read every ``refresh``; with ``fail_open`` an unreachable Redis means
    per-process in-memory limits instead of paused consumption."""

    default_per_second: float = 0.0
    default_burst: int = 0
    default_per_day: int = 0
    refresh: timedelta = timedelta(seconds=2)
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client authenticates and encrypts: ``protocol`` PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL;
    SASL needs a mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), a username and a password; TLS verifies the broker
    against ``ssl_cafile`` (empty = the system store). Checked by ``ingest.security.check_kafka``, turned into client
    options by ``ingest.security.kafka_security``. Passwords are left out of the repr."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_key_password: str = field(default="", repr=False)
    ssl_check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ingest needs to run; immutable once built."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = "postgresql://127.0.0.1:5432/ingest"
    maintenance_database_url: str = ""  # the owner's URL for DDL; empty = database_url (see maintenance_url)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "ingest"
    topic_prefix: str = ""
    group_prefix: str = "ingest"
    instance_id: str | None = None
    topic_partitions: int = 12
    batch: BatchLimits = field(default_factory=BatchLimits)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    window: TimeWindow = field(default_factory=TimeWindow)
    partitions: PartitionConfig = field(default_factory=PartitionConfig)
    stream_partitions: tuple[tuple[str, PartitionConfig], ...] = ()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108
    tenant_label_limit: int = 50
    log_mismatch: str = "reset"  # or "stop": see ingest.consumer (a stored position the log no longer holds)
    session_timeout_ms: int = 30000
    rebalance_timeout_ms: int = 60000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    shutdown_timeout_s: float = 25.0
    log_level: str = "INFO"
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)

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
