"""Static validation of what operators deploy, with pinned tools (no cluster, no network):

* every built-in Kubernetes object (the rendered kustomization, with and without the prometheus-operator
  component, plus roles-job.yaml and secret.example.yaml) against the Kubernetes OpenAPI schemas, strictly
  (kubernetes-validate, pinned in pyproject.toml's dev extra);
* the KEDA and Prometheus Operator objects against their CRD schemas (validators generated from the CRDs,
  pinned in tests/deploy/crd/package.json and installed by scripts/install-test-tools with `npm ci`);
* docker-compose.yml with `docker-compose config` (Debian's docker-compose, installed by scripts/install-test-tools under CI);
* promtool on every rule: the rule files and the PrometheusRule generated from them;
* the Grafana dashboard's JSON: panels, the job label the rules use, the quota panels.

A missing tool skips its test, except under CI=true, where it fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import which

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
COMPONENT = K8S / "prometheus-operator"
CRD_DIR = REPO / "tests" / "deploy" / "crd"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ingest.json"
RULE_FILES = [REPO / "deploy" / "prometheus" / "recording_rules.yml", REPO / "deploy" / "prometheus" / "alerts.yml"]
KUBERNETES_VERSION = "1.30.0"  # the oldest minor with unhealthyPodEvictionPolicy GA
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}; CI is set, so this is a failure (scripts/install-test-tools installs it)")
    pytest.skip(what)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer_replace(obj: dict[str, Any], path: str, value: Any) -> None:
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.lstrip("/").split("/")]
    for key in keys[:-1]:
        obj = obj[key]
    assert keys[-1] in obj, f"patch path {path} does not exist"
    obj[keys[-1]] = value


def render(*, components: bool) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` applies (resources, components' resources and JSON patches,
    images:), without kubectl."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = [d for res in kust["resources"] for d in _docs(K8S / res)]
    if components:
        comp = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
        assert comp["kind"] == "Component"
        objects += [d for res in comp["resources"] for d in _docs(COMPONENT / res)]
        for patch in comp["patches"]:
            target = patch["target"]
            key, _, value = target["labelSelector"].partition("=")
            for obj in objects:
                if obj["kind"] == target["kind"] and obj["metadata"].get("labels", {}).get(key) == value:
                    for op in yaml.safe_load(patch["patch"]):
                        assert op["op"] == "replace"
                        _pointer_replace(obj, op["path"], op["value"])
    images = {i["name"]: i for i in kust.get("images", [])}
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            name, _, tag = c["image"].partition(":")
            if name in images:
                rule = images[name]
                c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
    return objects


def all_objects() -> list[dict[str, Any]]:
    extra = _docs(K8S / "roles-job.yaml") + _docs(K8S / "secret.example.yaml")
    return render(components=True) + extra


# --------------------------------------------------------------------------- Kubernetes schemas


def test_rendering_pins_every_ingest_image_and_keeps_one_scrape_path() -> None:
    for with_component in (False, True):
        objects = render(components=with_component)
        for obj in objects:
            spec = obj.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                assert re.fullmatch(r"[^:]+:[0-9][\w.\-]*", c["image"]), c["image"]
            assert "prometheus.io/scrape" not in obj.get("spec", {}).get("template", {}).get(
                "metadata", {}).get("annotations", {}), "pods must not carry scrape annotations (double scrape)"
        services = [o for o in objects if o["kind"] == "Service"]
        scraped = {s["metadata"]["annotations"]["prometheus.io/scrape"] for s in services}
        monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
        assert scraped == ({"false"} if with_component else {"true"}) and len(monitors) == int(with_component)


def test_kubernetes_objects_match_the_openapi_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install -e '.[dev]')")
    checked = 0
    for obj in all_objects():
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 10


def test_custom_resources_match_the_keda_and_prometheus_operator_crds() -> None:
    node = shutil.which("node")
    if node is None or not (CRD_DIR / "node_modules").is_dir():
        _missing("node or tests/deploy/crd/node_modules is missing (cd tests/deploy/crd && npm ci)")
    custom = [o for o in all_objects() if o["apiVersion"].startswith(CUSTOM_GROUPS)]
    kinds = sorted({o["kind"] for o in custom})
    assert kinds == ["PrometheusRule", "ScaledObject", "ServiceMonitor", "TriggerAuthentication"]
    proc = subprocess.run([node, "validate.mjs"], cwd=CRD_DIR, input=json.dumps(custom), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == len(custom), proc.stdout


def test_the_crd_validator_rejects_a_bad_object() -> None:
    """The CRD check is not vacuous: a ScaledObject with a string replica count is refused."""
    node = shutil.which("node")
    if node is None or not (CRD_DIR / "node_modules").is_dir():
        _missing("node or tests/deploy/crd/node_modules is missing (cd tests/deploy/crd && npm ci)")
    (so,) = [o for o in all_objects() if o["kind"] == "ScaledObject"][:1]
    bad = copy.deepcopy(so)
    bad["spec"]["minReplicaCount"] = "one"
    proc = subprocess.run([node, "validate.mjs"], cwd=CRD_DIR, input=json.dumps([bad]), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "minReplicaCount must be integer" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- Compose


def test_docker_compose_config_parses() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        _missing("docker-compose is not installed (Debian: apt-get install docker-compose)")
    proc = subprocess.run([tool, "-f", "docker-compose.yml", "config", "-q"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Prometheus rules


def test_prometheus_rule_is_generated_from_the_rule_files() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import prometheus_rule
    finally:
        sys.path.pop(0)
    assert (COMPONENT / "prometheusrule.yaml").read_text() == prometheus_rule.render(), (
        f"out of date: run {prometheus_rule.COMMAND}")
    (rule,) = _docs(COMPONENT / "prometheusrule.yaml")
    assert rule["spec"]["groups"] == [g for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]]


def test_promtool_checks_every_rule(tmp_path: Path) -> None:
    promtool = which("promtool")
    if promtool is None:
        _missing("promtool is not installed (Debian: apt-get install prometheus)")
    (rule,) = _docs(COMPONENT / "prometheusrule.yaml")
    operator_rules = tmp_path / "prometheusrule-spec.yml"
    operator_rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES), str(operator_rules)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = sum(len(g["rules"]) for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"])
    assert proc.stdout.count("SUCCESS") == 3 and total >= 20


# --------------------------------------------------------------------------- Grafana dashboard


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def test_dashboard_json_panels_job_label_and_quota_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = _panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p.get("type") and p.get("title"), p
        if p["type"] != "row":
            assert p.get("gridPos", {}).keys() >= {"h", "w", "x", "y"}, p["title"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    jobs = {m for e in exprs for m in re.findall(r'job\s*=~?\s*\\?"([^"\\]+)', e)}
    assert jobs == {"ingest"}, jobs  # the same job the alerts match: up{job="ingest"}
    quota = [p["title"] for p in panels if any("ingest_quota" in t["expr"] for t in p.get("targets", []))]
    used = " ".join(e for e in exprs if "ingest_quota" in e)
    for metric in ("ingest_quota_decisions_total", "ingest_quota_check_seconds_bucket", "ingest_quota_degraded",
                   "ingest_quota_refresh_errors_total"):
        assert metric in used, f"no quota panel uses {metric}"
    assert len(quota) >= 3
