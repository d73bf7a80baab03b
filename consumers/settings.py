"""Build the one ``Config`` from the environment. No other module reads ``os.environ``.

Each setting is declared once in ``SETTINGS`` (name, default, meaning): the only place a default is written (the
``ingest.config`` dataclasses have none; ``from_env({})`` is the all-defaults ``Config``). docs/configuration.md
is generated from it (``python -m consumers.settings --markdown``) and the README table is checked against it.
Any setting ``NAME`` may instead be given as ``NAME_FILE``, the path of a file holding the value (a mounted
Kubernetes or Docker secret; one trailing newline is ignored); setting both is an error. Error messages show
values with URL passwords masked, never the content of a secret.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from consumers.streams import STREAMS
from ingest import positions
from ingest.breaker import BreakerConfig
from ingest.codec import DecodeLimits, NulPolicy
from ingest.config import BatchLimits, Config, DedupeConfig, KafkaSecurity, PartitionConfig, QuotaConfig
from ingest.contract import TimeWindow
from ingest.logs import FORMATS
from ingest.partitions import GRANULARITIES
from ingest.redaction import redact
from ingest.security import PROTOCOLS, SecurityError, check_database_url, check_kafka, check_redis_url


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    default: str
    doc: str


def _per_stream(stream: str, setting: str) -> str:
    """The name of a per-stream setting: ``INGEST_<STREAM>_<SETTING>``."""
    return f"INGEST_{stream.upper()}_{setting}"


def _listed(names: Iterable[str]) -> str:
    """The names in backticks: ``"`a` and `b`"``, ``"`a`, `b` and `c`"``."""
    quoted = [f"`{n}`" for n in names]
    return f"{', '.join(quoted[:-1])} and {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


SETTINGS: tuple[Setting, ...] = (
    Setting("INGEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers (comma-separated)."),
    Setting("INGEST_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (see docs/connections.md)."),
    Setting("INGEST_KAFKA_SASL_MECHANISM", "", "With `SASL_*`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`."),
    Setting("INGEST_KAFKA_SASL_USERNAME", "", "SASL user name."),
    Setting("INGEST_KAFKA_SASL_PASSWORD", "", "SASL password (a secret: prefer `INGEST_KAFKA_SASL_PASSWORD_FILE`)."),
    Setting("INGEST_KAFKA_SSL_CA_FILE", "", "PEM file of the CA(s) that signed the brokers' certificates (default: the system store)."),
    Setting("INGEST_KAFKA_SSL_CERT_FILE", "", "PEM client certificate, for brokers that require mutual TLS..."),
    Setting("INGEST_KAFKA_SSL_KEY_FILE", "", "...and its private key (default: in the certificate file)."),
    Setting("INGEST_KAFKA_SSL_KEY_PASSWORD", "", "Password of an encrypted client key (a secret)."),
    Setting("INGEST_KAFKA_SSL_CHECK_HOSTNAME", "true", "Verify that the broker's certificate names the host it was reached at."),
    Setting("INGEST_DATABASE_URL", "postgresql://127.0.0.1:5432/ingest", "Postgres URL, TLS parameters included (`?sslmode=verify-full&sslrootcert=/ca.pem`); `ingest migrate` creates the database."),
    Setting("INGEST_MAINTENANCE_DATABASE_URL", "", "Postgres URL of the owner role for `ingest migrate`, `ingest partitions` and the consumers' partition maintenance (default: `INGEST_DATABASE_URL`); see docs/security.md."),
    Setting("INGEST_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis URL (dedupe hints, quotas); `rediss://user:password@host:6379/0?ssl_ca_certs=/ca.pem` for TLS and an ACL user."),
    Setting("INGEST_REDIS_CLUSTER", "false", "`true`: `INGEST_REDIS_URL` names any node of a Redis Cluster (the others are discovered); dedupe hints and quotas cost one round trip per node per batch (docs/quotas.md)."),
    Setting("INGEST_REDIS_PREFIX", "ingest", "Prefix of every Redis key ingest writes."),
    Setting("INGEST_TOPIC_PREFIX", "", f"Prefix added to the topic names {_listed(s.topic for s in STREAMS.values())}."),
    Setting("INGEST_GROUP_PREFIX", "ingest", f"Consumer groups are {_listed(f'<prefix>.{name}' for name in STREAMS)}."),
    Setting("INGEST_INSTANCE_ID", "", "Static group membership id (e.g. the pod name); empty = dynamic membership."),
    Setting("INGEST_TOPIC_PARTITIONS", "12", "Partitions per topic created by `ingest topics ensure`."),
    Setting("INGEST_TOPIC_REPLICATION_FACTOR", "3", "Replicas per partition of the topics `ingest topics ensure` creates (`ingest dev up` uses 1 for its single embedded broker); with fewer than 3, one broker failure can lose acknowledged events."),
    Setting("INGEST_TOPIC_MIN_INSYNC_REPLICAS", "2", "`min.insync.replicas` of those topics: an `acks=all` write is acknowledged only once this many replicas have it (at most the replication factor)."),
    Setting("INGEST_PRODUCER_IDEMPOTENCE", "true", "Producers (`ingest publish`, `Publisher`, `dlq replay`) use `enable.idempotence` (with `acks=all`): no duplicates or reordering from their own retries. Set `false` only for a broker without it (the embedded dev broker)."),
    Setting("INGEST_BATCH_MAX_ROWS", "5000", "A batch closes at this many records..."),
    Setting("INGEST_BATCH_MAX_BYTES", "16777216", "...or this many bytes of values..."),
    Setting("INGEST_BATCH_MAX_AGE_MS", "100", "...or this age of its first record, whichever comes first; a batch also closes as soon as the previous batch's write ends (group commit), so the age only bounds batching under load."),
    Setting("INGEST_DEDUPE_WINDOW_SECONDS", "604800", "A repeated idempotency key within this window is a duplicate (7 days)."),
    Setting("INGEST_DEDUPE_EPOCHS", "1", "The Postgres ledger cuts the window into this many partitions (epochs), dropped whole once past it: a key is remembered for at least the window and at most the window plus one epoch (14 days with 1), and each new key is looked up in `epochs` older partitions and inserted into the open one; more epochs remember keys for less extra time at one more lookup each (docs/design.md#dedupe-ledger)."),
    Setting("INGEST_DEDUPE_HINT_TTL_SECONDS", "21600", "How long Redis remembers a key (6 h: a hint that catches re-deliveries within hours; Postgres covers the rest of the window; sizing in docs/scaling.md)."),
    Setting("INGEST_MAX_MESSAGE_BYTES", "262144", "Larger Kafka values are dead-lettered as `too_large`."),
    Setting("INGEST_MAX_DEPTH", "32", "Deeper JSON nesting is dead-lettered as `too_deep`."),
    Setting("INGEST_NUL_POLICY", "replace", "`\\u0000` in strings: `replace` (with U+FFFD), `strip`, or `reject`."),
    Setting("INGEST_DLQ_MAX_RATIO", "0.5", "Circuit breaker: stop a stream when more than this share of its records..."),
    Setting("INGEST_DLQ_MIN_RECORDS", "1000", "...out of at least this many..."),
    Setting("INGEST_DLQ_WINDOW_SECONDS", "60", "...within this many seconds would be dead-lettered (ratio 1 disables)."),
    Setting("INGEST_ACCEPT_MAX_AGE_SECONDS", "", "Oldest accepted `occurred_at` (default: the retention)."),
    Setting("INGEST_ACCEPT_MAX_AHEAD_SECONDS", "86400", "Latest accepted `occurred_at` ahead of now (1 day)."),
    Setting("INGEST_PARTITION_GRANULARITY", "day", "Event-table partition size: day, week or month."),
    Setting("INGEST_PARTITION_PREMAKE_DAYS", "7", "Partitions are created this far ahead."),
    Setting("INGEST_RETENTION_DAYS", "90", "Event retention; partitions cover at least this far back."),
    # INGEST_WEBHOOK_PARTITION_GRANULARITY, INGEST_AUDIT_PARTITION_GRANULARITY, then the *_RETENTION_DAYS pair:
    *(Setting(_per_stream(name, "PARTITION_GRANULARITY"), "",
              f"Per-stream granularity for {s.table} (default: the global one).") for name, s in STREAMS.items()),
    *(Setting(_per_stream(name, "RETENTION_DAYS"), "",
              f"Per-stream retention for {s.table} (default: the global one).") for name, s in STREAMS.items()),
    Setting("INGEST_MAINTENANCE_INTERVAL_SECONDS", "600", "Partition maintenance in consumers (create ahead, prune, DEFAULT check); 0 disables it."),
    Setting("INGEST_DLQ_RETENTION_DAYS", "30", "Dead letters older than this are deleted by partition maintenance (0 keeps them forever); `ingest dlq purge` never deletes an unreplayed entry younger than this."),
    Setting("INGEST_RETENTION_ACTION", "drop", "Partitions past retention are `drop`ped or `archive`d (moved to schema `archive`)."),
    Setting("INGEST_RETENTION_EXPORT_DIR", "", "If set, each partition is written to `DIR/<table>_pYYYYMMDD.csv.gz` before removal."),
    Setting("INGEST_DDL_LOCK_TIMEOUT_MS", "2000", "lock_timeout for partition DDL (never queue behind ingestion)."),
    Setting("INGEST_QUOTA_DEFAULT_PER_SECOND", "0", "Sustained events/s per tenant and stream (0 = unlimited); overrides: `ingest quota set`."),
    Setting("INGEST_QUOTA_DEFAULT_BURST", "0", "Events a tenant may send at once (0 = one second's worth of the rate)."),
    Setting("INGEST_QUOTA_DEFAULT_PER_DAY", "0", "Events per tenant and stream per UTC day (0 = unlimited)."),
    Setting("INGEST_QUOTA_REFRESH_SECONDS", "2", "How often consumers re-read quota overrides from Postgres."),
    Setting("INGEST_QUOTA_FAIL_OPEN", "false", "Redis unreachable: `false` pauses consumption; `true` applies per-process in-memory limits."),
    Setting("INGEST_METRICS_HOST", "127.0.0.1", "Bind address of /metrics, /healthz, /readyz."),
    Setting("INGEST_METRICS_PORT", "9108", "Port of /metrics, /healthz, /readyz (0 = disabled)."),
    Setting("INGEST_TENANT_LABEL_LIMIT", "50", "Tenants per stream with their own `tenant` label in metrics; the rest are summed as `other`."),
    Setting("INGEST_LOG_MISMATCH", "reset", "A stored position the Kafka log no longer holds (topic recreated, records expired unread): `reset` continues from the log start and records the change in `offset_changes`; `stop` stops the stream (exit 5) until an operator runs `ingest offsets reset` (docs/operations.md)."),
    Setting("INGEST_SESSION_TIMEOUT_MS", "30000", "Kafka group session timeout."),
    Setting("INGEST_REBALANCE_TIMEOUT_MS", "60000", "How long a rebalance waits for members to rejoin."),
    Setting("INGEST_HEARTBEAT_INTERVAL_MS", "3000", "Kafka group heartbeat interval."),
    Setting("INGEST_MAX_POLL_INTERVAL_MS", "300000", "Kafka max poll interval."),
    Setting("INGEST_SHUTDOWN_TIMEOUT_S", "25", "On SIGTERM, the in-flight batch gets this long before it is abandoned."),
    Setting("INGEST_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
    Setting("INGEST_LOG_FORMAT", "auto", "`auto`: one human line per event on a terminal, one JSON object per line otherwise; `json` or `text` to choose. Timestamps are ISO-8601 UTC in both."),
    Setting("INGEST_DEV_DIR", ".ingest-dev", "Where `ingest dev up` keeps the embedded services' data, logs and the record of what it started (relative to the working directory); see docs/development.md."),
)


def default(env: str) -> str:
    """The default of setting ``env`` as written in ``SETTINGS`` (for help texts that show it)."""
    return next(s.default for s in SETTINGS if s.env == env)


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read every ``INGEST_*`` setting (unset or empty means the default); raise ``SettingsError`` on bad values."""
    source = os.environ if env is None else env
    raw = {s.env: (_value(source, s.env) or s.default) for s in SETTINGS}

    def get(name: str, parse: Callable[[str], Any] = str) -> Any:
        try:
            return parse(raw[name])
        except ValueError as exc:
            raise SettingsError(f"{name}={redact(raw[name])!r} is invalid: {exc}") from None

    def positive(text: str) -> int:
        value = int(text)
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    def ratio(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise ValueError("must be > 0 (1 or more disables the breaker)")
        return value

    def non_negative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    def rate(text: str) -> float:
        value = float(text)
        if not 0 <= value < float("inf"):
            raise ValueError("must be a finite number >= 0")
        return value

    def seconds(text: str) -> float:
        value = float(text)
        if not 0 < value < float("inf"):
            raise ValueError("must be a finite number > 0")
        return value

    def boolean(text: str) -> bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("must be true or false")
        return lowered in ("true", "1", "yes")

    def choice(options: tuple[str, ...]) -> Callable[[str], str]:
        def parse(text: str) -> str:
            if text not in options:
                raise ValueError(f"must be one of {', '.join(options)}")
            return text
        return parse

    retention = timedelta(days=get("INGEST_RETENTION_DAYS", positive))
    max_age = raw["INGEST_ACCEPT_MAX_AGE_SECONDS"]
    partitions = PartitionConfig(
        granularity=get("INGEST_PARTITION_GRANULARITY", choice(GRANULARITIES)),
        premake=timedelta(days=get("INGEST_PARTITION_PREMAKE_DAYS", positive)),
        retention=retention,
        lock_timeout_ms=get("INGEST_DDL_LOCK_TIMEOUT_MS", positive),
        maintenance_interval=timedelta(seconds=get("INGEST_MAINTENANCE_INTERVAL_SECONDS", non_negative)),
        retention_action=get("INGEST_RETENTION_ACTION", choice(("drop", "archive"))),
        export_dir=get("INGEST_RETENTION_EXPORT_DIR"),
    )

    def stream_policy(name: str) -> PartitionConfig | None:
        granularity, days = _per_stream(name, "PARTITION_GRANULARITY"), _per_stream(name, "RETENTION_DAYS")
        if not raw[granularity] and not raw[days]:
            return None
        return dataclasses.replace(
            partitions,
            granularity=get(granularity, choice(GRANULARITIES)) if raw[granularity] else partitions.granularity,
            retention=timedelta(days=get(days, positive)) if raw[days] else partitions.retention,
        )

    kafka_security = KafkaSecurity(
        protocol=get("INGEST_KAFKA_SECURITY_PROTOCOL", choice(PROTOCOLS)),
        sasl_mechanism=get("INGEST_KAFKA_SASL_MECHANISM"),
        sasl_username=get("INGEST_KAFKA_SASL_USERNAME"),
        sasl_password=get("INGEST_KAFKA_SASL_PASSWORD"),
        ssl_cafile=get("INGEST_KAFKA_SSL_CA_FILE"),
        ssl_certfile=get("INGEST_KAFKA_SSL_CERT_FILE"),
        ssl_keyfile=get("INGEST_KAFKA_SSL_KEY_FILE"),
        ssl_key_password=get("INGEST_KAFKA_SSL_KEY_PASSWORD"),
        ssl_check_hostname=get("INGEST_KAFKA_SSL_CHECK_HOSTNAME", boolean),
    )
    _check_connections(raw, kafka_security)
    replication = get("INGEST_TOPIC_REPLICATION_FACTOR", positive)
    min_insync = get("INGEST_TOPIC_MIN_INSYNC_REPLICAS", positive)
    if min_insync > replication:
        raise SettingsError(f"INGEST_TOPIC_MIN_INSYNC_REPLICAS={min_insync} is invalid: must be at most "
                            f"INGEST_TOPIC_REPLICATION_FACTOR ({replication}), or no acks=all write could succeed")

    return Config(
        kafka_bootstrap=get("INGEST_KAFKA_BOOTSTRAP"),
        database_url=get("INGEST_DATABASE_URL"),
        maintenance_database_url=get("INGEST_MAINTENANCE_DATABASE_URL"),
        redis_url=get("INGEST_REDIS_URL"),
        redis_cluster=get("INGEST_REDIS_CLUSTER", boolean),
        redis_prefix=get("INGEST_REDIS_PREFIX"),
        topic_prefix=get("INGEST_TOPIC_PREFIX"),
        group_prefix=get("INGEST_GROUP_PREFIX"),
        instance_id=get("INGEST_INSTANCE_ID") or None,
        topic_partitions=get("INGEST_TOPIC_PARTITIONS", positive),
        topic_replication_factor=replication,
        topic_min_insync_replicas=min_insync,
        producer_idempotence=get("INGEST_PRODUCER_IDEMPOTENCE", boolean),
        dlq_retention=timedelta(days=get("INGEST_DLQ_RETENTION_DAYS", non_negative)),
        batch=BatchLimits(
            max_rows=get("INGEST_BATCH_MAX_ROWS", positive),
            max_bytes=get("INGEST_BATCH_MAX_BYTES", positive),
            max_age=timedelta(milliseconds=get("INGEST_BATCH_MAX_AGE_MS", positive)),
        ),
        dedupe=DedupeConfig(
            window=timedelta(seconds=get("INGEST_DEDUPE_WINDOW_SECONDS", positive)),
            hint_ttl=timedelta(seconds=get("INGEST_DEDUPE_HINT_TTL_SECONDS", positive)),
            epochs=get("INGEST_DEDUPE_EPOCHS", positive),
        ),
        decode=DecodeLimits(
            max_bytes=get("INGEST_MAX_MESSAGE_BYTES", positive),
            max_depth=get("INGEST_MAX_DEPTH", positive),
            nul_policy=NulPolicy(get("INGEST_NUL_POLICY", choice(tuple(p.value for p in NulPolicy)))),
        ),
        breaker=BreakerConfig(
            max_ratio=get("INGEST_DLQ_MAX_RATIO", ratio),
            min_records=get("INGEST_DLQ_MIN_RECORDS", positive),
            window=timedelta(seconds=get("INGEST_DLQ_WINDOW_SECONDS", positive)),
        ),
        window=TimeWindow(
            max_age=timedelta(seconds=get("INGEST_ACCEPT_MAX_AGE_SECONDS", positive)) if max_age else retention,
            max_ahead=timedelta(seconds=get("INGEST_ACCEPT_MAX_AHEAD_SECONDS", positive)),
        ),
        partitions=partitions,
        stream_partitions=tuple((name, cfg) for name in STREAMS if (cfg := stream_policy(name))),
        metrics_host=get("INGEST_METRICS_HOST"),
        metrics_port=get("INGEST_METRICS_PORT", int),
        tenant_label_limit=get("INGEST_TENANT_LABEL_LIMIT", positive),
        log_mismatch=get("INGEST_LOG_MISMATCH", choice(positions.POLICIES)),
        session_timeout_ms=get("INGEST_SESSION_TIMEOUT_MS", positive),
        rebalance_timeout_ms=get("INGEST_REBALANCE_TIMEOUT_MS", positive),
        heartbeat_interval_ms=get("INGEST_HEARTBEAT_INTERVAL_MS", positive),
        max_poll_interval_ms=get("INGEST_MAX_POLL_INTERVAL_MS", positive),
        shutdown_timeout_s=get("INGEST_SHUTDOWN_TIMEOUT_S", float),
        log_level=get("INGEST_LOG_LEVEL", choice(("DEBUG", "INFO", "WARNING", "ERROR"))),
        log_format=get("INGEST_LOG_FORMAT", choice(FORMATS)),
        dev_dir=get("INGEST_DEV_DIR"),
        quota=QuotaConfig(
            default_per_second=get("INGEST_QUOTA_DEFAULT_PER_SECOND", rate),
            default_burst=get("INGEST_QUOTA_DEFAULT_BURST", non_negative),
            default_per_day=get("INGEST_QUOTA_DEFAULT_PER_DAY", non_negative),
            refresh=timedelta(seconds=get("INGEST_QUOTA_REFRESH_SECONDS", seconds)),
            fail_open=get("INGEST_QUOTA_FAIL_OPEN", boolean),
        ),
        kafka_security=kafka_security,
    )


SECRET_SETTINGS = frozenset(s.env for s in SETTINGS if s.env.endswith("PASSWORD"))
"""Settings whose value is a secret: ``effective`` shows them as ``***``."""


def effective(env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Every setting's value as the process uses it, shown safely: each as ``{"name", "value", "source"}`` where
    ``source`` is ``environment``, ``file`` (``NAME_FILE``) or ``default``; secrets are ``***`` and URL
    passwords masked (``ingest.redaction``). The content of a ``_FILE`` secret is never shown."""
    source = os.environ if env is None else env
    out = []
    for s in SETTINGS:
        value = _value(source, s.env)
        origin = ("file" if source.get(f"{s.env}_FILE") else "environment") if value else "default"
        shown = value or s.default
        if s.env in SECRET_SETTINGS and value:
            shown = "***"
        out.append({"name": s.env, "value": redact(shown), "source": origin})
    return out


def _value(source: Mapping[str, str], name: str) -> str:
    """``source[name]``, or the content of the file named by ``source[name + "_FILE"]``."""
    value, path = source.get(name) or "", source.get(f"{name}_FILE") or ""
    if not path:
        return value
    if value:
        raise SettingsError(f"{name} and {name}_FILE are both set: set one of them")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"{name}_FILE={path!r} cannot be read: {reason}") from None
    return text[:-1] if text.endswith("\n") else text


KAFKA_SECURITY_ENV = {
    "protocol": "INGEST_KAFKA_SECURITY_PROTOCOL", "sasl_mechanism": "INGEST_KAFKA_SASL_MECHANISM",
    "sasl_username": "INGEST_KAFKA_SASL_USERNAME", "sasl_password": "INGEST_KAFKA_SASL_PASSWORD",
    "ssl_cafile": "INGEST_KAFKA_SSL_CA_FILE", "ssl_certfile": "INGEST_KAFKA_SSL_CERT_FILE",
    "ssl_keyfile": "INGEST_KAFKA_SSL_KEY_FILE", "ssl_key_password": "INGEST_KAFKA_SSL_KEY_PASSWORD",
}


def _check_connections(raw: Mapping[str, str], kafka: KafkaSecurity) -> None:
    """Refuse at startup what could only fail later: bad security combinations and missing TLS files."""
    try:
        check_kafka(kafka, KAFKA_SECURITY_ENV.__getitem__)
    except SecurityError as exc:
        raise SettingsError(str(exc)) from None
    urls = (("INGEST_DATABASE_URL", check_database_url), ("INGEST_MAINTENANCE_DATABASE_URL", check_database_url),
            ("INGEST_REDIS_URL", check_redis_url))
    for name, check in urls:
        if raw.get(name):
            try:
                check(raw[name])
            except SecurityError as exc:
                raise SettingsError(f"{name}: {exc}") from None


# -- the reference page -------------------------------------------------------------------------------------------

MARKDOWN_COMMAND = "python -m consumers.settings --markdown > docs/configuration.md"
_DOC_LINK = re.compile(r"\bdocs/([a-z0-9-]+\.md)\b")


def markdown() -> str:
    """docs/configuration.md: every setting with its default and meaning, generated from ``SETTINGS``
    (``MARKDOWN_COMMAND`` writes it; a unit test fails when the file is out of date)."""
    lines = [
        "# Configuration",
        "",
        f"_Generated from `SETTINGS` in `consumers/settings.py` by `{MARKDOWN_COMMAND}`: change a setting there, "
        "then regenerate; do not edit this file by hand._",
        "",
        "Every setting comes from the environment, read once at startup (in `consumers/settings.py`) into one "
        "frozen `Config`. An unset or empty variable means the default. Any setting `NAME` may instead be given "
        "as `NAME_FILE`, the path of a file holding the value (a mounted Kubernetes or Docker secret; one trailing "
        "newline is ignored); setting both is an error. A value that cannot be used stops the process at startup "
        "with a message naming the variable (passwords masked, never the content of a secret).",
        "",
        "Encrypted and authenticated connections (Kafka SASL/TLS, Postgres `sslmode`, Redis TLS and ACL users), "
        "the `_FILE` rule and what is redacted where: [docs/connections.md](connections.md).",
        "",
        "| Variable | Default | Meaning |",
        "|---|---|---|",
    ]
    for s in SETTINGS:
        shown = f"`{s.default}`" if s.default else "_(empty)_"
        meaning = _DOC_LINK.sub(r"[docs/\1](\1)", s.doc).replace("|", "\\|")
        lines.append(f"| `{s.env}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers.settings",
                                     description="Print the settings reference (docs/configuration.md).")
    parser.add_argument("--markdown", action="store_true", required=True,
                        help=f"print docs/configuration.md (regenerate it with: {MARKDOWN_COMMAND})")
    parser.parse_args(argv)
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
