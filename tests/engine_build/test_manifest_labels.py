"""Class names and the manifest's other fields as engine_build would write them: a name the
worker cannot serve (a line break, a lone surrogate, a blank make, two classes alike) is refused
when the bundle is read and, from a checkpoint, in one line before any export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine_build.bundle import BundleError, load_bundle, read_manifest
from engine_build.manifest import ARCHS, MANIFEST_FILE, Manifest
from training.checkpoint import CHECKPOINT_FILE
from training.preprocessing import PreprocessSpec

from .test_build_hazards import refused_before_any_work

NFD, NFC = "Citroe\u0308n", "Citro\u00ebn"
AUDI = {"make": "Audi", "model": "A4"}


def manifest_dict(labels: list[dict], level: str = "model", **fields) -> dict:
    """A manifest.json as engine_build writes it (no artifacts: read_manifest opens none)."""
    return {
        "schema_version": 1,
        "model_name": "m",
        "model_version": "v1",
        "arch": "resnet18",
        "level": level,
        "num_classes": len(labels),
        "labels": labels,
        "preprocess": PreprocessSpec().model_dump(mode="json"),
        "artifacts": [],
        "created_at": "2026-11-24T00:00:00Z",
        **fields,
    }


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return folder


BAD_LABELS = [
    ([{"make": "", "model": "A4"}], "labels.0.make", "must not be empty"),
    ([{"make": "   ", "model": "A4"}], "labels.0.make", "must not be empty"),
    ([{"make": "Audi\nERROR forged", "model": "A4"}], "labels.0.make", "U+000A"),
    ([AUDI, {"make": "BMW", "model": "X5\u2028"}], "labels.1.model", "U+2028"),
    ([{"make": "Audi|VW", "model": "A4"}], "labels.0.make", "holds '|'"),
    ([{"make": "A" * 100_000, "model": "A4"}], "labels.0.make", "100000 characters"),
    ([{**AUDI, "model_id": "A4\x1b[2J"}], "labels.0.model_id", "U+001B"),
    ([AUDI, {"make": "Audi", "model": ""}], "labels[1] ('Audi') has no model name", ""),
    ([AUDI, {"make": "Audi", "model": "   "}], "labels[1] ('Audi') has no model name", ""),
    ([AUDI, AUDI], "labels[1] ('Audi' 'A4') reads as labels[0]", ""),
    ([AUDI, {"make": "AUDI", "model": "a4"}], "reads as labels[0]", ""),
    ([{"make": NFD, "model": "C3"}, {"make": NFC, "model": "C3"}], "reads as labels[0]", ""),
    (
        [
            {"make": NFD, "model": "C3", "make_id": NFD},
            {"make": NFC, "model": "C3", "make_id": NFC},
        ],
        "reads as labels[0]",
        "",
    ),
]


@pytest.mark.parametrize(("labels", "where", "problem"), BAD_LABELS)
def test_read_manifest_refuses_class_names_no_worker_can_serve(tmp_path, labels, where, problem):
    bundle = write_manifest(tmp_path / "b", json.dumps(manifest_dict(labels)))
    with pytest.raises(BundleError) as info:
        read_manifest(bundle)
    message = str(info.value)
    assert message.startswith(f"invalid manifest {bundle / MANIFEST_FILE}: ")
    assert "\n" not in message
    assert where in message and problem in message


def test_a_lone_surrogate_is_refused_not_a_crash_on_the_first_batch(tmp_path):
    """json reads "\\udcff" as a lone surrogate; the worker's result could not serialise it."""
    text = json.dumps(manifest_dict([AUDI, {"make": "Au\\udcffdi", "model": "A4"}]))
    bundle = write_manifest(tmp_path / "b", text.replace("\\\\udcff", "\\udcff"))
    with pytest.raises(BundleError, match=r"labels\.1\.make: .*not UTF-8 text.*U\+DCFF"):
        read_manifest(bundle)
    text = json.dumps(manifest_dict([{**AUDI, "make_id": "\\udcff"}]))
    bundle = write_manifest(tmp_path / "c", text.replace("\\\\udcff", "\\udcff"))
    with pytest.raises(BundleError, match=r"labels\.0\.make_id: .*not UTF-8 text.*U\+DCFF"):
        read_manifest(bundle)


def test_load_bundle_refuses_a_forged_label_in_a_real_bundle(bundle_dir, tmp_path):
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    raw["labels"][2]["make"] = "Citroen\nERROR forged"
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"labels\.2\.make: .*U\+000A"):
        load_bundle(copy)


def test_names_are_read_as_training_writes_them(tmp_path, caplog):
    labels = [
        {"make": f" {NFD} ", "model": "C3", "make_id": f" {NFD} ", "model_id": "C3"},
        {"make": "Audi", "model": "A4|Sport", "make_id": 7, "model_id": None},
    ]
    with caplog.at_level("WARNING", logger="engine_build.manifest"):
        m = read_manifest(write_manifest(tmp_path / "b", json.dumps(manifest_dict(labels))))
    assert (m.labels[0].make, m.labels[0].make_id) == (NFC, NFC)
    assert m.labels[1].model == "A4|Sport"  # the trends split at the first '|', the make's
    # an older bundle's renamed class is said: its trend counts change member
    (warning,) = {r.getMessage() for r in caplog.records}
    assert f"class name {f' {NFD} '!r} is read as {NFC!r}" in warning


