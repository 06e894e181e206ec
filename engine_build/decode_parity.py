"""How the worker's GPU-decode path (``gpu_decode``) changes the PyTorch FP32 model's answers.

The parity gate certifies every artifact on pixels from the CPU decode path (Pillow's draft
decode and :func:`training.preprocessing.preprocess_image`). A GPU worker with ``gpu_decode`` on
decodes baseline JPEGs with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), reduces them by a
block average where Pillow would decode at a reduced DCT scale, and resizes with torch's
antialiased kernels (:mod:`worker.gpu_preprocess`): nearly, not exactly, the same pixels. This
module runs the parity images' own bytes through that code, on the build's device, feeds the
result to the FP32 model, and compares its top-1 with the model's on the CPU path's pixels of
the same files; ``parity.json`` records it under ``decode.gpu_decode``.

Only baseline JPEGs are measured: every other image (PNG, progressive or CMYK JPEG, one the
batched decoder refuses) is decoded on the CPU by the GPU worker too, so it answers the same by
construction and is only counted (``n_cpu_path``).

A top-1 flip where the CPU path's own logits hold the two classes in a near tie
(:func:`engine_build.parity.near_ties`, the rule batch 1's parity uses) is recorded but not
counted against the gate; the gate fails the build only for a bundle meant for GPU workers
(:func:`gate_applies`), and is recorded, with a WARNING when it would have failed, for others.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine_build.heldout import heldout_samples
from engine_build.parity import (
    ParityDataError,
    ParitySet,
    agreement_passes,
    allowed_flips,
    finite_rows,
    near_ties,
    parity_report,
    run_batched,
)
from engine_build.runtime.base import first_line
from training.preprocessing import PreprocessSpec, preprocess_image

log = logging.getLogger(__name__)

GPU_DECODE_ENTRY = "gpu_decode"  # parity.json: report["decode"][GPU_DECODE_ENTRY]
# --gpu-decode-agreement's default (docs/engine_build.md); the worker warns below it too
GPU_DECODE_AGREEMENT = 0.99
CPU_MEASURED_NOTE = (
    "measured with torchvision's CPU JPEG decoder (libjpeg-turbo): nvJPEG's IDCT on a GPU rounds "
    "slightly differently, so a GPU worker's agreement may differ a little"
)
DECODE_CHUNK = 32  # JPEGs per batched decode call: at most the worker's usual batch


def build_device() -> str:
    """Where the GPU-decode path is measured: CUDA when this build runs on a GPU, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def gate_applies(backends: Sequence[str], device: str | None = None) -> tuple[bool, str]:
    """Whether the GPU-decode gate may fail this build, and why: only a bundle meant for GPU
    workers, i.e. one whose ``--backends`` include tensorrt or that is built on CUDA
    (``device``, default :func:`build_device`). Every bundle has model.pt, but GPU decode exists
    only on CUDA workers: a CPU build of ``auto``/``onnxruntime`` serves CPU pools."""
    if "tensorrt" in backends:
        return True, "--backends includes tensorrt: a bundle for GPU workers"
    if (device or build_device()) == "cuda":
        return True, "built on CUDA: a bundle for GPU workers"
    return False, (
        "built on the CPU without --backends tensorrt: a bundle for CPU worker pools, which "
        "never decode on a GPU"
    )


def heldout_files(
    ckpt: dict, limit: int, data_dir: Path | None = None
) -> tuple[list[str], list[int]] | None:
    """The files (and labels) of the held-out split that
    :func:`engine_build.heldout.training_parity_set` reads, listed again with the same reader
    and the same even spread: for a ``--crop bbox`` checkpoint its ParitySet keeps only pixels,
    box crops, not what a worker decodes (a ``--crop full`` one records its files and is not
    listed again). None when the checkpoint records no dataset the reader knows."""
    held = heldout_samples(ckpt, limit, data_dir)
    if held is None:
        return None
    return [str(s.path) for s in held.chosen], [held.to_ckpt[s.target] for s in held.chosen]


def skipped_entry(device: str, reason: str) -> dict:
    """An entry that measured nothing, and why (``skipped``): it passes the gate, and the worker
    warns about it."""
    return {"device": device, "n_images": 0, "top1_agreement": None, "skipped": reason}


def _probe_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    return buf.getvalue()


def _decoder_problem(device: str) -> str | None:
    """Why the worker's batched JPEG decoder cannot run on ``device`` here, or None (imported
    here, as in :func:`measure_gpu_decode`, which says why)."""
    from worker.gpu_preprocess import decode_jpegs
    from worker.prepare import GpuJpeg

    try:
        decode_jpegs([GpuJpeg(_probe_jpeg())], device)
    except Exception as exc:  # ImportError (torchvision without decode_jpeg), no nvJPEG, ...
        return f"torchvision.io.decode_jpeg cannot decode on {device} here: {first_line(exc)}"
    return None


def _grey_levels(spec: PreprocessSpec) -> np.ndarray:
    """Per-channel factor from a normalised difference back to 0..255 grey levels."""
    return (255.0 * np.asarray(spec.std, dtype=np.float64)).reshape(1, 3, 1, 1)


