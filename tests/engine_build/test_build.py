"""build_bundle: export, parity report, int8 cost, gates, held-out defaults, atomic install."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engine_build.build import BuildError, ParityGateError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.parity import batch1_report, class_name_index, parity_report

from .conftest import CLASSES, write_checkpoint, write_images


def test_onnx_export_has_dynamic_batch_and_passes_checker(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert (
        inp.name == "images"
        and dims[0].dim_param
        and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    )
    assert model.graph.output[0].name == "logits"
    assert model.opset_import[0].version >= 17


def test_parity_report_per_artifact(bundle_dir):
    report = json.loads((bundle_dir / PARITY_FILE).read_text())
    fp32 = report["artifacts"]["onnxruntime-fp32"]
    assert fp32["n_images"] == 12 and fp32["n_labelled"] == 12
    assert fp32["top1_agreement"] >= 0.999 and fp32["max_abs_logit_diff"] < 1e-3
    assert fp32["gate"] == {
        "min_top1_agreement": 0.999,
        "allowed_flips": 0,
        "max_prob_diff": 0.01,
        "passed": True,
        "failures": [],
    }
    assert 0.0 <= fp32["top1_accuracy_pytorch"] <= 1.0
    assert fp32["top1_accuracy_artifact"] == fp32["top1_accuracy_pytorch"]
    assert fp32["non_finite_logits"] == 0
    batch1 = fp32["batch1"]
    assert batch1["n_images"] == 8 and batch1["non_finite_logits"] == 0
    assert batch1["top1_agreement_with_batched"] == 1.0 and batch1["max_abs_logit_diff"] < 1e-3


def test_int8_built_with_accuracy_cost_reported(bundle_dir):
    report = json.loads((bundle_dir / PARITY_FILE).read_text())["artifacts"]["onnxruntime-int8"]
    # calibrated on half the 12 parity images, scored on the other half
    assert report["file"] == "model.int8.onnx" and report["calibration_images"] == 6
    assert report["n_images"] == 6 and report["scored_apart_from_calibration"] is True
    assert report["accuracy_cost"] == pytest.approx(
        report["top1_accuracy_pytorch"] - report["top1_accuracy_artifact"]
    )
    assert report["max_abs_logit_diff"] > 0  # really quantised, not a copy of fp32
    int8 = onnx.load(str(bundle_dir / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert (bundle_dir / "model.int8.onnx").stat().st_size < (
        bundle_dir / "model.onnx"
    ).stat().st_size / 2


def test_parity_report_math():
    ref = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[2.0, 1.5], [1.0, 0.5], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, -1])
    r = parity_report(ref, cand, labels)
    assert r["top1_agreement"] == 0.75 and r["max_abs_logit_diff"] == 2.5
    assert r["top1_accuracy_pytorch"] == pytest.approx(2 / 3)
    assert r["top1_accuracy_artifact"] == pytest.approx(1 / 3)
    assert r["n_labelled"] == 3


def test_folder_names_map_to_classes():
    index = class_name_index(CLASSES)
    assert index["X5"] == 1 and index["BMW X5"] == 1 and index["BMW_X5"] == 1
    assert index["33"] == 2 and "Golf" not in index


def test_failed_gate_leaves_no_bundle(parity_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", near_tie=True)
    out = tmp_path / "bundle"
    with pytest.raises(
        ParityGateError, match=r"model\.int8\.onnx: top-1 agreement .* < 0\.9"
    ) as info:
        build_bundle(
            ckpt,
            out,
            precisions="fp32,int8",
            parity_data=parity_dir,
            max_batch=8,
            int8_agreement=0.9,
        )
    report = info.value.report["artifacts"]
    assert report["onnxruntime-int8"]["gate"]["passed"] is False
    assert report["onnxruntime-fp32"]["gate"]["passed"] is True
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.building-*"))


def corrupt_onnxruntime(monkeypatch, corrupt):
    """Make OnnxRuntimeEngine.infer return ``corrupt(engine_name, batch_logits)``."""
    from engine_build.runtime.onnxruntime_engine import OnnxRuntimeEngine

    real = OnnxRuntimeEngine.infer
    monkeypatch.setattr(
        OnnxRuntimeEngine, "infer", lambda self, batch: corrupt(self.name, real(self, batch))
    )


def inf_at_top1(name, logits):
    """Non-finite logits whose argmax still agrees with PyTorch everywhere."""
    if name == "onnxruntime-fp32":
        logits = logits.copy()
        logits[np.arange(len(logits)), logits.argmax(1)] = np.inf
    return logits


def all_nan_int8(name, logits):
    return np.full_like(logits, np.nan) if name == "onnxruntime-int8" else logits


@pytest.mark.parametrize(
    ("corrupt", "file"), [(inf_at_top1, "model.onnx"), (all_nan_int8, "model.int8.onnx")]
)
def test_non_finite_logits_fail_the_gate(
    checkpoint_dir, parity_dir, tmp_path, monkeypatch, corrupt, file
):
    """NaN argmaxes to 0 and inf to its own class: agreement alone let such an artifact pass
    (int8 is report-only by default, yet NaN output is never acceptable)."""
    corrupt_onnxruntime(monkeypatch, corrupt)
    out = tmp_path / "bundle"
    with pytest.raises(ParityGateError, match=rf"{file}: .*non-finite") as info:
        build_bundle(
            checkpoint_dir, out, precisions="fp32,int8", parity_data=parity_dir, max_batch=8
        )
    key = "onnxruntime-int8" if "int8" in file else "onnxruntime-fp32"
    entry = info.value.report["artifacts"][key]
    assert entry["non_finite_logits"] > 0 and entry["gate"]["passed"] is False
    json.dumps(info.value.report, allow_nan=False)  # the report stays strict JSON
    assert not out.exists()


def test_non_finite_reference_is_refused(parity_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", nan_logit=True)
    out = tmp_path / "bundle"
    with pytest.raises(ParityGateError, match=r"PyTorch FP32 reference.*non-finite.*12 of 12"):
        build_bundle(ckpt, out, precisions="fp32", parity_data=parity_dir, max_batch=8)
    assert not out.exists()


def test_batch_of_one_is_verified(checkpoint_dir, parity_dir, tmp_path, monkeypatch):
    """12 parity images at max_batch 8 run as batches of 8 and 4: an engine wrong only at
    batch 1 (the worker's commonest batch; TensorRT's padding path) used to pass."""

    def wrong_at_batch_1(name, logits):
        return np.roll(logits, 1, axis=1) if len(logits) == 1 else logits

    corrupt_onnxruntime(monkeypatch, wrong_at_batch_1)
    out = tmp_path / "bundle"
    with pytest.raises(ParityGateError, match=r"model\.onnx: batch 1 .*agreement") as info:
        build_bundle(checkpoint_dir, out, precisions="fp32", parity_data=parity_dir, max_batch=8)
    batch1 = info.value.report["artifacts"]["onnxruntime-fp32"]["batch1"]
    assert batch1["n_images"] == 8 and batch1["top1_agreement_with_batched"] == 0.0
    assert not out.exists()


def test_batch_one_near_ties_do_not_fail_a_good_engine_but_clear_flips_do():
    batched = np.array([[5.0, 4.99, 0.0], [1.0, 3.0, 0.0], [2.0, 0.0, 0.0]], np.float32)
    near_tie = batched.copy()
    near_tie[0] = [4.99, 5.0, 0.0]  # classes 0 and 1 within 1%: rounding, not a broken path
    report = batch1_report(batched, batched, near_tie)
    assert report["top1_agreement_with_batched"] == 1.0 and report["near_tie_flips"] == 1
    clear = batched.copy()
    clear[1] = [3.0, 1.0, 0.0]  # class 1 led by 2.0: a real disagreement
    report = batch1_report(batched, batched, clear)
    assert report["top1_agreement_with_batched"] == 2 / 3 and report["near_tie_flips"] == 0
    nan = batched.copy()
    nan[0] = np.nan  # never a near-tie
    assert batch1_report(batched, batched, nan)["top1_agreement_with_batched"] == 2 / 3


def test_default_parity_images_come_from_the_checkpoints_test_split(tmp_path):
    data = tmp_path / "data"
    write_images(data / "train", per_class=1, seed=1)
    write_images(data / "test", per_class=2, seed=2)
    ckpt = write_checkpoint(tmp_path / "ckpt", data_dir=str(data))
    out = build_bundle(ckpt, tmp_path / "bundle", precisions="fp32", max_batch=4, opt_batch=2)
    report = json.loads((out / PARITY_FILE).read_text())
    assert str(data) in report["parity_source"] and "test split" in report["parity_source"]
    assert report["artifacts"]["onnxruntime-fp32"]["n_images"] == 6
    assert load_bundle(out).manifest.model_version == "epoch4"  # epoch index 3 = 4 trained


def test_no_parity_images_is_a_clear_error(checkpoint_dir, tmp_path):
    with pytest.raises(BuildError, match="--parity-data"):
        build_bundle(checkpoint_dir, tmp_path / "b", precisions="fp32")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match=f"no images.*{empty}"):
        build_bundle(checkpoint_dir, tmp_path / "b", precisions="fp32", parity_data=empty)


def test_existing_bundle_replaced_only_when_asked(checkpoint_dir, parity_dir, tmp_path):
    out = tmp_path / "bundle"
    kw = {"precisions": "fp32", "parity_data": parity_dir, "max_batch": 4, "opt_batch": 2}
    build_bundle(checkpoint_dir, out, model_version="v6", **kw)
    with pytest.raises(BuildError, match="not empty"):
        build_bundle(checkpoint_dir, out, model_version="v7", **kw)
    assert load_bundle(out).manifest.model_version == "v6"
    build_bundle(checkpoint_dir, out, overwrite=True, model_version="v7", **kw)
    assert load_bundle(out).manifest.model_version == "v7"


def test_force_replaces_only_a_bundle(checkpoint_dir, parity_dir, tmp_path):
    """--force must not delete a folder that is not a bundle (no manifest.json): it might be
    a checkpoint, a data set or a home directory. An empty folder is fine to build into."""
    kw = {"precisions": "fp32", "parity_data": parity_dir, "max_batch": 4, "opt_batch": 2}
    other = tmp_path / "not-a-bundle"
    (other / "sub").mkdir(parents=True)
    (other / "keep.txt").write_text("x")
    (other / "sub" / "manifest.json").write_text("{}")  # only the top level counts
    with pytest.raises(BuildError, match=f"{other} .*not a bundle.*manifest.json"):
        build_bundle(checkpoint_dir, other, overwrite=True, **kw)
    assert (other / "keep.txt").read_text() == "x" and (other / "sub").is_dir()
    assert not list(tmp_path.glob(".not-a-bundle.*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_bundle(build_bundle(checkpoint_dir, empty, **kw)).manifest.arch == "resnet18"


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_out_overlapping_the_checkpoint_is_refused(parity_dir, tmp_path, where):
    """--out runs --checkpoint runs/r18 --force used to replace runs, checkpoint and all."""
    ckpt = write_checkpoint(tmp_path / "runs" / "r18")
    before = sorted(p.name for p in ckpt.iterdir())
    out = {"parent": tmp_path / "runs", "same": ckpt, "inside": ckpt / "bundle"}[where]
    for checkpoint in (ckpt, ckpt / "checkpoint.pt"):
        with pytest.raises(BuildError, match=f"--out {out} .*checkpoint"):
            build_bundle(checkpoint, out, precisions="fp32", parity_data=parity_dir, overwrite=True)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not (ckpt / "bundle").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"precisions": "fp32,fp8"}, "fp8"),
        ({"backends": "cuda"}, "cuda"),
        ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
        ({"fp16_agreement": 1.5}, "fp16-agreement"),
        ({"colour": "red"}, "colour"),
        ({"threads": -1}, "--threads must be >= 1"),
        ({"threads": 0}, "--threads must be >= 1"),
        ({"workspace_gb": -5}, "--workspace-gb must be > 0"),
        ({"workspace_gb": float("nan")}, "--workspace-gb must be > 0"),
        ({"opset": 7}, "--opset must be in 13..20"),
        ({"opset": 12}, "--opset must be in 13..20"),
        ({"opset": 21}, "--opset must be in 13..20"),
    ],
)
def test_bad_options_rejected(checkpoint_dir, parity_dir, tmp_path, options, match):
    kw = {"precisions": "fp32", "parity_data": parity_dir, **options}
    with pytest.raises(BuildError, match=match):
        build_bundle(checkpoint_dir, tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("opset", [13, 20])
def test_opset_range_ends_build(checkpoint_dir, parity_dir, tmp_path, opset):
    out = build_bundle(
        checkpoint_dir, tmp_path / "b", precisions="fp32,int8", parity_data=parity_dir,
        max_batch=4, opt_batch=2, opset=opset,
    )  # fmt: skip
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == opset


def test_tensorrt_demanded_without_gpu_is_an_error(checkpoint_dir, parity_dir, tmp_path):
    from engine_build.tensorrt_build import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(BuildError, match="--backends tensorrt"):
        build_bundle(checkpoint_dir, tmp_path / "b", backends="tensorrt", parity_data=parity_dir)


def test_fp16_onnx_for_tensorrt_is_fp16_inside_fp32_io(checkpoint_dir, tmp_path):
    """The graph the TensorRT strongly-typed build parses: FP16 weights, FP32 in/out."""
    import onnxruntime as ort
    import torch

    from engine_build.onnx_export import HalfPrecision, export_onnx
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint_dir))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    path = export_onnx(HalfPrecision(model), tmp_path / "fp16.onnx", 32)
    graph = onnx.load(str(path)).graph
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert graph.input[0].type.tensor_type.elem_type == f32
    assert graph.output[0].type.tensor_type.elem_type == f32
    assert any(init.data_type == f16 for init in graph.initializer)
    (out,) = ort.InferenceSession(str(path)).run(None, {"images": x})
    np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max())


def test_tensorrt_unavailable_says_why():
    from engine_build.tensorrt_build import tensorrt_available

    why = tensorrt_available()
    assert why is None or "CUDA" in why or "tensorrt" in why


@pytest.mark.parametrize(("n", "limit", "calibrated"), [(12, 128, 6), (256, 128, 128), (9, 2, 2)])
def test_int8_calibrates_on_images_it_is_not_scored_on(n, limit, calibrated):
    from engine_build.heldout import calibration_split
    from engine_build.parity import ParitySet

    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    calib, scored = calibration_split(ParitySet(images, np.zeros(n, np.int64), "t"), limit)
    assert len(calib) == calibrated
    used = {int(v) for v in calib.ravel()}
    assert used.isdisjoint(int(i) for i in scored) and len(used) + len(scored) == n


def test_a_single_parity_image_is_both_calibration_and_score():
    from engine_build.heldout import calibration_split
    from engine_build.parity import ParitySet

    calib, scored = calibration_split(ParitySet(np.zeros((1, 3, 2, 2)), np.zeros(1), "t"), 128)
    assert len(calib) == 1 and len(scored) == 0  # the build then scores on it, with a warning