def test_make_level_and_compcars_names_still_load(tmp_path):
    """Make-level classes have no model; CompCars gives one make name to two make ids."""
    makes = [
        {"make": "Audi", "model": "", "make_id": 2, "model_id": None},
        {"make": "Audi", "model": "", "make_id": 8, "model_id": None},
        {"make": "トヨタ", "model": "", "make_id": 9, "model_id": None},
    ]
    m = read_manifest(write_manifest(tmp_path / "make", json.dumps(manifest_dict(makes, "make"))))
    assert [lb.make for lb in m.labels] == ["Audi", "Audi", "トヨタ"]
    models = [
        {"make": "Audi", "model": "A4L", "make_id": 2, "model_id": 10},
        {"make": "Audi", "model": "A4L", "make_id": 8, "model_id": 40},
    ]
    assert read_manifest(write_manifest(tmp_path / "model", json.dumps(manifest_dict(models))))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"arch": "banana"}, "arch: Input should be 'resnet18'"),
        ({"num_classes": "1"}, "num_classes: Input should be a valid integer"),
        ({"num_classes": 1.0}, "num_classes: Input should be a valid integer"),
        ({"num_classes": True}, "num_classes: Input should be a valid integer"),
    ],
)
def test_manifest_fields_are_strict(tmp_path, fields, where):
    text = json.dumps(manifest_dict([AUDI], **fields))
    with pytest.raises(BundleError, match=where):
        read_manifest(write_manifest(tmp_path / "b", text))


def test_archs_are_trainings():
    from training.models import ARCHS as TRAINING_ARCHS

    assert set(ARCHS) == set(TRAINING_ARCHS)


def test_duplicate_json_keys_are_refused(tmp_path):
    """Last-one-wins would let a second "arch" or "labels" override what a reviewer reads."""
    text = json.dumps(manifest_dict([AUDI]))
    forged = text.replace('"arch": "resnet18"', '"arch": "resnet18", "arch": "resnet50"')
    assert forged != text
    with pytest.raises(BundleError, match="duplicate key 'arch'"):
        read_manifest(write_manifest(tmp_path / "b", forged))
    nested = text.replace('"make": "Audi"', '"make": "Audi", "make": "BMW"')
    with pytest.raises(BundleError, match="duplicate key 'make'"):
        read_manifest(write_manifest(tmp_path / "c", nested))


def test_a_manifest_without_schema_version_is_refused(tmp_path):
    raw = manifest_dict([AUDI])
    del raw["schema_version"]
    with pytest.raises(BundleError, match="no schema_version"):
        read_manifest(write_manifest(tmp_path / "b", json.dumps(raw)))
    assert Manifest.model_validate(raw).schema_version == 1  # built in Python: the default


def test_a_missing_artifact_is_said_once(bundle_dir, tmp_path):
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (copy / "model.pt").unlink()
    with pytest.raises(BundleError) as info:
        load_bundle(copy)
    assert str(info.value) == f"bundle artifact missing: {copy / 'model.pt'}"


def test_python_built_manifests_are_checked_too():
    with pytest.raises(ValidationError, match="reads as labels"):
        Manifest.model_validate(manifest_dict([AUDI, {"make": "audi", "model": "A4"}]))


def _rename(index: int, **names):
    return lambda classes: classes[index].update(names)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_rename(1, make="Au\udcffdi"), "classes[1].make 'Au\\udcffdi' is not UTF-8 text"),
        (_rename(0, make="Audi\nERROR x"), "classes[0].make 'Audi\\nERROR x' holds the control"),
        (_rename(2, model_id="3\udcff"), "classes[2].model_id '3\\udcff' is not UTF-8 text"),
        (_rename(2, model=""), "classes[2] ('Citroen') has no model name"),
        (_rename(0, make="  "), "classes[0].make must not be empty"),
        (_rename(1, make="Audi|BMW"), "classes[1].make 'Audi|BMW' holds '|'"),
        (_rename(1, make="audi", model="a4", make_id=1, model_id=11), "classes[1] ('audi' 'a4')"),
    ],
)
def test_a_checkpoint_with_bad_class_names_is_one_line_before_any_work(
    parity_dir, tmp_path, monkeypatch, capsys, damage, needle
):
    """The export and parity runs used to happen first; then a traceback (the surrogate) or a
    bundle with the bad names written and exit 0."""
    ckpt, err = refused_before_any_work(
        tmp_path, parity_dir, monkeypatch, capsys, lambda raw: damage(raw["classes"])
    )
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m engine_build: error: checkpoint {ckpt / CHECKPOINT_FILE}: ")
    assert needle in err
    assert not (tmp_path / "b").exists()
