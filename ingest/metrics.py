"""Prometheus metrics in their own registry (never the global one). One ``Metrics`` per process."""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000)


class BatchHistogram(Collector):
    """A labelled histogram fed a whole batch at a time, exposed like a prometheus_client ``Histogram``.

    ``observe_many`` sorts the batch once and counts each bucket with one bisection, instead of a Python-level
    bucket loop and a lock per value. Safe to scrape from another thread while the event loop observes."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # cumulative counts, [sum]
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, labels: Sequence[str], values: Iterable[float]) -> None:
        """Count every value of one batch under ``labels`` (one value per label name, in order)."""
        ordered = sorted(values)
        if not ordered:
            return
        key = tuple(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.bounds) + 1), [0.0]))
            for i, bound in enumerate(self.bounds):
                counts[i] += bisect_right(ordered, bound)
            counts[-1] += len(ordered)
            total[0] += sum(ordered)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, list(c), t[0]) for k, (c, t) in self._series.items()]
        for key, counts, total in snapshot:
            edges = [*(_le(b) for b in self.bounds), "+Inf"]
            family.add_metric(list(key), list(zip(edges, counts, strict=True)), total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


def _le(bound: float) -> str:
    """Bucket bound as prometheus_client writes it (``0.5``, ``1.0``)."""
    return repr(float(bound))


class MaintenanceMetrics:
    """The series of partition maintenance (``ingest.maintenance``); get them from ``Metrics.maintenance``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.runs = Counter("ingest_partition_maintenance_runs", "Partition maintenance rounds by result "
                            "(ok, skipped: another process held the lock, failed).", ["result"], registry=r)
        self.lock_timeouts = Counter("ingest_partition_lock_timeouts",
                                     "Partition DDL given up on lock_timeout (retried next round).", ["table"],
                                     registry=r)
        self.actions = Counter("ingest_partition_changes", "Partitions created, dropped or archived.",
                               ["table", "action"], registry=r)
        self.ahead = Gauge("ingest_partition_coverage_ahead_seconds",
                           "End of the last partition minus now (should stay above a day).", ["table"], registry=r)
        self.ledger_pruned = Counter("ingest_ledger_pruned", "Keys in expired dedupe-ledger partitions dropped (estimated from statistics).", registry=r)
        self.last_success = Gauge("ingest_partition_maintenance_last_success_timestamp_seconds",
                                  "Unix time of the last completed maintenance round.", registry=r)
        self.default_rows = Gauge("ingest_default_partition_rows",
                                  "Rows in a DEFAULT (safety-net) partition; should be 0.", ["table"], registry=r)


