"""Checks for deploy/prometheus and deploy/grafana.

* promtool: `check config`, `check rules`, `test rules` (skipped when promtool is missing,
  unless CI is set: then missing promtool is a failure).
* Static: alert metadata, runbook anchors in docs/operations.md, and every metric name used by
  the rules and the Grafana dashboard is one the code exports (or a recording rule).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import which

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RECORDING_RULES = PROM_DIR / "recording_rules.yml"
ALERTS = PROM_DIR / "alerts.yml"
RULE_TESTS = sorted(glob.glob(str(PROM_DIR / "tests" / "*.yml")))
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ingest.json"
GRAFANA_PROV = REPO / "deploy" / "grafana" / "provisioning"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

# The metrics the code exports: name -> type.
EXPORTED_METRICS = {
    "ingest_events_total": "counter",
    "ingest_dead_letters_total": "counter",
    "ingest_batch_rows": "histogram",
    "ingest_batch_write_seconds": "histogram",
    "ingest_end_to_end_latency_seconds": "histogram",
    "ingest_consumer_lag": "gauge",
    "ingest_partitions_assigned": "gauge",
    "ingest_rebalances_total": "counter",
    "ingest_retries_total": "counter",
    "ingest_paused": "gauge",
    "ingest_redis_errors_total": "counter",
    "ingest_postgres_errors_total": "counter",
    "ingest_batches_total": "counter",
    "ingest_tenant_events_total": "counter",
    "ingest_sanitized_total": "counter",
    "ingest_poison_splits_total": "counter",
    "ingest_default_partition_rows": "gauge",
    "ingest_log_mismatches_total": "counter",
    "ingest_log_gap_records_total": "counter",
    "ingest_log_mismatch_stopped": "gauge",
    "ingest_circuit_open": "gauge",
    "ingest_quota_decisions_total": "counter",
    "ingest_quota_check_seconds": "histogram",
    "ingest_quota_degraded": "gauge",
    "ingest_quota_refresh_errors_total": "counter",
}
# Series Prometheus itself produces for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Series of kube-state-metrics (Kubernetes only) that the crash-loop and circuit-breaker alerts read.
KUBE_STATE_SERIES = {"kube_pod_container_status_restarts_total", "kube_pod_container_status_waiting_reason",
                     "kube_pod_container_status_last_terminated_exitcode"}

REQUIRED_ALERTS = {
    "IngestLagGrowing",
    "IngestNoProgress",
    "IngestDeadLetterRatioHigh",
    "IngestErrorRatioHigh",
    "IngestLatencyP99High",
    "IngestConsumerPaused",
    "IngestInstanceDown",
    "IngestDefaultPartitionRows",
    "IngestLogGap",
    "IngestPositionBeyondLogEnd",
    "IngestStoppedOnLogMismatch",
    "IngestConsumerAbsent",
    "IngestConsumerCrashLooping",
    "IngestCircuitBreakerOpen",
}

METRICS_PORT = 9108


# --------------------------------------------------------------------------- helpers


def exported_series_names() -> set[str]:
    names = set(PROMETHEUS_SERIES)
    for name, kind in EXPORTED_METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def recording_rule_names() -> set[str]:
    doc = yaml.safe_load(RECORDING_RULES.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (good enough for our expressions)."""
    s = expr
    s = re.sub(r'"(?:[^"\\]|\\.)*"', " ", s)  # string literals
    s = re.sub(r"'(?:[^'\\]|\\.)*'", " ", s)
    s = re.sub(r"`[^`]*`", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+-?[0-9a-zA-Z_$]+", " ", s)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_:]*\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![A-Za-z0-9_:])[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?[a-zA-Z]*", " ", s)  # numbers/durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        rest = s[m.end() :]
        if re.match(r"\s*\(", rest):  # function or aggregation operator
            continue
        if token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def doc_anchors() -> set[str]:
    anchors = set()
    for line in OPERATIONS_DOC.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
        anchors.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', line))
    return anchors


