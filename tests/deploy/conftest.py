"""Rendering the kustomize overlays: with kubectl's built-in kustomize (put into .venv/bin by
tests/deploy/install-kubectl.sh), exactly as `kubectl apply -k` renders them. Without kubectl a
test-side renderer of the subset deploy/k8s uses (resources, namespace, labels, images,
strategic-merge patches by file, JSON 6902 patches by file with a target, configMapGenerator
from env files with its content-hash name suffix) stands in, except under CI=true, where a
missing kubectl fails."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import in_ci

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
USED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
    "configMapGenerator",
}
# marks a generated ConfigMap until the top-level render gives it its hash suffix
_GENERATED = "carstream.test/generated"


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    """Strategic merge as the overlays use it: maps recursively, named-map lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out = [copy.deepcopy(i) for i in base]
        added = []
        for item in patch:
            for n, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[n] = merge(existing, item)
                    break
            else:
                added.append(copy.deepcopy(item))
        return added + out  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(obj: dict, ops: list[dict]) -> dict:
    """The JSON patch operations the overlays use (add, replace, remove) applied to a copy."""
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif op["op"] in ("add", "replace"):
            if isinstance(node, list):
                if last == "-":
                    node.append(copy.deepcopy(op["value"]))
                elif op["op"] == "add":
                    node.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    node[int(last)] = copy.deepcopy(op["value"])
            else:
                assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
                node[last] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"JSON patch op this test renderer lacks: {op['op']}")
    return obj


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _set_image(obj: dict, images: list[dict]) -> None:
    for container in [c for pod in _pod_specs(obj) for c in pod.get("containers", [])]:
        name = container["image"].split(":", 1)[0]
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def parse_env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs:` file: KEY=value lines, leading blanks dropped, `#` lines skipped;
    the value is kept as written (quotes and a trailing `# ...` included)."""
    data = {}
    for line in path.read_text().splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=value: {line!r}"
        data[key] = value
    return data


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher): sha256 of the JSON
    encoding Go's encoding/json gives {"data", "kind", "name": ""}, its first 10 hex digits with
    0, 1, 3, a, e mapped to g, h, k, m, t."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generate_config_maps(directory: Path, generators: list[dict]) -> list[dict]:
    objects = []
    for generator in generators:
        unknown = set(generator) - {"name", "envs"}
        assert not unknown, f"{directory}: configMapGenerator fields this renderer lacks: {unknown}"
        data: dict[str, str] = {}
        for env_file in generator["envs"]:
            data.update(parse_env_file(directory / env_file))
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "annotations": {_GENERATED: "true"}},
                "data": data,
            }
        )
    return objects


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {})
    return [pod] if isinstance(pod, dict) and pod else []


def _rename_config_map_references(objects: list[dict], old: str, new: str) -> None:
    """The references kustomize's name-reference transformer rewrites for a ConfigMap, in the
    pod templates the manifests have: envFrom, env valueFrom, volumes (plain and projected)."""
    for obj in objects:
        for pod in _pod_specs(obj):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                for source in container.get("envFrom", []):
                    if source.get("configMapRef", {}).get("name") == old:
                        source["configMapRef"]["name"] = new
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef", {})
                    if ref.get("name") == old:
                        ref["name"] = new
            for volume in pod.get("volumes", []):
                sources = [volume, *volume.get("projected", {}).get("sources", [])]
                for source in sources:
                    if source.get("configMap", {}).get("name") == old:
                        source["configMap"]["name"] = new


def _finish_generated(objects: list[dict]) -> None:
    """Give each generated ConfigMap its content-hash suffix (after every patch, as kustomize
    does) and point the references at the new name."""
    for obj in objects:
        annotations = obj["metadata"].get("annotations", {})
        if annotations.pop(_GENERATED, None) is None:
            continue
        if not annotations:
            del obj["metadata"]["annotations"]
        old = obj["metadata"]["name"]
        obj["metadata"]["name"] = f"{old}-{config_map_hash(obj['data'])}"
        _rename_config_map_references(objects, old, obj["metadata"]["name"])


def render(directory: Path, _top: bool = True) -> list[dict]:
    kustomization = load_docs(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - USED_FIELDS
    assert not unknown, f"{directory}: kustomize fields this test renderer lacks: {unknown}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path, _top=False) if path.is_dir() else load_docs(path)
    objects += _generate_config_maps(directory, kustomization.get("configMapGenerator", []))
    for patch_entry in kustomization.get("patches", []):
        patch = load_docs(directory / patch_entry["path"])[0]
        if isinstance(patch, list):  # JSON 6902: a list of operations on the named target
            matched = [o for o in objects if _matches(o, patch_entry["target"])]
            assert matched, f"patch {patch_entry['path']} matches nothing"
            for target in matched:
                objects[objects.index(target)] = json6902(target, patch)
            continue
        targets = [
            o
            for o in objects
            if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]
        ]
        assert targets, f"patch {patch_entry['path']} matches nothing"
        for target in targets:
            objects[objects.index(target)] = merge(target, patch)
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        _set_image(obj, kustomization.get("images", []))
    if _top:
        _finish_generated(objects)
    return objects


def kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


def kustomize(directory: Path) -> list[dict]:
    """Render with kubectl's kustomize; the stand-in renderer only outside CI."""
    exe = kubectl()
    if exe is None:
        if in_ci():
            pytest.fail("kubectl is missing: run tests/deploy/install-kubectl.sh (make setup)")
        return render(directory)
    proc = subprocess.run(
        [exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr.strip()}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


_RENDERED: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    """An overlay ("cpu", "gpu", "gpu/engine-build") or "base", rendered once per session."""
    if name not in _RENDERED:
        _RENDERED[name] = kustomize(K8S / name if name == "base" else K8S / "overlays" / name)
    return copy.deepcopy(_RENDERED[name])


@pytest.fixture(params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, rendered(request.param)


@pytest.fixture
def render_overlay():
    return rendered


@pytest.fixture
def renderers():
    """(kubectl path or None, kubectl renderer, stand-in renderer) for comparing them."""
    return kubectl(), kustomize, render
