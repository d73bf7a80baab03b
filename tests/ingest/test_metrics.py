"""The per-tenant counter: bounded tenant label, totals preserved, labels never churn; and its pipeline hook.
The batch-fed latency histogram."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from consumers.settings import from_env
from ingest.metrics import LATENCY_BUCKETS, BatchHistogram, Metrics
from ingest.pipeline import Outcome, Pipeline, Prepared, Staged
from ingest.rows import Candidate, DeadLetter, SimpleRecord
from ingest.writer import WriteResult

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OUTCOMES = ("stored", "duplicate", "rejected", "quota_exceeded")


def series(m: Metrics) -> dict[tuple[str, str, str], float]:
    """(stream, tenant, outcome) -> value of ingest_tenant_events_total."""
    out = {}
    for metric in m.registry.collect():
        for s in metric.samples:
            if s.name == "ingest_tenant_events_total":
                out[(s.labels["stream"], s.labels["tenant"], s.labels["outcome"])] = s.value
    return out


def feed(m: Metrics, stream: str, tenants: list[str], weights: list[float], batches: int, size: int,
         rng: random.Random) -> Counter[tuple[str, str]]:
    """Random batches; returns the true (tenant, outcome) counts."""
    truth: Counter[tuple[str, str]] = Counter()
    for _ in range(batches):
        counts: dict[str, Counter[str | None]] = {o: Counter() for o in OUTCOMES}
        outcomes = rng.choices(OUTCOMES, (80, 10, 5, 5), k=size)
        for tenant, outcome in zip(rng.choices(tenants, weights, k=size), outcomes, strict=True):
            counts[outcome][tenant] += 1
            truth[(tenant, outcome)] += 1
        m.observe_tenants(stream, counts)  # type: ignore[arg-type]
    return truth


def test_5000_tenants_give_at_most_n_plus_1_labels_and_keep_totals() -> None:
    rng = random.Random(7)
    m = Metrics()
    tenants = [f"org-{i:05d}" for i in range(5000)]
    weights = [1 / (i + 1) ** 1.1 for i in range(5000)]  # Zipf-like: a few heavy tenants, a long tail
    truth = {s: feed(m, s, tenants, weights, batches=60, size=5000, rng=rng) for s in ("webhook", "audit")}
    got = series(m)
    for stream in ("webhook", "audit"):
        for outcome in OUTCOMES:
            labels = {t for (s, t, o) in got if s == stream and o == outcome}
            assert len(labels) <= m.tenant_label_limit + 1
            total = sum(n for (t, o), n in truth[stream].items() if o == outcome)
            assert sum(v for (s, _, o), v in got.items() if s == stream and o == outcome) == total
        labelled = {t for (s, t, _) in got if s == stream} - {"other"}
        assert 0 < len(labelled) <= m.tenant_label_limit
        # Misra-Gries undercounts by at most M/(K+1): every tenant above threshold + that bound has a label
        # (there are fewer of them than N here, so no one was refused for lack of a free label).
        volume = Counter[str]()
        for (t, _), n in truth[stream].items():
            volume[t] += n
        bound = m.tenant_label_min_events + volume.total() / (max(20 * m.tenant_label_limit, 1000) + 1)
        assert {t for t, n in volume.items() if n >= bound} <= labelled
        # The heaviest tenants have their own label, and their own count is exact once granted.
        assert {"org-00000", "org-00001", "org-00002", "org-00003", "org-00004"} <= labelled
        heavy = sum(n for (t, o), n in truth[stream].items() if t == "org-00000" and o == "stored")
        assert heavy - m.tenant_label_min_events <= got[(stream, "org-00000", "stored")] <= heavy
        # ...and a tenant that gets a label had at least the threshold of events.
        for tenant in labelled:
            assert sum(n for (t, _), n in truth[stream].items() if t == tenant) >= m.tenant_label_min_events


def test_a_uniform_long_tail_stays_other_and_memory_is_bounded() -> None:
    rng = random.Random(3)
    m = Metrics()
    tenants = [f"t{i}" for i in range(50_000)]
    feed(m, "webhook", tenants, [1.0] * len(tenants), batches=40, size=5000, rng=rng)
    assert {t for (_, t, _) in series(m)} == {"other"}
    assert len(m._tenant_volume["webhook"]) <= 2 * max(20 * m.tenant_label_limit, 1000) + 5000


def test_labels_are_never_revoked() -> None:
    m = Metrics()
    m.tenant_label_limit, m.tenant_label_min_events = 2, 10
    m.observe_tenants("webhook", {"stored": {"a": 10, "b": 10, "c": 5}})
    assert {t for (_, t, _) in series(m)} == {"a", "b", "other"}
    m.observe_tenants("webhook", {"stored": {"c": 1000, "a": 1}})  # c is now the biggest: too late
    got = series(m)
    assert got[("webhook", "a", "stored")] == 11
    assert got[("webhook", "other", "stored")] == 1005
    assert ("webhook", "c", "stored") not in got


def test_heaviest_win_when_several_qualify_in_one_batch() -> None:
    m = Metrics()
    m.tenant_label_limit, m.tenant_label_min_events = 1, 10
    m.observe_tenants("webhook", {"stored": {"small": 10, "big": 30}, "rejected": {None: 4}})
    assert series(m) == {("webhook", "big", "stored"): 30, ("webhook", "other", "stored"): 10,
                         ("webhook", "other", "rejected"): 4}


def test_labels_are_per_stream_and_limit_zero_means_only_other() -> None:
    m = Metrics()
    m.tenant_label_min_events = 1
    m.observe_tenants("webhook", {"stored": {"a": 1}})
    m.observe_tenants("audit", {"stored": {"b": 1}})
    assert set(series(m)) == {("webhook", "a", "stored"), ("audit", "b", "stored")}
    m2 = Metrics()
    m2.tenant_label_limit, m2.tenant_label_min_events = 0, 1
    m2.observe_tenants("webhook", {"stored": {"a": 5}})
    assert series(m2) == {("webhook", "other", "stored"): 5}


def candidate(tenant: str, key: str) -> Candidate:
    ts = datetime.now(UTC)
    return Candidate((tenant, key), (tenant, key, ts, 0, 0), SimpleRecord("topic", 0, 0, None, b"{}", 0), ts)


def test_pipeline_attributes_every_outcome_to_a_tenant() -> None:
    m = Metrics()
    m.tenant_label_min_events = 1
    pipeline = Pipeline(stream="webhook", contract=None, limits=from_env({}).decode, writer=None,  # type: ignore[arg-type]
                        hints=None, metrics=m)
    a, b, c, d, e = (candidate("t1", "a"), candidate("t1", "b"), candidate("t2", "c"), candidate("t3", "d"),
                     candidate("t2", "e"))
    prepared = Prepared(candidates=[a, b, c, d, e], in_batch_duplicates=2,
                        dead_letters=[DeadLetter("webhook", "schema", "", b"{}", "t9", None, "topic", 0, 9, None, T0),
                                      DeadLetter("webhook", "not_json", "", b"x", None, None, "topic", 0, 8, None, T0)])
    refused = DeadLetter("webhook", "db_rejected", "", b"{}", "t2", "e", "topic", 0, 0, None, T0)
    # b was a Redis-hinted duplicate, so it never reached the writer.
    result = WriteResult(stored=[a], duplicates=[c], over_quota=[d], refused=[refused])
    outcome = Outcome(stored=1, duplicates=2 + 1 + 1, rejected=2 + 1, quota_exceeded=1, write_seconds=0.01)
    staged = Staged([], prepared, [a, c, d, e], hint_duplicates=1)
    pipeline._observe(staged, result, outcome)
    got = series(m)
    assert {k: v for k, v in got.items() if v} == {
        ("webhook", "t1", "stored"): 1,
        ("webhook", "t1", "duplicate"): 1,      # hinted
        ("webhook", "t2", "duplicate"): 1,      # ledger
        ("webhook", "other", "duplicate"): 2,   # in-batch: no tenant known here
        ("webhook", "t9", "rejected"): 1,
        ("webhook", "other", "rejected"): 1,    # undecodable: no tenant
        ("webhook", "t2", "rejected"): 1,       # refused by Postgres
        ("webhook", "t3", "quota_exceeded"): 1,
    }
    for name, want in (("stored", 1), ("duplicate", 4), ("rejected", 3), ("quota_exceeded", 1)):
        assert sum(v for (_, _, o), v in got.items() if o == name) == want
        assert m.registry.get_sample_value("ingest_events_total", {"stream": "webhook", "outcome": name}) == want


def _exposition(registry: CollectorRegistry) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples if not s.name.endswith("_created")}


def test_batch_histogram_exposes_what_a_histogram_fed_value_by_value_would() -> None:
    rng = random.Random(7)
    batches = [[rng.expovariate(4) for _ in range(rng.randint(0, 300))] for _ in range(20)]
    batches.append([0.005, 0.25, 1.0, 60.0, 61.0, 0.0])  # on the bucket bounds, and beyond the last
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["stream"], buckets=LATENCY_BUCKETS, registry=one_by_one)
    histogram = BatchHistogram("t_seconds", "doc", ["stream"], buckets=LATENCY_BUCKETS, registry=batched)
    for i, batch in enumerate(batches):
        stream = "a" if i % 3 else "b"
        for value in batch:
            reference.labels(stream).observe(value)
        histogram.observe_many((stream,), batch)
    want, got = _exposition(one_by_one), _exposition(batched)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


MAINTENANCE_SERIES = (  # docs/metrics.md, docs/partitions.md and deploy/ use these names
    "ingest_partition_maintenance_runs_total", "ingest_partition_lock_timeouts_total", "ingest_partition_changes_total",
    "ingest_partition_coverage_ahead_seconds", "ingest_ledger_pruned_total",
    "ingest_partition_maintenance_last_success_timestamp_seconds", "ingest_default_partition_rows",
)


def test_maintenance_series_are_registered_once_on_first_use_with_their_documented_names() -> None:
    m = Metrics()
    before = generate_latest(m.registry).decode()
    assert not [name for name in MAINTENANCE_SERIES if name in before]  # this process runs no maintenance
    mm = m.maintenance
    assert m.maintenance is mm  # one set per registry, however many Maintenance objects use it
    mm.runs.labels("ok").inc()
    mm.lock_timeouts.labels("t").inc()
    mm.actions.labels("t", "created").inc()
    mm.ahead.labels("t").set(86_400)
    mm.ledger_pruned.inc(3)
    mm.last_success.set(1.0)
    mm.default_rows.labels("t").set(2)
    samples = {s.name for metric in m.registry.collect() for s in metric.samples}
    assert set(MAINTENANCE_SERIES) <= samples