def load_rules(path: Path) -> list[dict]:
    doc = yaml.safe_load(path.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_targets(dash: dict):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(dash["panels"]):
        for t in panel.get("targets", []):
            yield panel, t


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = which("promtool")
    if path is None:
        msg = (
            "promtool not found on PATH or in the virtualenv: `make tools` puts it into .venv/bin "
            "(Debian/Ubuntu), or install Prometheus's promtool"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def test_promtool_check_config(promtool):
    run([promtool, "check", "config", str(PROM_CONFIG)])


def test_promtool_check_rules(promtool):
    run([promtool, "check", "rules", str(RECORDING_RULES), str(ALERTS)])


def test_promtool_test_rules(promtool):
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests/"
    run([promtool, "test", "rules", *RULE_TESTS])


# --------------------------------------------------------------------------- static: prometheus


def test_prometheus_config_scrapes_ingest_on_metrics_port():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    rule_files = {(PROM_CONFIG.parent / f).resolve() for f in cfg["rule_files"]}
    assert {RECORDING_RULES.resolve(), ALERTS.resolve()} <= rule_files

    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert "ingest" in jobs
    job = jobs["ingest"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    ports = []
    for sd in job.get("dns_sd_configs", []):
        ports.append(sd["port"])
    for sc in job.get("static_configs", []):
        ports.extend(int(t.rsplit(":", 1)[1]) for t in sc["targets"])
    assert ports and all(p == METRICS_PORT for p in ports), ports
    names = [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    names += [t.rsplit(":", 1)[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert {"consumer-webhook", "consumer-audit"} <= set(names)


def test_alerts_present_with_metadata_and_runbooks():
    anchors = doc_anchors()
    alerts = {r["alert"]: r for r in load_rules(ALERTS) if "alert" in r}
    missing = REQUIRED_ALERTS - alerts.keys()
    assert not missing, f"missing alerts: {missing}"
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, name
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert ann.get(key), f"{name}: missing annotation {key}"
        path, _, anchor = ann["runbook"].partition("#")
        assert path == "docs/operations.md", f"{name}: runbook {ann['runbook']}"
        assert anchor in anchors, f"{name}: no anchor #{anchor} in docs/operations.md"


def test_alert_rule_tests_cover_every_alert_firing_and_silent():
    fired, silent = set(), set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(Path(path).read_text())
        for test in doc.get("tests", []):
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired >= REQUIRED_ALERTS, f"no firing case for {REQUIRED_ALERTS - fired}"
    assert silent >= REQUIRED_ALERTS, f"no silent case for {REQUIRED_ALERTS - silent}"


@pytest.mark.parametrize("path", [RECORDING_RULES, ALERTS], ids=lambda p: p.name)
def test_rules_use_only_exported_metrics(path):
    known = exported_series_names() | recording_rule_names() | KUBE_STATE_SERIES
    for rule in load_rules(path):
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {unknown}"


def test_promql_metric_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (stream, le) (rate(ingest_end_to_end_latency_seconds_bucket"
        '{stream=~"$stream"}[$__rate_interval]))) > 0.5 and on (stream) ingest:consumer_lag:sum '
        "unless topk(10, ingest_paused offset 5m) or vector(0) "
        '+ ingest:end_to_end_latency_seconds:p50{stream="a"} * 1e3'
    )
    assert promql_metric_names(expr) == {
        "ingest_end_to_end_latency_seconds_bucket",
        "ingest:consumer_lag:sum",
        "ingest:end_to_end_latency_seconds:p50",
        "ingest_paused",
    }


# --------------------------------------------------------------------------- static: grafana


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_basics(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("uid") and dashboard.get("title")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    for panel, target in dashboard_targets(dashboard):
        for ds in (panel.get("datasource"), target.get("datasource")):
            if ds is None:
                continue
            assert ds.get("uid") in {"${DS_PROMETHEUS}", "prometheus"}, (panel["title"], ds)
            if ds.get("uid") == "${DS_PROMETHEUS}":
                assert variables.get("DS_PROMETHEUS", {}).get("type") == "datasource"


def test_dashboard_exprs_use_only_exported_metrics(dashboard):
    known = exported_series_names() | recording_rule_names()
    count = 0
    for panel, target in dashboard_targets(dashboard):
        expr = target.get("expr")
        assert expr, f"panel {panel['title']!r} has a target without expr"
        count += 1
        unknown = promql_metric_names(expr) - known
        assert not unknown, f"panel {panel['title']!r}: unknown metrics {unknown} in {expr}"
    assert count > 0
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.match(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", query or "")
        if m:
            assert m.group(1) in known, f"variable {var['name']}: unknown metric {m.group(1)}"


def test_dashboard_covers_the_exported_metrics(dashboard):
    used = set()
    for _, target in dashboard_targets(dashboard):
        used |= promql_metric_names(target["expr"])
    # Resolve recording rules and histogram series back to the exported metric.
    recorded = {r["record"]: promql_metric_names(r["expr"]) for r in load_rules(RECORDING_RULES)}
    resolved = set()
    for name in used:
        for n in recorded.get(name, {name}):
            resolved.add(re.sub(r"_(bucket|sum|count)$", "", n) if n not in EXPORTED_METRICS else n)
    missing = set(EXPORTED_METRICS) - resolved
    assert not missing, f"metrics not on the dashboard: {missing}"


def test_grafana_provisioning():
    ds = yaml.safe_load((GRAFANA_PROV / "datasources" / "prometheus.yml").read_text())
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["uid"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((GRAFANA_PROV / "dashboards" / "ingest.yml").read_text())
    paths = [p["options"]["path"] for p in dash["providers"]]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {
        v.split(":")[1]: v.split(":")[0]
        for v in compose["services"]["grafana"]["volumes"]
        if isinstance(v, str)
    }
    for path in paths:
        assert path in mounts, f"dashboard provider path {path} is not mounted in grafana"
        assert (REPO / mounts[path] / DASHBOARD.name).exists()
