"""parity.json's ``decode.gpu_decode``: the GPU workers' decode path measured and gated at build.

The worker's own worker.gpu_preprocess code runs here on the CPU (torchvision's CPU JPEG
decoder); on a GPU machine the build measures on CUDA.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_build import decode_parity, heldout
from engine_build.build import ParityGateError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.decode_parity import (
    CPU_MEASURED_NOTE,
    GPU_DECODE_AGREEMENT,
    build_device,
    gate_applies,
    gate_gpu_decode,
    measure_gpu_decode,
)
from engine_build.parity import allowed_flips, image_dir_parity_set
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_spec_of
from worker import gpu_preprocess

from .conftest import CLASSES, write_checkpoint, write_images

ORIENTATION = 0x0112
BASELINE_SIZES = ((48, 40), (200, 160), (330, 290))  # draft factors 1, 4 and 4 at resize 37


def photo(w: int, h: int, k: int) -> np.ndarray:
    """A smooth photo-like picture, brighter per class: both decode paths agree on it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 7 + y / 9 + k)], axis=-1)
    return np.clip(img + 30 * k, 0, 255).astype(np.uint8)


def write_jpegs(root: Path) -> dict[str, int]:
    """Per class: baseline JPEGs (one with EXIF orientation 6), and one progressive JPEG;
    returns how many of each kind were written."""
    for k, cls in enumerate(CLASSES):
        folder = root / cls["model"]
        folder.mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(BASELINE_SIZES):
            kw = {}
            if i == 1:
                exif = Image.Exif()
                exif[ORIENTATION] = 6
                kw["exif"] = exif.tobytes()
            Image.fromarray(photo(w, h, k)).save(folder / f"j{i}.jpg", quality=90, **kw)
        Image.fromarray(photo(120, 96, k)).save(folder / "p.jpg", quality=90, progressive=True)
    n = len(CLASSES)
    return {"baseline": n * len(BASELINE_SIZES), "progressive": n}