class Metrics:
    """All series ingest exports; see docs/metrics.md for the meaning of each."""

    def __init__(self, registry: CollectorRegistry | None = None, *, tenant_label_limit: int = 50,
                 tenant_label_min_events: int = 1000) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("ingest_events", "Consumed records by outcome.", ["stream", "outcome"], registry=r)
        self.dead_letters = Counter("ingest_dead_letters", "Dead-lettered records.", ["stream", "reason"], registry=r)
        self.batches = Counter("ingest_batches", "Committed batches.", ["stream"], registry=r)
        self.batch_rows = Histogram("ingest_batch_rows", "Records per committed batch.", ["stream"],
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_write = Histogram("ingest_batch_write_seconds", "Postgres transaction time per batch.",
                                     ["stream"], buckets=WRITE_BUCKETS, registry=r)
        self.latency = BatchHistogram("ingest_end_to_end_latency_seconds",
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
        self.quota_degraded = Gauge("ingest_quota_degraded",
                                    "1 while Redis is unreachable for quotas, by mode (paused or fail_open).",
                                    ["mode"], registry=r)
        self.circuit_open = Gauge("ingest_circuit_open", "1 when the dead-letter circuit breaker stopped the stream.",
                                  ["stream"], registry=r)
        self.log_mismatches = Counter(
            "ingest_log_mismatches", "Stored positions the Kafka log no longer held, by kind (beyond_end, "
            "below_start) and the action taken (reset: moved to the log start; stop: the stream stopped).",
            ["stream", "kind", "action"], registry=r)
        self.log_gap_records = Counter("ingest_log_gap_records",
                                       "Records removed from the Kafka log before they were read (see offset_changes).",
                                       ["stream"], registry=r)
        self.log_mismatch_stopped = Gauge("ingest_log_mismatch_stopped",
                                          "1 when the stream stopped on a stored position outside the log.",
                                          ["stream"], registry=r)
        self.fenced = Counter("ingest_fenced_batches", "Batches rolled back because another owner moved the offset.",
                              ["stream"], registry=r)
        self.quota_decisions = Counter("ingest_quota_decisions",
                                       "Quota verdicts per event: admitted, denied, or unlimited (no Redis call).",
                                       ["stream", "decision"], registry=r)
        self.quota_check = Histogram("ingest_quota_check_seconds", "Time of the one Redis quota call per batch.",
                                     ["stream"], buckets=WRITE_BUCKETS, registry=r)
        self.quota_refresh_errors = Counter("ingest_quota_refresh_errors",
                                            "Failed re-reads of quota overrides (the last limits stay in force).",
                                            ["stream"], registry=r)
        # Per-tenant volume with a bounded tenant label: see observe_tenants and docs/metrics.md.
        self.tenant_events = Counter("ingest_tenant_events",
                                     'Consumed records per tenant by outcome (top tenants; the rest as tenant="other").',
                                     ["stream", "tenant", "outcome"], registry=r)
        self.tenant_label_limit = tenant_label_limit  # N: tenants per stream that get their own label
        self.tenant_label_min_events = tenant_label_min_events  # volume (a proven lower bound) a tenant needs before it gets one
        self._tenant_labels: dict[str, set[str]] = {}  # stream -> tenants with a label (never revoked)
        self._tenant_volume: dict[str, dict[str, int]] = {}  # stream -> Misra-Gries counters of the others
        self._maintenance: MaintenanceMetrics | None = None

    @property
    def maintenance(self) -> MaintenanceMetrics:
        """The partition-maintenance series, registered on first use: a process that runs no maintenance
        exports none of them (no ``..._last_success_timestamp_seconds 0`` from a consumer with it disabled)."""
        if self._maintenance is None:
            self._maintenance = MaintenanceMetrics(self.registry)
        return self._maintenance

    def observe_tenants(self, stream: str, counts: dict[str, dict[str | None, int]]) -> None:
        """Count one batch per tenant: ``counts[outcome][tenant] = records`` (tenant None = unknown).

        Tenants with a label are counted under their id, all others under ``"other"``, so the sum over tenants
        always equals the total. One ``inc`` per distinct (label, outcome) of the batch."""
        granted = self._tenant_labels.setdefault(stream, set())
        if len(granted) < self.tenant_label_limit:
            volume: dict[str, int] = {}
            for per_tenant in counts.values():
                for tenant, n in per_tenant.items():
                    if tenant is not None and n > 0 and tenant not in granted:
                        volume[tenant] = volume.get(tenant, 0) + n
            self._grant_tenant_labels(stream, granted, volume)
        sums: dict[tuple[str, str], int] = {}
        for outcome, per_tenant in counts.items():
            for tenant, n in per_tenant.items():
                if n > 0:
                    key = (tenant if tenant is not None and tenant in granted else "other", outcome)
                    sums[key] = sums.get(key, 0) + n
        for (tenant, outcome), n in sums.items():
            self.tenant_events.labels(stream, tenant, outcome).inc(n)

    def _grant_tenant_labels(self, stream: str, granted: set[str], volume: dict[str, int]) -> None:
        """Give a label to tenants whose counted volume reaches ``tenant_label_min_events``, heaviest first, while
        fewer than ``tenant_label_limit`` have one. Volumes are Misra-Gries counters over K = max(20 N, 1000)
        tenants: never above the true count (a grant is always deserved), and memory stays O(K)."""
        limit, threshold = self.tenant_label_limit, self.tenant_label_min_events
        sketch = self._tenant_volume.setdefault(stream, {})
        reached = []
        for tenant, n in volume.items():
            have = sketch.get(tenant, 0) + n
            sketch[tenant] = have
            if have >= threshold:
                reached.append((have, tenant))
        for _, tenant in sorted(reached, reverse=True)[: limit - len(granted)]:
            granted.add(tenant)
            del sketch[tenant]
        if len(granted) >= limit:
            self._tenant_volume.pop(stream, None)  # no label left to give: stop counting
            return
        capacity = max(20 * limit, 1000)
        if len(sketch) > 2 * capacity:
            cut = sorted(sketch.values(), reverse=True)[capacity]  # the (K+1)-th largest counter
            self._tenant_volume[stream] = {t: c - cut for t, c in sketch.items() if c > cut}
