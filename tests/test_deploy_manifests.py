"""The deployment files hold together, checked offline: every Kubernetes manifest and
compose.yaml parses, the Deployment has its probes and a grace period longer than the
gateway's own drain, the config they carry validates, no secret sits in a ConfigMap, and the
image's contract (Containerfile) is what docs/containers.md promises. The image itself is
built and run by tests/test_container.py (`make test-container`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import ENV_PREFIX, load_config_data

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBE.glob("*.yaml"))


def documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == name]


def only(name: str) -> dict:
    found = kind(name)
    assert len(found) == 1, f"expected one {name} in deploy/kubernetes, found {len(found)}"
    return found[0]


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def secret_keys() -> set[str]:
    secret = only("Secret")
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def shipped_container_config() -> str:
    return only("ConfigMap")["data"]["config.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_parses_and_names_its_kind_and_api_version(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind are required"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} needs metadata.name"


def test_the_kustomization_lists_every_manifest():
    listed = set(only("Kustomization")["resources"])
    assert listed == {p.name for p in MANIFESTS if p.name != "kustomization.yaml"}


def test_the_deployment_probes_readiness_and_liveness_on_the_health_endpoints():
    pod = only("Deployment")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert gateway[probe]["httpGet"]["port"] in ("http", ports["http"])


def test_the_grace_period_outlasts_the_preStop_pause_and_the_gateways_drain():
    """Kubernetes SIGKILLs at terminationGracePeriodSeconds, counted from the preStop hook:
    the gateway's shutdown_grace (and a margin to flush the usage log) must fit after it."""
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    config = yaml.safe_load(shipped_container_config())
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > pause + config["server"]["shutdown_grace"] + 5


@pytest.mark.parametrize("workload", ["Deployment", "Job"])
def test_pods_run_as_non_root_on_a_read_only_root_filesystem(workload):
    pod = only(workload)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/etc/gateway", "/tmp"} <= mounts  # the config, and a writable /tmp
        assert {"secretRef": {"name": only("Secret")["metadata"]["name"]}} in container["envFrom"]


def test_the_migration_job_runs_migrate_with_the_deployments_image_and_config():
    """`migrate` applies the schema step ahead of the rollout (docs/upgrades.md)."""
    job = only("Job")["spec"]["template"]["spec"]
    pod = only("Deployment")["spec"]["template"]["spec"]
    (migrate,), (gateway,) = job["containers"], pod["containers"]
    assert migrate["image"] == gateway["image"]
    assert job["restartPolicy"] == "Never"
    args = build_parser().parse_args(migrate["args"])
    assert args.command == "migrate" and not args.plan
    assert job["volumes"][0]["configMap"] == pod["volumes"][0]["configMap"]


def test_the_pod_disruption_budget_and_autoscaler_target_the_gateway():
    deployment = only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = only("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb or "minAvailable" in pdb
    hpa = only("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    service = only("Service")["spec"]
    assert service["selector"].items() <= labels.items()


def test_prometheus_scrapes_the_metrics_endpoint_on_the_gateway_port():
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(yaml.safe_load(shipped_container_config())["server"]["port"])


def test_the_configmap_is_the_compose_config_and_validates_with_the_secrets_keys(monkeypatch):
    """One config for compose and Kubernetes; every `os.environ/NAME` it reads is a key of
    the Secret, and with them set it loads without an error."""
    text = shipped_container_config()
    assert text == (ROOT / "deploy" / "config.yaml").read_text()
    named = set(re.findall(re.escape(ENV_PREFIX) + r"(\w+)", text))
    assert named <= secret_keys(), f"the Secret lacks {named - secret_keys()}"
    for name in secret_keys():
        monkeypatch.setenv(name, "postgresql://gw@db/gw" if name.endswith("STORE_URL")
                           else "redis://redis:6379/0" if name.endswith("REDIS_URL") else "x")
    config = load_config_data(yaml.safe_load(text))
    assert config.store.url.startswith("postgresql://") and config.rate_limits.redis_url


SECRET_LOOKING = re.compile(r"(sk-[A-Za-z0-9_-]{8,}|gw-[A-Za-z0-9_-]{16,}|://[^/\s:@]+:[^/\s@]+@"
                            r"|(?:api_key|master_key|password|token)\s*:\s*(?!os\.environ/)\S)", re.I)


def test_no_secret_in_a_configmap():
    for config_map in kind("ConfigMap"):
        for key, value in config_map["data"].items():
            for line in value.splitlines():
                code = line.split("#", 1)[0]
                assert not SECRET_LOOKING.search(code), f"ConfigMap {key}: {line.strip()!r} looks like a secret"


def test_compose_runs_the_gateway_with_postgresql_and_redis():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway", "postgres", "redis"} <= set(services)
    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] == "Containerfile"
    assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]
    assert set(gateway["depends_on"]) == {"postgres", "redis"}
    env = dict(item.split("=", 1) if "=" in item else (item, None) for item in gateway["environment"])
    assert env["GATEWAY_STORE_URL"].startswith("postgresql://") and "@postgres:" in env["GATEWAY_STORE_URL"]
    assert env["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    grace = float(gateway["stop_grace_period"].rstrip("s"))
    assert grace > yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["server"]["shutdown_grace"]
    assert any(v.endswith(":/data") for v in gateway["volumes"])


def test_the_image_is_multi_stage_non_root_and_starts_the_cli_under_an_init():
    text = (ROOT / "Containerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all(s == "${BASE_IMAGE}" for s in stages)
    assert re.search(r"^ARG BASE_IMAGE=\S*python:3\.\d+-slim", text, re.M)
    last = text[text.rindex("\nFROM "):]
    assert not re.search(r"apt-get|gcc|build-essential|pip install", last), "the last stage installs nothing"
    assert re.search(r"^USER 10001", last, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health/ready", last, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "python", "/app/proxy.py"\]', last, re.M)
    assert (ROOT / ".containerignore").read_text() == (ROOT / ".dockerignore").read_text()


def test_serve_takes_host_port_and_workers_from_the_environment(monkeypatch):
    """The image sets GATEWAY_HOST/PORT/WORKERS (no flags in an orchestrator's args); a flag
    still wins."""
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("GATEWAY_PORT", "9090")
    monkeypatch.setenv("GATEWAY_WORKERS", "3")
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.workers) == ("0.0.0.0", 9090, 3)
    assert build_parser().parse_args(["serve", "--workers", "2"]).workers == 2
    monkeypatch.setenv("GATEWAY_WORKERS", "four")
    with pytest.raises(SystemExit, match="GATEWAY_WORKERS: expected an integer"):
        build_parser()
