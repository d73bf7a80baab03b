"""Prometheus metrics in their own registry (never the global one). One ``Metrics`` per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000)


class Metrics:
    """All series ingest exports; see docs/metrics.md for the meaning of each."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("ingest_events", "Consumed records by outcome.", ["stream", "outcome"], registry=r)
        self.dead_letters = Counter("ingest_dead_letters", "Dead-lettered records.", ["stream", "reason"], registry=r)
        self.batches = Counter("ingest_batches", "Committed batches.", ["stream"], registry=r)
        self.batch_rows = Histogram("ingest_batch_rows", "Records per committed batch.", ["stream"],
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_write = Histogram("ingest_batch_write_seconds", "Postgres transaction time per batch.",
                                     ["stream"], buckets=WRITE_BUCKETS, registry=r)
        self.latency = Histogram("ingest_end_to_end_latency_seconds",
                                 "Kafka record timestamp to Postgres commit.", ["stream"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("ingest_consumer_lag", "High watermark minus next offset.", ["stream", "partition"],
                         registry=r)
        self.assigned = Gauge("ingest_partitions_assigned", "Partitions owned by this process.", ["stream"],
                              registry=r)
        self.rebalances = Counter("ingest_rebalances", "Partition assignments received.", ["stream"], registry=r)
        self.retries = Counter("ingest_retries", "Retried operations after transient errors.", ["component"],
                               registry=r)
        self.paused = Gauge("ingest_paused", "1 while consumption is paused, by reason.", ["stream", "reason"],
                            registry=r)
        self.redis_errors = Counter("ingest_redis_errors", "Failed Redis calls.", registry=r)
        self.postgres_errors = Counter("ingest_postgres_errors", "Failed Postgres transactions.", registry=r)
        self.sanitized = Counter("ingest_sanitized", "Records changed by a sanitising policy.", ["stream", "action"],
                                 registry=r)
        self.poison_splits = Counter("ingest_poison_splits", "Batches split to isolate rows Postgres refused.",
                                     ["stream"], registry=r)
        self.default_partition_rows = Gauge("ingest_default_partition_rows",
                                            "Rows in a DEFAULT (safety-net) partition; should be 0.", ["table"],
                                            registry=r)
        self.quota_degraded = Gauge("ingest_quota_degraded",
                                    "1 while Redis is unreachable for quotas, by mode (paused or fail_open).",
                                    ["mode"], registry=r)
        self.circuit_open = Gauge("ingest_circuit_open", "1 when the dead-letter circuit breaker stopped the stream.",
                                  ["stream"], registry=r)
        self.fenced = Counter("ingest_fenced_batches", "Batches rolled back because another owner moved the offset.",
                              ["stream"], registry=r)