def measure_gpu_decode(
    files: Sequence[str | Path],
    labels: Sequence[int],
    spec: PreprocessSpec,
    infer: Callable[[np.ndarray], np.ndarray],
    batch: int,
    device: str | None = None,
    cpu_path: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """The ``decode.gpu_decode`` entry of parity.json for ``files`` (never raises for an image).

    ``infer``: the FP32 reference model, numpy in and out. ``cpu_path``: the CPU path's pixels
    of ``files`` and ``infer``'s logits on them (row for row), when already computed; the logits
    are reused where the pixels are exactly those the worker's CPU decoder gives, else computed
    here. When the decoder cannot run on ``device`` (a CUDA build whose torchvision has no
    nvJPEG, say) it measures on the CPU instead and records why under ``fallback``; an entry
    with ``skipped`` (and no agreement) only when it cannot run on the CPU either.
    """
    # worker.* is imported here, not at the top: the worker imports engine_build (the manifest,
    # the runtimes), so engine_build importing the worker package at module import time would
    # make the two import each other (a cycle as soon as anything on worker.gpu_preprocess's
    # import path reaches engine_build), and would load torchvision and the worker's decode
    # stack into every engine_build import for a step only the build itself runs
    from worker.decoding import decode_image
    from worker.gpu_preprocess import decode_bisecting, decode_jpegs, preprocess_rows
    from worker.prepare import GpuJpeg, gpu_jpeg_of

    device = device or build_device()
    fallback: dict[str, str] = {}
    if (problem := _decoder_problem(device)) is not None:
        if device == "cpu" or _decoder_problem("cpu") is not None:
            log.warning("GPU-decode parity not measured: %s", problem)
            return skipped_entry(device, problem)
        log.warning("GPU-decode parity: %s; measuring with the CPU JPEG decoder instead", problem)
        fallback = {"fallback": f"measured on cpu, not {device}: {problem}"}
        device = "cpu"

    # what the worker's decode threads do with each post's bytes (worker.prepare.gpu_jpeg_of)
    jpegs: dict[int, GpuJpeg] = {}
    cpu_rows: dict[int, np.ndarray] = {}
    n_cpu_path = n_unreadable = 0
    for row, file in enumerate(files):
        try:
            data = Path(file).read_bytes()
            if (jpeg := gpu_jpeg_of(data, spec)) is None:
                n_cpu_path += 1  # decoded on the CPU by a GPU worker too
                continue
            jpegs[row] = jpeg
            cpu_rows[row] = preprocess_image(decode_image(data, draft_size=spec.resize), spec)
        except Exception as exc:  # a dead letter on either path (PostError), no file (OSError)
            log.warning("GPU-decode parity: skipping %s: %s", file, exc)
            jpegs.pop(row, None)
            n_unreadable += 1

    # what the worker's inference thread does with a batch's JPEGs (StreamWorker._device_rows)
    gpu_rows: dict[int, np.ndarray] = {}
    rows = sorted(jpegs)
    for start in range(0, len(rows), DECODE_CHUNK):
        chunk = {r: jpegs[r] for r in rows[start : start + DECODE_CHUNK]}
        images, refused = decode_bisecting(lambda js: decode_jpegs(js, device), chunk)
        n_cpu_path += len(refused)  # the worker decodes those on the CPU
        for r in refused:
            cpu_rows.pop(r)
        out, failed = preprocess_rows(images, spec, {r: jpegs[r].orientation for r in images})
        for r in failed:  # the worker decodes those on the CPU
            cpu_rows.pop(r)
        n_cpu_path += len(failed)
        if out:
            done = sorted(out)
            pixels = torch.stack([out[r] for r in done]).cpu().numpy()
            gpu_rows.update(zip(done, pixels, strict=True))

    measured = sorted(gpu_rows)
    counts = {
        "n_parity_images": len(files),
        "n_cpu_path": n_cpu_path,
        "n_unreadable": n_unreadable,
        **fallback,
    }
    if not measured:
        note = "no baseline JPEG among the parity images: the GPU-decode path was not exercised"
        log.warning("GPU-decode parity not measured: %s", note)
        return {"device": device, "n_images": 0, "top1_agreement": None, **counts, "note": note}
    cpu_px = np.stack([cpu_rows[r] for r in measured])
    gpu_px = np.stack([gpu_rows[r] for r in measured])
    if cpu_path is not None and np.array_equal(cpu_path[0][measured], cpu_px):
        reference = np.asarray(cpu_path[1])[measured]  # the parity set's own rows: no rerun
    else:
        reference = run_batched(infer, cpu_px, batch)
    logits = run_batched(infer, gpu_px, batch)
    report = parity_report(reference, logits, np.asarray(labels, dtype=np.int64)[measured])
    finite = finite_rows(logits)
    same = (reference.argmax(1) == logits.argmax(1)) & finite
    tie_flips = ~same & near_ties(reference, logits) & finite  # recorded, not gated
    with np.errstate(invalid="ignore"):
        grey = np.abs(cpu_px.astype(np.float64) - gpu_px.astype(np.float64)) * _grey_levels(spec)
    grey_finite = bool(np.isfinite(grey).all())  # NaN is no JSON
    entry = {
        "device": device,
        "n_images": report["n_images"],
        "n_labelled": report["n_labelled"],
        "top1_agreement": report["top1_agreement"],
        "top1_agreement_excluding_near_ties": float((same | tie_flips).mean()),
        "near_tie_flips": int(tie_flips.sum()),
        "accuracy_cost": report["accuracy_cost"],
        "top1_accuracy_cpu_decode": report["top1_accuracy_pytorch"],
        "top1_accuracy_gpu_decode": report["top1_accuracy_artifact"],
        "max_abs_pixel_diff": round(float(grey.max()), 3) if grey_finite else None,
        "mean_abs_pixel_diff": round(float(grey.mean()), 4) if grey_finite else None,
        "max_abs_logit_diff": report["max_abs_logit_diff"],
        "mean_abs_logit_diff": report["mean_abs_logit_diff"],
        "non_finite_logits": report["non_finite_logits"],
        **counts,
    }
    if device == "cpu":
        entry["note"] = CPU_MEASURED_NOTE
    return entry


def gated_agreement(entry: dict) -> float | None:
    """The agreement the gate compares with its threshold: near-tie flips not counted (the raw
    ``top1_agreement`` for an entry recorded before they were told apart)."""
    agreement = entry.get("top1_agreement_excluding_near_ties")
    return entry.get("top1_agreement") if agreement is None else agreement


def gate_gpu_decode(
    entry: dict, threshold: float, applied: bool = True, why: str | None = None
) -> list[str]:
    """Record the gate's verdict in ``entry``; return why it failed (empty when it passed).

    A measured entry passes when its top-1 agreement, near-tie flips not counted, reaches
    ``threshold`` and every logit is finite; an entry that measured nothing (no baseline JPEG,
    no decoder) passes, saying so. ``applied``: whether the verdict may fail the build
    (:func:`gate_applies`, ``why`` its reason); the caller acts on it, the entry records it.
    """
    failures: list[str] = []
    n, raw = entry.get("n_images", 0), entry.get("top1_agreement")
    agreement = gated_agreement(entry)
    if agreement is not None:
        if entry.get("non_finite_logits"):
            failures.append(
                f"{entry['non_finite_logits']} non-finite logits (NaN/inf) on {n} images"
            )
        if not agreement_passes(agreement, n, threshold):
            ties = ""
            if "near_tie_flips" in entry:
                ties = (
                    f"near-tie flips not counted: {entry['near_tie_flips']}, {raw:.4f} "
                    "counting them; "
                )
            failures.append(
                f"top-1 agreement {agreement:.4f} < {threshold} on {n} baseline JPEGs "
                f"(at most {allowed_flips(threshold, n)} may flip; {ties}max |pixel diff| "
                f"{entry.get('max_abs_pixel_diff')} grey levels, "
                f"measured on {entry.get('device')})"
            )
    entry["gate"] = {
        "min_top1_agreement": threshold,
        "allowed_flips": allowed_flips(threshold, n),
        "passed": not failures,
        "measured": agreement is not None,
        "applied": applied,
        **({"why": why} if why else {}),
        "failures": failures,
    }
    if agreement is not None:
        log.info(
            "parity gpu_decode (%s): agreement %.4f (%.4f counting %d near-tie flips; "
            "gate %.4f%s), max|dpixel| %s, max|dlogit| %s, n=%d, %d on the CPU path%s",
            entry.get("device"),
            agreement,
            raw,
            entry.get("near_tie_flips", 0),
            threshold,
            "" if applied else ", not applied",
            entry.get("max_abs_pixel_diff"),
            entry.get("max_abs_logit_diff"),
            n,
            entry.get("n_cpu_path", 0),
            f"; FAILED: {'; '.join(failures)}" if failures else "",
        )
    return failures


def gpu_decode_entry(
    parity_set: ParitySet,
    reference: np.ndarray,
    ckpt: dict,
    spec: PreprocessSpec,
    infer: Callable[[np.ndarray], np.ndarray],
    batch: int,
    limit: int,
    data_dir: Path | None = None,
    device: str | None = None,
) -> dict:
    """The ``decode.gpu_decode`` entry for the build's parity images: the parity set's own files
    (reusing ``reference``, its FP32 logits: ``--parity-data``, or a ``--crop full`` held-out
    split), else the held-out split's files listed again (``--crop bbox``: its parity pixels are
    box crops, so the whole photos are decoded again and both paths run the FP32 model)."""
    device = device or build_device()
    if parity_set.files:
        return measure_gpu_decode(
            parity_set.files,
            parity_set.labels,
            spec,
            infer,
            batch,
            device,
            cpu_path=(parity_set.images, reference),
        )
    try:
        listed = heldout_files(ckpt, limit, data_dir)
    except ParityDataError as exc:  # the parity set read it a moment ago: not expected
        return skipped_entry(device, f"held-out split unreadable: {exc}")
    if listed is None:
        return skipped_entry(device, "the parity images are not files")
    return measure_gpu_decode(listed[0], listed[1], spec, infer, batch, device)