@pytest.fixture(scope="module")
def mixed_parity(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """PNGs (4 per class, from conftest) and JPEGs side by side."""
    root = write_images(tmp_path_factory.mktemp("mixed"))
    counts = write_jpegs(root)
    counts["png"] = 4 * len(CLASSES)
    return root, counts


def build(ckpt: Path, parity: Path, out: Path, **options) -> Path:
    options = {"precisions": "fp32", "max_batch": 8, "opt_batch": 4, "threads": 2, **options}
    return build_bundle(ckpt, out, parity_data=parity, **options)


def garbage(images, spec, draft=True, orientations=None):
    """A GPU path gone wrong: large noise in place of the pictures."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(images), 3, spec.crop, spec.crop, generator=g) * 100


@pytest.fixture
def gpu_build(monkeypatch) -> None:
    """A build on a CUDA machine whose torchvision cannot decode JPEGs on CUDA (the same on a
    machine with or without a GPU): its gate applies, and it measures on the CPU."""
    monkeypatch.setattr(decode_parity, "build_device", lambda: "cuda")
    real = decode_parity._decoder_problem
    monkeypatch.setattr(
        decode_parity,
        "_decoder_problem",
        lambda device: "no nvJPEG in this torchvision" if device == "cuda" else real(device),
    )


def test_bundle_records_the_gpu_decode_path_beside_the_artifacts(
    checkpoint_dir, mixed_parity, tmp_path
):
    parity, counts = mixed_parity
    out = build(checkpoint_dir, parity, tmp_path / "b")
    report = json.loads((out / PARITY_FILE).read_text())
    # the existing structure is untouched: artifacts keyed as before, the bundle still loads
    assert report["artifacts"]["onnxruntime-fp32"]["n_images"] == sum(counts.values())
    assert load_bundle(out).parity["decode"] == report["decode"]
    entry = report["decode"]["gpu_decode"]
    assert entry["device"] == build_device()  # "cpu" on the test machines, "cuda" on a GPU
    # only baseline JPEGs take the GPU path; PNGs and progressive JPEGs are counted, not measured
    assert entry["n_images"] == entry["n_labelled"] == counts["baseline"]
    assert entry["n_cpu_path"] == counts["png"] + counts["progressive"]
    assert entry["n_parity_images"] == sum(counts.values()) and entry["n_unreadable"] == 0
    assert 0.0 <= entry["top1_agreement"] <= 1.0
    assert entry["top1_agreement"] >= GPU_DECODE_AGREEMENT  # a few grey levels flip nothing here
    assert 0 < entry["max_abs_pixel_diff"] <= 8 and entry["non_finite_logits"] == 0
    assert entry["accuracy_cost"] == pytest.approx(
        entry["top1_accuracy_cpu_decode"] - entry["top1_accuracy_gpu_decode"]
    )
    if entry["device"] == "cpu":  # says what a CPU measurement does not cover
        assert "nvJPEG" in entry["note"]
    assert entry["top1_agreement_excluding_near_ties"] >= entry["top1_agreement"]
    assert entry["near_tie_flips"] >= 0
    applied, why = gate_applies(("auto",))
    assert entry["gate"] == {
        "min_top1_agreement": GPU_DECODE_AGREEMENT,
        "allowed_flips": allowed_flips(GPU_DECODE_AGREEMENT, entry["n_images"]),
        "passed": True,
        "measured": True,
        "applied": applied,
        "why": why,
        "failures": [],
    }


def test_a_gpu_decode_path_that_answers_otherwise_fails_a_gpu_build_in_one_line(
    checkpoint_dir, mixed_parity, tmp_path, monkeypatch, gpu_build
):
    monkeypatch.setattr(gpu_preprocess, "preprocess_batch", garbage)
    out = tmp_path / "b"
    with pytest.raises(ParityGateError) as failed:
        build(checkpoint_dir, mixed_parity[0], out)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("parity gate failed for the GPU-decode path")
    entry = failed.value.report["decode"]["gpu_decode"]
    gated = entry["top1_agreement_excluding_near_ties"]
    assert f"top-1 agreement {gated:.4f} < 0.99 on 9 baseline JPEGs" in message
    assert f"near-tie flips not counted: {entry['near_tie_flips']}" in message
    assert gated < 0.99 and entry["gate"]["passed"] is False
    assert entry["gate"]["applied"] is True and "built on CUDA" in entry["gate"]["why"]
    assert "--gpu-decode-agreement 0" in message
    assert not out.exists()  # no bundle, as for any failed gate


def test_a_cpu_pool_bundle_records_a_missed_gate_with_a_warning_and_is_built(
    checkpoint_dir, mixed_parity, tmp_path, monkeypatch, caplog
):
    # before: every bundle failed here, though only CUDA workers ever decode on a GPU
    monkeypatch.setattr(decode_parity, "build_device", lambda: "cpu")
    monkeypatch.setattr(gpu_preprocess, "preprocess_batch", garbage)
    with caplog.at_level(logging.WARNING, logger="engine_build.build"):
        out = build(checkpoint_dir, mixed_parity[0], tmp_path / "b")
    entry = json.loads((out / PARITY_FILE).read_text())["decode"]["gpu_decode"]
    assert entry["top1_agreement_excluding_near_ties"] < 0.99
    assert entry["gate"]["passed"] is False and entry["gate"]["applied"] is False
    assert "CPU worker pools" in entry["gate"]["why"]
    (warning,) = [r.getMessage() for r in caplog.records if "GPU-decode path" in r.getMessage()]
    assert "misses --gpu-decode-agreement 0.99" in warning and "not failing the build" in warning
    assert "--backends tensorrt" in warning


def test_gpu_decode_agreement_0_records_without_failing(
    checkpoint_dir, mixed_parity, tmp_path, monkeypatch, gpu_build
):
    monkeypatch.setattr(gpu_preprocess, "preprocess_batch", garbage)
    out = build(checkpoint_dir, mixed_parity[0], tmp_path / "b", gpu_decode_agreement=0.0)
    entry = json.loads((out / PARITY_FILE).read_text())["decode"]["gpu_decode"]
    assert entry["top1_agreement"] < 0.99 and entry["gate"]["passed"] is True
    assert entry["gate"]["min_top1_agreement"] == 0.0 and entry["gate"]["applied"] is True


def test_the_gate_applies_to_bundles_meant_for_gpu_workers_only():
    assert gate_applies(("tensorrt",), "cpu")[0] is True
    assert gate_applies(("auto",), "cuda")[0] is True
    assert gate_applies(("onnxruntime",), "cuda")[0] is True
    assert gate_applies(("auto",), "cpu")[0] is False
    assert gate_applies(("onnxruntime",), "cpu")[0] is False


def test_a_gpu_build_that_cannot_decode_on_cuda_measures_on_the_cpu_and_says_why(
    checkpoint_dir, mixed_parity, tmp_path, gpu_build
):
    # before: recorded as skipped, measuring nothing
    out = build(checkpoint_dir, mixed_parity[0], tmp_path / "b")
    entry = json.loads((out / PARITY_FILE).read_text())["decode"]["gpu_decode"]
    assert "skipped" not in entry and entry["device"] == "cpu" and entry["n_images"] == 9
    assert entry["top1_agreement"] >= GPU_DECODE_AGREEMENT and entry["note"] == CPU_MEASURED_NOTE
    assert entry["fallback"] == "measured on cpu, not cuda: no nvJPEG in this torchvision"
    assert entry["gate"]["applied"] is True and entry["gate"]["passed"] is True


def test_png_parity_images_leave_the_gpu_path_unmeasured_without_failing(bundle_dir):
    entry = json.loads((bundle_dir / PARITY_FILE).read_text())["decode"]["gpu_decode"]
    assert entry["n_images"] == 0 and entry["top1_agreement"] is None
    assert entry["n_cpu_path"] == entry["n_parity_images"] == 12  # conftest's PNGs
    assert "no baseline JPEG" in entry["note"]
    assert entry["gate"]["passed"] is True and entry["gate"]["measured"] is False


def test_a_decoder_that_cannot_run_is_recorded_and_the_build_goes_on(
    checkpoint_dir, mixed_parity, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # as a torchvision without it
    out = build(checkpoint_dir, mixed_parity[0], tmp_path / "b")
    report = json.loads((out / PARITY_FILE).read_text())
    entry = report["decode"]["gpu_decode"]
    assert entry["top1_agreement"] is None and entry["n_images"] == 0
    assert entry["skipped"].startswith("torchvision.io.decode_jpeg cannot decode on cpu here")
    assert entry["gate"]["passed"] is True and entry["gate"]["measured"] is False
    assert report["artifacts"]["onnxruntime-fp32"]["gate"]["passed"] is True


def test_the_held_out_splits_jpegs_are_measured_from_their_files(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_images(data / "train", per_class=1, seed=1)
    counts = write_jpegs(data / "test")
    ckpt = write_checkpoint(tmp_path / "ckpt", data_dir=str(data))
    listed: list[str] = []
    real_index, real_run = heldout.load_index, decode_parity.run_batched
    monkeypatch.setattr(
        heldout, "load_index", lambda *a, **k: listed.append(a[2]) or real_index(*a, **k)
    )
    runs: list[int] = []
    monkeypatch.setattr(
        decode_parity, "run_batched", lambda f, x, b: runs.append(len(x)) or real_run(f, x, b)
    )
    out = build_bundle(ckpt, tmp_path / "bundle", precisions="fp32", max_batch=4, opt_batch=2)
    report = json.loads((out / PARITY_FILE).read_text())
    entry = report["decode"]["gpu_decode"]
    assert entry["n_images"] == counts["baseline"] and entry["n_cpu_path"] == counts["progressive"]
    # labelled as the reader labels the parity set (its folder classes map onto none of these)
    assert entry["n_labelled"] == report["artifacts"]["onnxruntime-fp32"]["n_labelled"] == 0
    assert entry["top1_agreement"] >= GPU_DECODE_AGREEMENT
    # --crop full: the parity set's own pixels and FP32 logits are the CPU path's (before: the
    # split was listed again and every JPEG decoded again, both paths run through the model)
    assert listed == ["test"]
    assert runs == [counts["baseline"]]  # one FP32 pass: the GPU path's pixels only


def test_a_crop_full_held_out_set_records_its_files_and_a_bbox_one_does_not(tmp_path, monkeypatch):
    from training.datasets.base import DatasetIndex, Sample

    data = tmp_path / "data"
    write_images(data / "train", per_class=1, seed=1)
    write_jpegs(data / "test")
    ckpt = {"classes": CLASSES, "args": {"dataset": "folder", "data_dir": str(data)}}
    spec = preprocess_spec_of(load_checkpoint(write_checkpoint(tmp_path / "c")))
    full = heldout.training_parity_set(ckpt, spec, 256)
    assert len(full.files) == len(full.images) == 12
    assert all(Path(f).is_file() for f in full.files)
    real = heldout.load_index

    def boxed(*args, **kwargs):
        index = real(*args, **kwargs)
        first = index.samples[0]
        samples = [Sample(first.path, first.target, (0, 0, 20, 20)), *index.samples[1:]]
        return DatasetIndex(samples, index.classes)

    monkeypatch.setattr(heldout, "load_index", boxed)
    bbox = heldout.training_parity_set(ckpt, spec, 256)
    assert bbox.files == () and len(bbox.images) == 12  # box crops: not the worker's pixels


def test_the_parity_sets_reference_logits_are_reused_for_its_own_files(
    checkpoint_dir, mixed_parity
):
    ckpt = load_checkpoint(checkpoint_dir)
    model, spec = model_from_checkpoint(ckpt), preprocess_spec_of(ckpt)
    parity = image_dir_parity_set(mixed_parity[0], ckpt["classes"], spec, 256)
    runs: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        runs.append(len(x))
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    reference = infer(parity.images)
    runs.clear()
    entry = measure_gpu_decode(
        parity.files, parity.labels, spec, infer, 8, "cpu", cpu_path=(parity.images, reference)
    )
    assert sum(runs) == entry["n_images"] == 9  # only the GPU path's pixels ran the model
    runs.clear()
    again = measure_gpu_decode(parity.files, parity.labels, spec, infer, 8, "cpu")
    assert sum(runs) == 2 * 9  # without them: both paths
    assert again["top1_agreement"] == entry["top1_agreement"]
    assert again["max_abs_pixel_diff"] == entry["max_abs_pixel_diff"]
    assert again["max_abs_logit_diff"] == pytest.approx(entry["max_abs_logit_diff"], abs=1e-5)


def test_unreadable_files_are_counted_not_raised(checkpoint_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint_dir)
    spec = preprocess_spec_of(ckpt)
    buf = io.BytesIO()
    Image.fromarray(photo(64, 48, 0)).save(buf, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[:-200])  # truncated: the worker's CPU decoder dead-letters it
    missing = tmp_path / "gone.jpg"
    entry = measure_gpu_decode([cut, missing], [0, 0], spec, lambda x: x, 4, "cpu")
    assert entry["n_images"] == 0 and entry["top1_agreement"] is None
    # the truncated one goes to the CPU decoder in a GPU worker too (which dead-letters it)
    assert entry["n_unreadable"] == 1 and entry["n_cpu_path"] == 1


def test_gate_fails_on_low_agreement_and_non_finite_logits_and_passes_what_it_did_not_measure():
    entry = {"device": "cuda", "n_images": 100, "top1_agreement": 0.97, "non_finite_logits": 0}
    entry["max_abs_pixel_diff"] = 6.0
    (failure,) = gate_gpu_decode(entry, 0.99)
    assert failure == (
        "top-1 agreement 0.9700 < 0.99 on 100 baseline JPEGs (at most 1 may flip; max |pixel "
        "diff| 6.0 grey levels, measured on cuda)"
    )
    assert entry["gate"]["passed"] is False and entry["gate"]["measured"] is True
    # near-tie flips recorded apart: the gate compares the agreement without them
    entry.update(top1_agreement_excluding_near_ties=0.98, near_tie_flips=1)
    (failure,) = gate_gpu_decode(entry, 0.99)
    assert failure.startswith(
        "top-1 agreement 0.9800 < 0.99 on 100 baseline JPEGs (at most 1 may flip; near-tie "
        "flips not counted: 1, 0.9700 counting them; max |pixel diff| 6.0"
    )
    entry.update(top1_agreement=0.98, top1_agreement_excluding_near_ties=1.0, near_tie_flips=2)
    assert gate_gpu_decode(entry, 0.99) == [] and entry["gate"]["passed"] is True
    entry.update(top1_agreement=1.0, non_finite_logits=3)
    assert gate_gpu_decode(entry, 0.99) == ["3 non-finite logits (NaN/inf) on 100 images"]
    skipped = {"device": "cpu", "n_images": 0, "top1_agreement": None, "skipped": "no decoder"}
    assert gate_gpu_decode(skipped, 0.99) == [] and skipped["gate"]["measured"] is False


def _near_tie_case(mixed_parity, checkpoint_dir, first_row: list[float]) -> dict:
    """measure_gpu_decode with a reference whose first baseline JPEG scores ``first_row`` and
    every other image [5, 0, 0], and a GPU path that answers class 0 for every image."""
    ckpt = load_checkpoint(checkpoint_dir)
    spec = preprocess_spec_of(ckpt)
    parity = image_dir_parity_set(mixed_parity[0], ckpt["classes"], spec, 256)
    baseline = [i for i, f in enumerate(parity.files) if Path(f).name.startswith("j")]
    reference = np.tile(np.float32([5.0, 0.0, 0.0]), (len(parity.files), 1))
    reference[baseline[0]] = first_row

    def infer(x: np.ndarray) -> np.ndarray:
        return np.tile(np.float32([1.0, 0.0, 0.0]), (len(x), 1))

    return measure_gpu_decode(
        parity.files, parity.labels, spec, infer, 8, "cpu", cpu_path=(parity.images, reference)
    )


def test_a_near_tie_flip_is_recorded_but_not_counted_against_the_gate(checkpoint_dir, mixed_parity):
    # before: one flip in 9 images (0.889) failed the gate, though the CPU path itself held the
    # two classes within 1% of each other (the rule batch 1's parity already exempts)
    entry = _near_tie_case(mixed_parity, checkpoint_dir, [0.995, 1.0, 0.0])
    assert entry["n_images"] == 9 and entry["top1_agreement"] == pytest.approx(8 / 9)
    assert entry["near_tie_flips"] == 1 and entry["top1_agreement_excluding_near_ties"] == 1.0
    assert gate_gpu_decode(entry, GPU_DECODE_AGREEMENT) == []
    clear = _near_tie_case(mixed_parity, checkpoint_dir, [0.0, 5.0, 0.0])
    assert clear["near_tie_flips"] == 0
    assert clear["top1_agreement_excluding_near_ties"] == pytest.approx(8 / 9)
    assert len(gate_gpu_decode(clear, GPU_DECODE_AGREEMENT)) == 1  # 0.99 of 9: none may flip


def test_the_build_measures_on_cuda_where_it_has_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_device() == "cpu"


def test_a_held_out_split_unreadable_when_listed_again_is_recorded_not_raised(
    tmp_path, monkeypatch
):
    # --crop bbox lists the split again (heldout.heldout_samples, which raises ParityDataError):
    # a split gone between the two reads is a skipped entry, not a failed build
    from engine_build.decode_parity import gpu_decode_entry

    def gone(*_args, **_kwargs):
        raise heldout.ParityDataError("held-out split of /data: gone")

    monkeypatch.setattr(decode_parity, "heldout_samples", gone)
    empty = heldout.ParitySet(np.zeros((1, 3, 8, 8), np.float32), np.zeros(1, np.int64), "x")
    entry = gpu_decode_entry(empty, np.zeros((1, 3)), {}, None, None, 1, 4, device="cpu")
    assert entry["top1_agreement"] is None
    assert entry["skipped"] == "held-out split unreadable: held-out split of /data: gone"
