"""build_bundle: export, parity report, int8 cost, gates, held-out defaults, atomic install."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engine_build.build import BuildError, ParityGateError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.parity import class_name_index, parity_report

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
    assert fp32["gate"] == {"min_top1_agreement": 0.999, "passed": True}
    assert 0.0 <= fp32["top1_accuracy_pytorch"] <= 1.0
    assert fp32["top1_accuracy_artifact"] == fp32["top1_accuracy_pytorch"]


def test_int8_built_with_accuracy_cost_reported(bundle_dir):
    report = json.loads((bundle_dir / PARITY_FILE).read_text())["artifacts"]["onnxruntime-int8"]
    assert report["file"] == "model.int8.onnx" and report["calibration_images"] == 12
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


def test_default_parity_images_come_from_the_checkpoints_test_split(tmp_path):
    data = tmp_path / "data"
    write_images(data / "train", per_class=1, seed=1)
    write_images(data / "test", per_class=2, seed=2)
    ckpt = write_checkpoint(tmp_path / "ckpt", data_dir=str(data))
    out = build_bundle(ckpt, tmp_path / "bundle", precisions="fp32", max_batch=4, opt_batch=2)
    report = json.loads((out / PARITY_FILE).read_text())
    assert str(data) in report["parity_source"] and "test split" in report["parity_source"]
    assert report["artifacts"]["onnxruntime-fp32"]["n_images"] == 6
    assert load_bundle(out).manifest.model_version == "epoch3"


def test_no_parity_images_is_a_clear_error(checkpoint_dir, tmp_path):
    with pytest.raises(BuildError, match="--parity-data"):
        build_bundle(checkpoint_dir, tmp_path / "b", precisions="fp32")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match=f"no images.*{empty}"):
        build_bundle(checkpoint_dir, tmp_path / "b", precisions="fp32", parity_data=empty)


def test_existing_bundle_replaced_only_when_asked(checkpoint_dir, parity_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    kw = {
        "precisions": "fp32",
        "parity_data": parity_dir,
        "max_batch": 4,
        "opt_batch": 2,
        "model_version": "v7",
    }
    with pytest.raises(BuildError, match="not empty"):
        build_bundle(checkpoint_dir, out, **kw)
    assert (out / "keep.txt").exists()
    build_bundle(checkpoint_dir, out, overwrite=True, **kw)
    assert not (out / "keep.txt").exists()
    assert load_bundle(out).manifest.model_version == "v7"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"precisions": "fp32,fp8"}, "fp8"),
        ({"backends": "cuda"}, "cuda"),
        ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
        ({"fp16_agreement": 1.5}, "fp16-agreement"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_options_rejected(checkpoint_dir, tmp_path, options, match):
    with pytest.raises(BuildError, match=match):
        build_bundle(checkpoint_dir, tmp_path / "b", **options)


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
