"""Static checks (no Docker, no cluster) for docker-compose.yml, Dockerfile and deploy/kubernetes.

The `ingest` subcommands used by Compose and the Kubernetes manifests are checked against the
real CLI: `consumers.cli.build_parser()`. If that import fails, those tests FAIL (never skip).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
K8S_DIR = REPO / "deploy" / "kubernetes"
PROM_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"

METRICS_PORT = 9108
DEFAULT_PARTITIONS = 12  # INGEST_TOPIC_PARTITIONS default, documented
STREAMS = ("webhook", "audit")
INGEST_IMAGE = "ingest"  # compose image ingest:local, k8s image ingest:<tag> or <registry>/ingest:<tag>

INGEST_ENV = {
    "INGEST_KAFKA_BOOTSTRAP": "kafka:9092",
    # The consumers' URL is the writer role's (docs/security.md); migrate differs in its maintenance URL only.
    "INGEST_DATABASE_URL": "postgresql://ingest_writer:writer-dev-password@postgres:5432/ingest",
    "INGEST_REDIS_URL": "redis://redis:6379/0",
    "INGEST_METRICS_HOST": "0.0.0.0",
}


# --------------------------------------------------------------------------- helpers


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.iterdir() if p.suffix in {".yaml", ".yml"})


def k8s_docs() -> list[dict]:
    docs = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def k8s_objects(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d.get("kind") == kind]


def as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def ingest_argvs(entrypoint, command) -> list[list[str]]:
    """Argument vectors passed to the `ingest` CLI, given a container entrypoint and command.

    entrypoint None means the image's ENTRYPOINT, which is ["ingest"].
    """
    entrypoint, command = as_list(entrypoint), as_list(command)
    if not entrypoint or entrypoint == ["ingest"]:
        return [command] if command else []
    if Path(entrypoint[0]).name in {"sh", "bash"} and entrypoint[1:] == ["-c"]:
        return ingest_argvs_from_script(" ".join(command))
    if entrypoint[0] == "ingest":
        return [entrypoint[1:] + command]
    return []


def ingest_argvs_from_script(script: str) -> list[list[str]]:
    argvs = []
    for part in re.split(r"&&|\|\||;|\|", script):
        words = shlex.split(part)
        if words and words[0] == "ingest":
            argvs.append(words[1:])
    return argvs


def uses_ingest_image(image: str | None) -> bool:
    if not image:
        return False
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    return name == INGEST_IMAGE


def compose_ingest_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "build" in svc or uses_ingest_image(svc.get("image"))
    }


def compose_invocations() -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in compose_ingest_services(load_compose()).items():
        for argv in ingest_argvs(svc.get("entrypoint"), svc.get("command")):
            out.append((f"compose:{name}", argv))
    return out


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        return obj["spec"]["template"]["spec"]
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj.get("kind") == "Pod":
        return obj["spec"]
    return None


def k8s_invocations() -> list[tuple[str, list[str]]]:
    out = []
    for obj in k8s_docs():
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if not uses_ingest_image(c.get("image")):
                continue
            for argv in ingest_argvs(c.get("command"), c.get("args")):
                out.append((f"k8s:{obj['kind']}/{obj['metadata']['name']}/{c['name']}", argv))
    return out


def all_invocations() -> list[tuple[str, list[str]]]:
    return compose_invocations() + k8s_invocations()


def build_cli_parser():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import consumers.cli as cli
    except Exception as exc:
        pytest.fail(f"cannot import consumers.cli to read the CLI subcommands: {exc!r}")
    return cli.build_parser()


def subcommands(parser) -> dict:
    return parser._subparsers._group_actions[0].choices


MEASURED_PEAK_RSS_MIB = 270  # the highest peak RSS measured for one consumer draining a 1M backlog (now 165.2 MiB)


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi)?", quantity).groups()  # type: ignore[union-attr]
    return float(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, None: 1 / 2**20}[unit]


def duration_seconds(value: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --------------------------------------------------------------------------- CLI subcommands


def test_invocations_found():
    where = {w.split(":")[0] for w, _ in all_invocations()}
    assert where == {"compose", "k8s"}
    used = {argv[0] for _, argv in all_invocations()}
    assert {"migrate", "topics", "consume"} <= used


def test_subcommands_exist_in_cli():
    parser = build_cli_parser()
    known = set(subcommands(parser))
    assert known, "the CLI parser has no subcommands"
    for where, argv in all_invocations():
        assert argv and argv[0] in known, f"{where}: `ingest {' '.join(argv)}` not in {sorted(known)}"


def test_invocations_parse_with_cli():
    parser = build_cli_parser()
    for where, argv in all_invocations():
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: `ingest {' '.join(argv)}` rejected by the CLI (exit {exc.code})")


# --------------------------------------------------------------------------- compose


def test_compose_services_and_images():
    services = load_compose()["services"]
    expected = {
        "kafka",
        "postgres",
        "redis",
        "migrate",
        "consumer-webhook",
        "consumer-audit",
        "prometheus",
        "grafana",
    }
    assert expected <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    hc = " ".join(as_list(services["kafka"]["healthcheck"]["test"]))
    assert "/opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 --list" in hc
    assert "pg_isready" in " ".join(as_list(services["postgres"]["healthcheck"]["test"]))
    assert "redis-cli ping" in " ".join(as_list(services["redis"]["healthcheck"]["test"]))


def test_compose_ingest_services_share_env():
    services = compose_ingest_services(load_compose())
    assert {"migrate", "consumer-webhook", "consumer-audit"} <= set(services)
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form (x-ingest-env anchor)"
        for key, value in INGEST_ENV.items():
            assert str(env.get(key)) == value, f"{name}: {key}={env.get(key)!r}"
        if "INGEST_METRICS_PORT" in env:
            assert int(env["INGEST_METRICS_PORT"]) == METRICS_PORT


def test_compose_migrate_is_one_shot():
    svc = load_compose()["services"]["migrate"]
    assert str(svc.get("restart", "no")) == "no"
    assert [
        a[:2] if a[0] == "topics" else a[:1] for a in ingest_argvs(svc.get("entrypoint"), svc.get("command"))
    ] == [["migrate"], ["topics", "ensure"]]
    for dep in ("kafka", "postgres", "redis"):
        assert svc["depends_on"][dep]["condition"] == "service_healthy"


@pytest.mark.parametrize("stream", STREAMS)
def test_compose_consumers_are_scalable(stream):
    svc = load_compose()["services"][f"consumer-{stream}"]
    assert "container_name" not in svc, "container_name prevents --scale"
    assert not svc.get("ports"), "fixed host ports prevent --scale"
    assert svc.get("restart") == "unless-stopped"
    assert ingest_argvs(svc.get("entrypoint"), svc.get("command")) == [["consume", "--stream", stream]]
    assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    hc = " ".join(as_list(svc["healthcheck"]["test"]))
    assert "python" in hc and "urllib" in hc
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in hc
    # Graceful shutdown may take 30 s; Compose's default stop timeout is 10 s.
    assert duration_seconds(str(svc.get("stop_grace_period", "10s"))) > 30


def test_compose_depends_on_references_exist():
    services = load_compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, opts in items:
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = (opts or {}).get("condition", "service_started")
            assert cond in {"service_started", "service_healthy", "service_completed_successfully"}
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name}: {dep} has no healthcheck"
            if cond == "service_completed_successfully":
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} must be one-shot"


def test_compose_host_mounts_exist():
    compose = load_compose()
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (REPO / context / dockerfile).is_file(), f"{name}: missing {context}/{dockerfile}"
        for vol in svc.get("volumes", []):
            if isinstance(vol, dict):
                if vol.get("type") != "bind":
                    continue
                source = vol["source"]
            else:
                source = vol.split(":", 1)[0]
                if not source.startswith((".", "/", "~")):
                    assert source in (compose.get("volumes") or {}), f"{name}: undeclared volume {source}"
                    continue
            assert (REPO / source).exists(), f"{name}: host path {source} does not exist"
        for env_file in as_list(svc.get("env_file")):
            assert (REPO / env_file).exists(), f"{name}: env_file {env_file} missing"


def test_compose_prometheus_and_grafana_mounts():
    services = load_compose()["services"]
    prom_vols = [v.split(":") for v in services["prometheus"]["volumes"]]
    assert any(Path(src) == Path("./deploy/prometheus") for src, *_ in prom_vols)
    assert "9090:9090" in [str(p) for p in services["prometheus"]["ports"]]
    graf_srcs = [Path(v.split(":")[0]) for v in services["grafana"]["volumes"]]
    assert Path("./deploy/grafana/provisioning") in graf_srcs
    assert Path("./deploy/grafana/dashboards") in graf_srcs
    assert "3000:3000" in [str(p) for p in services["grafana"]["ports"]]


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["ingest"\]', text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert "pip install" in text


# --------------------------------------------------------------------------- kubernetes


def test_k8s_yaml_parses_and_is_namespace_agnostic():
    files = k8s_files()
    assert files
    for doc in k8s_docs():
        if doc.get("kind") == "Kustomization":
            assert "namespace" not in doc
            for res in doc.get("resources", []):
                assert (K8S_DIR / res).exists(), f"kustomization: missing {res}"
            continue
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        assert doc["metadata"].get("name"), doc["__file__"]
        assert "namespace" not in doc["metadata"], f"{doc['__file__']}: hard-coded namespace"


def test_k8s_expected_objects_per_stream():
    names = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs() if "metadata" in d}
    for kind in ("Deployment", "PodDisruptionBudget", "Service", "ScaledObject"):
        found = {n for k, n in names if k == kind}
        for stream in STREAMS:
            assert any(stream in n for n in found), f"no {kind} for stream {stream}"
    assert any(k == "Job" for k, _ in names)
    assert any(k == "ConfigMap" for k, _ in names)
    assert any(k == "Secret" for k, _ in names)


def test_k8s_configmap():
    (cm,) = k8s_objects("ConfigMap")
    data = cm["data"]
    for key in (
        "INGEST_KAFKA_BOOTSTRAP",
        "INGEST_METRICS_HOST",
        "INGEST_METRICS_PORT",
        "INGEST_BATCH_MAX_ROWS",
        "INGEST_BATCH_MAX_AGE_MS",
        "INGEST_DEDUPE_WINDOW_SECONDS",
        "INGEST_TOPIC_PARTITIONS",
        "INGEST_LOG_LEVEL",
    ):
        assert key in data, key
        assert isinstance(data[key], str), f"{key} must be a string"
    assert data["INGEST_METRICS_PORT"] == str(METRICS_PORT)
    assert data["INGEST_METRICS_HOST"] == "0.0.0.0"
    assert data["INGEST_TOPIC_PARTITIONS"] == str(DEFAULT_PARTITIONS)
    (secret,) = [s for s in k8s_objects("Secret") if s["metadata"]["name"] == "ingest-secrets"]
    assert {"INGEST_DATABASE_URL", "INGEST_REDIS_URL"} <= set(secret.get("stringData", {}))
    # Roles: the consumer logs in as the writer, maintenance and operator commands as the owner.
    assert "_writer:" in secret["stringData"]["INGEST_DATABASE_URL"]
    assert "_owner:" in secret["stringData"]["INGEST_MAINTENANCE_DATABASE_URL"]
    # Durable topics in production.
    assert (data["INGEST_TOPIC_REPLICATION_FACTOR"], data["INGEST_TOPIC_MIN_INSYNC_REPLICAS"]) == ("3", "2")


def _probe_port(probe: dict, container: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        port = named[port]
    return int(port)


@pytest.mark.parametrize("stream", STREAMS)
def test_k8s_deployment(stream):
    deployments = [
        d
        for d in k8s_objects("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("ingest/stream") == stream
    ]
    assert len(deployments) == 1
    dep = deployments[0]
    spec = dep["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 35
    cm_names = {c["metadata"]["name"] for c in k8s_objects("ConfigMap")}
    secret_names = {s["metadata"]["name"] for s in k8s_objects("Secret")}
    (container,) = [c for c in spec["containers"] if c["name"] == "ingest"]
    assert ingest_argvs(container.get("command"), container.get("args")) == [["consume", "--stream", stream]]

    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/readyz" and _probe_port(ready, container) == METRICS_PORT
    assert live["httpGet"]["path"] == "/healthz" and _probe_port(live, container) == METRICS_PORT
    assert any(p["containerPort"] == METRICS_PORT and p.get("name") == "metrics" for p in container["ports"])

    res = container["resources"]
    # Requests above the measured peak RSS of one consumer (at most 270 MiB, docs/performance.md), limit above both.
    assert res["requests"]["cpu"] == "500m" and res["requests"]["memory"] == "384Mi"
    assert res["limits"]["memory"] == "768Mi"
    assert _mib(res["requests"]["memory"]) > MEASURED_PEAK_RSS_MIB < _mib(res["limits"]["memory"])
    assert spec["automountServiceAccountToken"] is False

    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert re.fullmatch(r"sleep 5", pre_stop.strip())
    # preStop + graceful shutdown (<= 30 s) must fit in the grace period.
    assert spec["terminationGracePeriodSeconds"] >= 5 + 30

    env = {e["name"]: e for e in container.get("env", [])}
    # Dynamic membership: a stopping pod leaves the group (docs/scaling.md); pod names never come back.
    assert "INGEST_INSTANCE_ID" not in env
    assert all("INGEST_INSTANCE_ID" not in {e["name"] for e in c.get("env", [])} for c in spec["initContainers"])
    assert env.get("INGEST_METRICS_HOST", {}).get("value", "0.0.0.0") == "0.0.0.0"
    refs = container["envFrom"]
    assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= cm_names
    assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secret_names
    assert any("configMapRef" in r for r in refs) and any("secretRef" in r for r in refs)

    selector = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()

    # PDB, Service and ScaledObject point at this Deployment's pods.
    pdbs = [
        p
        for p in k8s_objects("PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1
    assert pdbs[0]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    svcs = [s for s in k8s_objects("Service") if s["spec"]["selector"].items() <= labels.items()]
    assert len(svcs) == 1
    svc = svcs[0]
    assert any(p["port"] == METRICS_PORT and p["name"] == "metrics" for p in svc["spec"]["ports"])
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
    sos = [
        s
        for s in k8s_objects("ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    ]
    assert len(sos) == 1
    so = sos[0]
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert so["spec"]["minReplicaCount"] == 1
    assert so["spec"]["maxReplicaCount"] == DEFAULT_PARTITIONS
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # KEDA reads the names from the consumer container's environment, the same values ingest uses.
    (cm,) = k8s_objects("ConfigMap")
    assert meta["bootstrapServersFromEnv"] == "INGEST_KAFKA_BOOTSTRAP" and cm["data"]["INGEST_KAFKA_BOOTSTRAP"]
    assert so["spec"]["scaleTargetRef"]["envSourceContainerName"] == container["name"]
    assert env[meta["consumerGroupFromEnv"]]["value"] == f"ingest.{stream}"
    assert env[meta["topicFromEnv"]]["value"] == f"events.{stream}"
    assert trigger["authenticationRef"]["name"] in {t["metadata"]["name"] for t in k8s_objects("TriggerAuthentication")}
    assert int(meta["lagThreshold"]) > 0


def test_k8s_roles_job_and_migrate_init_containers():
    """The roles are created once by a Job (superuser URL); every consumer pod converges the schema, grants and
    topics in init containers, which run again with each new image (a Job's template could not change)."""
    (job,) = k8s_objects("Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in {"Never", "OnFailure"}
    argvs = [argv for c in spec["containers"] for argv in ingest_argvs(c.get("command"), c.get("args"))]
    assert [a[:3] for a in argvs] == [["migrate", "--roles", "ingest"]]
    assert "roles-job.yaml" not in yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"]
    for dep in k8s_objects("Deployment"):
        init = dep["spec"]["template"]["spec"]["initContainers"]
        assert [ingest_argvs(c.get("command"), c.get("args")) for c in init] == [
            [["migrate", "--roles", "ingest"]], [["topics", "ensure"]]]


def test_metrics_port_consistent_with_prometheus_scrape_config():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ingest"]
    ports = {sd["port"] for sd in job.get("dns_sd_configs", [])}
    ports |= {int(t.rsplit(":", 1)[1]) for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert ports == {METRICS_PORT}
    targets = {n for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    targets |= {t.rsplit(":", 1)[0] for sc in job.get("static_configs", []) for t in sc["targets"]}
    services = load_compose()["services"]
    for name in targets:
        assert name in services, f"prometheus scrapes unknown compose service {name}"


def test_compose_roles():
    """migrate creates the roles as the superuser; consumers write as the writer, maintain as the owner."""
    compose = load_compose()
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["environment"]["INGEST_MAINTENANCE_DATABASE_URL"].startswith("postgresql://postgres:")
    (script,) = as_list(migrate["command"])
    (roles_argv, _) = ingest_argvs_from_script(script)
    assert roles_argv[:3] == ["migrate", "--roles", "ingest"]
    for kind in ("owner", "writer", "reader"):
        assert f"--{kind}-password-file" in roles_argv
        assert f"ingest_{kind}" in migrate["secrets"]
        secret_file = REPO / compose["secrets"][f"ingest_{kind}"]["file"]
        password = secret_file.read_text().strip()
        if kind != "reader":
            url = services["consumer-webhook"]["environment"][
                "INGEST_DATABASE_URL" if kind == "writer" else "INGEST_MAINTENANCE_DATABASE_URL"]
            assert url.startswith(f"postgresql://ingest_{kind}:{password}@"), url
    for stream in STREAMS:
        env = services[f"consumer-{stream}"]["environment"]
        assert env["INGEST_TOPIC_REPLICATION_FACTOR"] == "1"  # the Compose stack has one broker
