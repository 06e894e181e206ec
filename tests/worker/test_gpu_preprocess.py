"""The GPU-decode path (worker.gpu_preprocess and the worker's use of it), run on the CPU.

Everything in worker.gpu_preprocess is device-agnostic torch, so its arithmetic, EXIF handling
and the worker's fallbacks are checked here against the CPU path; the last test repeats the
decode on CUDA where a GPU is present.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from engine_build.bundle import load_bundle
from engine_build.runtime import create_engine
from tests.support import image_bytes
from training.preprocessing import PreprocessSpec, preprocess_image
from worker import gpu_preprocess
from worker.decoding import decode_image, jpeg_frame
from worker.gpu_preprocess import (
    decode_bisecting,
    decode_jpegs,
    draft_factor,
    exif_orient,
    has_end_of_image,
    preprocess_batch,
    preprocess_rows,
    resize_crop,
)
from worker.metrics import WorkerMetrics
from worker.pipeline import StreamWorker
from worker.prepare import GpuJpeg, prepare
from worker.settings import WorkerSettings
from worker.url_fetch import UrlPolicy

ORIENTATION = 0x0112


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric photo-like RGB array (resampling differences stay small on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 17 + y / 23)], axis=-1)
    img[: h // 3, : w // 4] = rng.uniform(0, 255, size=3)  # a corner block: orientation shows
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(
    arr: np.ndarray, fmt: str = "JPEG", orientation: int | None = None, cmyk: bool = False, **kw
) -> bytes:
    img = Image.fromarray(arr).convert("CMYK") if cmyk else Image.fromarray(arr)
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orient_matches_pillow_exif_transpose(orientation):
    arr = photo(40, 24)
    reference = np.asarray(
        ImageOps.exif_transpose(Image.open(io.BytesIO(encode(arr, "PNG", orientation))))
    )
    got = exif_orient(chw(arr), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, reference)


def test_batched_decode_matches_the_cpu_decoder_as_stored():
    """decode_jpegs gives the stored picture; its EXIF orientation is applied after the draft
    reduction (resize_crop), as the CPU path turns its drafted image."""
    arrays = [photo(160, 120, 1), photo(90, 130, 2)]
    jpegs = [GpuJpeg(encode(arrays[0]), 1), GpuJpeg(encode(arrays[1], orientation=6), 6)]
    decoded = decode_jpegs(jpegs, "cpu")
    for jpeg, img in zip(jpegs, decoded, strict=True):
        stored = Image.open(io.BytesIO(jpeg.data))
        expected = np.asarray(stored.convert("RGB"))  # Pillow, full size, not turned
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        assert img.permute(1, 2, 0).shape == expected.shape
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("w", "h"), [(509, 597), (1021, 1199), (2047, 1799)])
def test_exif_orientation_is_applied_after_the_draft_reduction(w, h, orientation):
    """Sides that are no multiple of the draft factor leave partial blocks at the stored right
    and bottom edges; turned before the block average they moved to other edges and shifted
    every block (up to ~70 grey levels), so the GPU path differed from the CPU path's pixels
    for orientations 2-4 and 6-8."""
    spec = PreprocessSpec.for_image_size(64) if w < 1000 else PreprocessSpec()
    assert draft_factor(w, h, spec.resize) > 1
    data = encode(photo(w, h, 3), quality=95, orientation=orientation)
    # the worker's CPU path: Pillow's draft decode, then the EXIF turn, then preprocessing
    expected = preprocess_image(decode_image(data, draft_size=spec.resize), spec)
    got = preprocess_batch(
        decode_jpegs([GpuJpeg(data, orientation)], "cpu"), spec, orientations=[orientation]
    )[0].numpy()
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    assert diff.mean() < 0.008, (orientation, diff.mean())  # turned first: 0.012-0.08


def test_one_bad_jpeg_fails_the_batched_call():
    good = encode(photo(64, 64))
    with pytest.raises(RuntimeError):
        decode_jpegs([GpuJpeg(good), GpuJpeg(good[: len(good) // 2])], "cpu")


@pytest.mark.parametrize(
    ("size", "spec"),
    [
        ((640, 480), PreprocessSpec()),  # landscape, the default 256/224
        ((300, 500), PreprocessSpec()),  # portrait
        ((100, 80), PreprocessSpec()),  # upscaled
        ((50, 40), PreprocessSpec(resize=48, crop=64)),  # smaller than the crop: black padding
        ((333, 250), PreprocessSpec.for_image_size(64, interpolation="bicubic")),
        ((333, 250), PreprocessSpec.for_image_size(64, interpolation="nearest")),
        # positions near ties: torch's nearest-exact picked the neighbour of Pillow's pixel
        ((300, 260), PreprocessSpec(resize=256, crop=224, interpolation="nearest")),
        ((1000, 37), PreprocessSpec(resize=64, crop=64, interpolation="nearest")),
    ],
)
def test_device_preprocessing_matches_preprocess_image(size, spec):
    arr = photo(*size)
    expected = preprocess_image(Image.fromarray(arr), spec)
    got = preprocess_batch([chw(arr)], spec, draft=False)[0].numpy()
    assert got.shape == expected.shape == (3, spec.crop, spec.crop)
    diff = np.abs(got - expected)
    # torch's antialiased kernels and Pillow's differ by a grey level here and there
    assert diff.mean() < 0.01, diff.mean()
    # nearest picks the very pixels Pillow picks
    assert diff.max() < (0.1 if spec.interpolation != "nearest" else 1e-5), diff.max()


def test_truncated_jpegs_fail_the_batched_call_even_where_the_decoder_takes_them(monkeypatch):
    # nvJPEG is not known to refuse a truncated scan as libjpeg does: the missing EOI is checked
    # before decoding, so the worker's fallback hands the image to Pillow, which names it
    from torchvision import io as tvio

    monkeypatch.setattr(tvio, "decode_jpeg", lambda raw, **kw: [torch.zeros(3, 8, 8)] * len(raw))
    good = encode(photo(64, 64))
    assert len(decode_jpegs([GpuJpeg(good)], "cpu")) == 1
    with pytest.raises(RuntimeError, match="JPEG 1 of the batch ends before its EOI"):
        decode_jpegs([GpuJpeg(good), GpuJpeg(good[:-2])], "cpu")


def test_end_of_image_is_looked_for_after_the_scan_starts():
    good = encode(photo(64, 48))
    assert has_end_of_image(good)
    assert has_end_of_image(good + b"trailing data: a motion photo's video")
    assert not has_end_of_image(good[: len(good) // 2])
    assert not has_end_of_image(good[:-2])
    assert not has_end_of_image(b"not a jpeg")
    # an EOI inside a header segment (an EXIF thumbnail, a comment) is not the image's own
    commented = encode(photo(64, 48), comment=b"thumb \xff\xd8...\xff\xd9")
    assert b"\xff\xd9" in commented[: commented.index(b"\xff\xda")]
    assert has_end_of_image(commented)
    assert not has_end_of_image(commented[:-2])


@pytest.mark.parametrize(
    ("w", "h"),
    [(640, 480), (1100, 1500), (2400, 1800), (4100, 2100), (200, 150), (300, 200), (256, 255)],
)
def test_jpegs_are_reduced_as_the_cpu_paths_draft_decode_reduces_them(w, h):
    """Large ones at Pillow's draft scale; one with a side below ``resize`` (a thumbnail) at
    full scale, as Pillow leaves it (it once failed its whole batch on the GPU path)."""
    spec = PreprocessSpec()
    data = encode(photo(w, h, 1), quality=90)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (spec.resize, spec.resize))
    k = draft_factor(w, h, spec.resize)
    assert drafted.size == (-(-w // k), -(-h // k))  # Pillow's draft size: ceil(side / k)
    expected = _prepare(data, gpu=False).array  # the worker's CPU path, draft decode included
    got = preprocess_batch(decode_jpegs([GpuJpeg(data)], "cpu"), spec)[0].numpy()
    diff = np.abs(got - expected)
    assert diff.mean() < 0.01, diff.mean()
    assert diff.max() < 0.25, diff.max()


def test_resize_scale_stays_within_what_the_cuda_antialias_kernel_takes(monkeypatch):
    # upsample_bilinear2d_aa / bicubic on CUDA raise "Too much shared memory required" once the
    # scale factor nears 94 (bilinear) or 47 (bicubic) with 48 KiB of shared memory per block;
    # a 64 MP photo to a small resize needs ~110 without the draft reduction
    seen = []
    interpolate = gpu_preprocess.F.interpolate

    def recording(x, size, **kw):
        seen.append(max(x.shape[2] / size[0], x.shape[3] / size[1]))
        return interpolate(x, size=size, **kw)

    monkeypatch.setattr(gpu_preprocess.F, "interpolate", recording)
    spec = PreprocessSpec.for_image_size(16, interpolation="bicubic")  # resize 18
    out = resize_crop(torch.zeros(3, 2000, 2000, dtype=torch.uint8), spec)
    assert out.shape == (3, 16, 16)
    assert seen and max(seen) < 2000 / 18 / 4, seen  # 111 without the reduction; 13.9 with it


# --- prepare(gpu_jpeg=True): what is left for the GPU and what is decoded here ------------------


def _event(data: bytes) -> bytes:
    import base64
    import json

    return json.dumps(
        {
            "post_id": "p1",
            "posted_at": "2026-11-25T10:00:00Z",
            "image_b64": base64.b64encode(data).decode(),
        }
    ).encode()


def _prepare(data: bytes, gpu: bool = True):
    return prepare(_event(data), PreprocessSpec(), UrlPolicy(), 10**8, gpu_jpeg=gpu)


def test_baseline_jpegs_are_left_for_the_gpu_with_their_orientation():
    p = _prepare(encode(photo(300, 200), orientation=8))
    assert p.error is None and p.array is None
    assert p.jpeg is not None and p.jpeg.orientation == 8


@pytest.mark.parametrize(
    "data",
    [
        encode(photo(300, 200), progressive=True),
        encode(photo(300, 200), "PNG"),
        encode(photo(300, 200), "WEBP"),
        encode(photo(300, 200), cmyk=True),
    ],
    ids=["progressive-jpeg", "png", "webp", "cmyk-jpeg"],
)
def test_other_images_are_decoded_on_the_cpu(data):
    p = _prepare(data)
    assert p.error is None and p.jpeg is None
    assert p.array.shape == (3, 224, 224)


@pytest.mark.parametrize(
    ("size", "subsampling", "on_gpu"),
    [
        ((600, 560), "4:4:4", True),
        ((600, 560), "4:2:0", True),
        ((600, 560), "4:2:2", False),  # drafted at 1/2: libjpeg keeps less chroma than an average
        ((300, 280), "4:2:2", True),  # full scale: no draft, the GPU decode is exact
    ],
)
def test_chroma_subsampling_the_block_average_cannot_stand_for_goes_to_the_cpu(
    size, subsampling, on_gpu
):
    data = encode(photo(*size), subsampling=subsampling)
    p = _prepare(data)
    assert p.error is None and (p.jpeg is not None) == on_gpu


def test_an_arithmetic_coded_jpeg_is_left_to_the_cpu_decoder():
    """Pillow's header reader takes an SOF9 frame as it takes a baseline one; the GPU gets only
    Huffman-coded sequential frames (SOF0, SOF1)."""
    baseline = encode(photo(300, 200))
    assert jpeg_frame(baseline) == 0xC0
    arithmetic = baseline.replace(b"\xff\xc0\x00\x11", b"\xff\xc9\x00\x11", 1)
    assert jpeg_frame(arithmetic) == 0xC9
    assert _prepare(baseline).jpeg is not None
    p = _prepare(arithmetic)
    assert p.jpeg is None  # decoded (or dead-lettered) on the CPU, never in a GPU batch
    assert jpeg_frame(encode(photo(300, 200), progressive=True)) == 0xC2


def test_an_rgb_coded_jpeg_is_left_to_the_cpu_decoder():
    """An Adobe APP14 marker with transform 0 says the three components are RGB, not YCbCr."""
    data = encode(photo(300, 200))
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # transform 0
    assert _prepare(data).jpeg is not None
    assert _prepare(data[:2] + app14 + data[2:]).jpeg is None


def test_bad_images_fail_in_the_decode_thread_as_before():
    huge = encode(photo(64, 64))  # a header that claims 65535 x 65535 pixels
    huge = huge.replace(
        b"\xff\xc0\x00\x11\x08\x00\x40\x00\x40", b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff"
    )
    truncated = encode(photo(400, 300, 4))
    truncated = truncated[: len(truncated) // 2]  # a readable header, half the scan data
    cases = [(b"not an image", "not_an_image"), (b"\xff\xd8\xff", "not_an_image")]
    cases.append((huge, "decompression_bomb"))
    # no end-of-image marker: named in the decode thread, never left to fail a GPU batch
    cases.append((truncated, "truncated_image"))
    for data, kind in cases:
        gpu, cpu = _prepare(data), _prepare(data, gpu=False)
        assert gpu.error is not None and gpu.error.kind == cpu.error.kind == kind


# --- the worker's GPU path, on a device engine whose device is the CPU --------------------------


class CpuDeviceEngine:
    """The real ONNX Runtime engine behind the ``device``/``infer_device`` face of the CUDA
    engines, with the CPU as the device: drives the worker's GPU-decode path here."""

    def __init__(self, engine):
        self._engine = engine
        self.name, self.max_batch, self.device = "cpu-device", engine.max_batch, torch.device("cpu")
        self.calls: list[int] = []

    def infer(self, batch):
        return self._engine.infer(batch)

    def infer_device(self, batch: torch.Tensor):
        assert batch.device == self.device and batch.dtype == torch.float32
        self.calls.append(batch.shape[0])
        return self._engine.infer(batch.numpy())

    def input_spec(self):
        return self._engine.input_spec()

    def close(self):
        self._engine.close()


def test_worker_gpu_path_classifies_like_the_cpu_path_and_dead_letters_what_nvjpeg_and_pil_refuse(
    worker_bundle_dir,
):
    bundle = load_bundle(worker_bundle_dir)
    engine = CpuDeviceEngine(create_engine(bundle, "onnxruntime", threads=1))
    rng = np.random.default_rng(5)
    good_jpeg = encode(photo(96, 64, 3), orientation=6)
    truncated = encode(photo(400, 300, 4))
    truncated = truncated[: len(truncated) // 2]  # a readable header, half the scan data
    datas = [good_jpeg, image_bytes(rng, "PNG"), truncated, encode(photo(50, 70, 6))]

    def worker(gpu: bool) -> StreamWorker:
        settings = WorkerSettings(bundle=str(worker_bundle_dir), gpu_decode=gpu, max_batch=8)
        return StreamWorker(
            settings,
            [engine],
            bundle.manifest,
            None,
            None,
            None,
            WorkerMetrics(),
            threading.Event(),
        )

    gpu_worker, cpu_worker = worker(True), worker(False)
    assert gpu_worker.gpu_device == torch.device("cpu") and cpu_worker.gpu_device is None
    results = {}
    for name, w in (("gpu", gpu_worker), ("cpu", cpu_worker)):
        prepared = [w._prepare(_event(d)) for d in datas]
        if name == "gpu":
            # the PNG is decoded on the CPU, the truncated JPEG refused there (no end of image)
            assert [p.jpeg is not None for p in prepared] == [True, False, False, True]
        logits = w._infer(prepared)
        results[name] = (logits, [p.error.kind if p.error else None for p in prepared])
        w.pool.shutdown()
    (gpu_logits, gpu_errors), (cpu_logits, cpu_errors) = results["gpu"], results["cpu"]
    assert gpu_errors == cpu_errors == [None, None, "truncated_image", None]
    assert sorted(gpu_logits) == sorted(cpu_logits) == [0, 1, 3]
    assert engine.calls == [3]  # one engine call for the batch, on the device
    for i in (0, 1, 3):
        assert np.argmax(gpu_logits[i]) == np.argmax(cpu_logits[i])
        np.testing.assert_allclose(gpu_logits[i], cpu_logits[i], atol=0.5, rtol=0.05)


def test_a_gpu_preprocessing_failure_costs_only_that_image_its_gpu_path(
    worker_bundle_dir, monkeypatch
):
    """A resize or normalise that fails on the device (out of memory, a scale the CUDA kernel
    refuses) sends the images it fails on to the CPU decoder instead of failing the batch."""

    bundle = load_bundle(worker_bundle_dir)
    engine = CpuDeviceEngine(create_engine(bundle, "onnxruntime", threads=1))
    datas = [encode(photo(96, 64, 3)), encode(photo(50, 70, 6)), encode(photo(80, 80, 1))]
    settings = WorkerSettings(bundle=str(worker_bundle_dir), gpu_decode=True, max_batch=8)
    w = StreamWorker(
        settings, [engine], bundle.manifest, None, None, None, WorkerMetrics(), threading.Event()
    )
    real = gpu_preprocess.resize_crop
    refused: list[tuple[int, ...]] = []

    def resize_refusing_50_wide(image, spec, *args, **kwargs):
        if image.shape[-1] == 50:  # the 50x70 photo
            refused.append(tuple(image.shape))
            raise RuntimeError("Too much shared memory required")
        return real(image, spec, *args, **kwargs)

    monkeypatch.setattr(gpu_preprocess, "resize_crop", resize_refusing_50_wide)
    prepared = [w._prepare(_event(d)) for d in datas]
    assert all(p.jpeg is not None for p in prepared)
    logits = w._infer(prepared)
    w.pool.shutdown()
    assert len(refused) == 2  # in the batch, then alone
    assert sorted(logits) == [0, 1, 2] and all(p.error is None for p in prepared)
    assert prepared[1].jpeg is None and prepared[1].array is not None  # decoded on the CPU
    assert engine.calls == [3]
    cpu = StreamWorker(
        WorkerSettings(bundle=str(worker_bundle_dir), max_batch=8),
        [engine], bundle.manifest, None, None, None, WorkerMetrics(), threading.Event(),
    )  # fmt: skip
    cpu_logits = cpu._infer([cpu._prepare(_event(d)) for d in datas])
    cpu.pool.shutdown()
    for i in range(3):
        assert np.argmax(logits[i]) == np.argmax(cpu_logits[i])


def test_preprocess_rows_leaves_out_only_the_images_that_fail_alone(monkeypatch, caplog):
    """The worker's and engine_build's GPU preprocessing: a batch that fails is redone one image
    at a time, and only an image that fails alone is handed back (to the CPU decoder)."""
    caplog.set_level(logging.INFO, logger="worker.gpu_preprocess")
    spec = PreprocessSpec.for_image_size(32)
    images = {5: chw(photo(40, 48)), 2: chw(photo(50, 36)), 9: chw(photo(64, 64))}
    whole, failed = preprocess_rows(images, spec)
    assert failed == [] and sorted(whole) == [2, 5, 9]
    real = gpu_preprocess.resize_crop

    def refusing_50_wide(image, spec, *args, **kwargs):
        if image.shape[-1] == 50:
            raise RuntimeError("Too much shared memory required")
        return real(image, spec, *args, **kwargs)

    monkeypatch.setattr(gpu_preprocess, "resize_crop", refusing_50_wide)
    rows, failed = preprocess_rows(images, spec)
    assert failed == [2] and sorted(rows) == [5, 9]
    for k in (5, 9):  # alone or in a batch, the same pixels
        np.testing.assert_allclose(rows[k].numpy(), whole[k].numpy(), atol=1e-6)
    assert any("one image at a time" in r.getMessage() for r in caplog.records)
    assert preprocess_rows({}, spec) == ({}, [])


@pytest.mark.parametrize(
    ("n", "bad", "max_calls"),
    [(32, {7}, 11), (32, {0, 31}, 21), (5, set(), 1), (1, {0}, 1), (6, set(range(6)), 11)],
)
def test_a_failed_batched_decode_is_halved_until_only_the_bad_images_are_left(
    n, bad, max_calls, caplog
):
    caplog.set_level(logging.INFO, logger="worker.gpu_preprocess")
    calls: list[list[str]] = []

    def decode(items: list[str]) -> list[str]:  # fails as torchvision does: nothing returned
        calls.append(items)
        if any(item.startswith("bad") for item in items):
            raise RuntimeError("nvjpeg decode failed")
        return [item.upper() for item in items]

    items = {10 * k: ("bad" if k in bad else "ok") + str(k) for k in range(n)}
    decoded, refused = decode_bisecting(decode, items)
    assert refused == sorted(10 * k for k in bad)
    assert decoded == {key: item.upper() for key, item in items.items() if key not in refused}
    assert len(calls) <= max_calls  # one by one would be n + 1
    # no image is decoded twice: a call either failed or decoded images no other call had
    succeeded = [
        item for call in calls if not any(i.startswith("bad") for i in call) for item in call
    ]
    assert len(succeeded) == len(set(succeeded)) == n - len(bad)
    logged = [r.getMessage() for r in caplog.records if r.name == "worker.gpu_preprocess"]
    assert len(logged) == (1 if bad else 0)  # one line per batch, not one per call
    if bad:
        assert f"{len(calls)} calls" in logged[0] and f"{len(bad)} image(s)" in logged[0]


def test_an_image_only_the_batched_gpu_decode_refuses_is_decoded_on_the_cpu(
    worker_bundle_dir, monkeypatch
):
    """nvJPEG refusing a JPEG that libjpeg takes (a sampling it lacks) costs that post nothing."""
    import worker.pipeline

    bundle = load_bundle(worker_bundle_dir)
    engine = CpuDeviceEngine(create_engine(bundle, "onnxruntime", threads=1))
    datas = [encode(photo(96, 64, k)) for k in range(16)]
    odd = datas[3]
    settings = WorkerSettings(bundle=str(worker_bundle_dir), gpu_decode=True, max_batch=16)
    w = StreamWorker(
        settings, [engine], bundle.manifest, None, None, None, WorkerMetrics(), threading.Event()
    )
    real = worker.pipeline.decode_jpegs
    sizes: list[int] = []

    def nvjpeg_refusing_one(jpegs, device):
        sizes.append(len(jpegs))
        if any(j.data == odd for j in jpegs):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return real(jpegs, device)

    monkeypatch.setattr(worker.pipeline, "decode_jpegs", nvjpeg_refusing_one)
    prepared = [w._prepare(_event(d)) for d in datas]
    logits = w._infer(prepared)
    w.pool.shutdown()
    assert sizes[0] == 16 and 1 in sizes and len(sizes) <= 9  # one by one: 17 calls
    assert sorted(logits) == list(range(16)) and all(p.error is None for p in prepared)
    assert prepared[3].jpeg is None and prepared[3].array is not None  # decoded on the CPU
    assert [p.jpeg is None for p in prepared].count(True) == 1
    assert engine.calls == [16]


@pytest.mark.gpu
def test_nvjpeg_decode_matches_the_cpu_decode():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: nvJPEG decoding is checked on GPU machines only")
    jpegs = [GpuJpeg(encode(photo(1080, 1080, i)), 1 + i % 8) for i in range(8)]
    on_gpu = decode_jpegs(jpegs, "cuda")
    on_cpu = decode_jpegs(jpegs, "cpu")
    for g, c in zip(on_gpu, on_cpu, strict=True):
        assert g.is_cuda and g.shape == c.shape
        assert (g.cpu().int() - c.int()).abs().float().mean() < 1.5
    spec = PreprocessSpec()
    gpu_batch = preprocess_batch(on_gpu, spec).cpu()
    cpu_batch = preprocess_batch(on_cpu, spec)
    assert (gpu_batch - cpu_batch).abs().mean() < 0.02


@pytest.mark.gpu
def test_worker_gpu_path_on_cuda_runs_each_inference_thread_on_its_own_stream(worker_bundle_dir):
    """Two torch-cuda instances, GPU decoding: each inference thread decodes and preprocesses on
    a stream of its own (not the default stream) and classifies as the CPU path does."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the worker's CUDA streams are checked on GPU machines only")
    from concurrent.futures import ThreadPoolExecutor

    bundle = load_bundle(worker_bundle_dir)
    engines = [create_engine(bundle, "torch-cuda") for _ in range(2)]
    settings = WorkerSettings(bundle=str(worker_bundle_dir), gpu_decode=True, max_batch=8)
    w = StreamWorker(
        settings, engines, bundle.manifest, None, None, None, WorkerMetrics(), threading.Event()
    )
    assert w.gpu_device.type == "cuda"
    datas = [encode(photo(640 + 8 * k, 480, k), orientation=1 + k % 8) for k in range(8)]
    datas.append(image_bytes(np.random.default_rng(2), "PNG"))  # decoded on the CPU, uploaded
    cpu = StreamWorker(
        WorkerSettings(bundle=str(worker_bundle_dir), max_batch=8),
        [create_engine(bundle, "onnxruntime", threads=1)],
        bundle.manifest, None, None, None, WorkerMetrics(), threading.Event(),
    )  # fmt: skip
    expected = cpu._infer([cpu._prepare(_event(d)) for d in datas])
    cpu.pool.shutdown()
    streams = []
    lanes = iter(engines)
    both = threading.Barrier(2)  # two threads, one instance each, as the worker runs them

    def lane(_):
        both.wait(timeout=60)
        w._lane.engine = next(lanes)
        out = [w._infer([w._prepare(_event(d)) for d in datas]) for _ in range(4)]
        streams.append(w._preprocess_stream())
        return out

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lane, range(2)))
    w.pool.shutdown()
    default = torch.cuda.default_stream(w.gpu_device)
    assert len({s.cuda_stream for s in streams}) == 2 and default not in streams
    first = outs[0][0]
    for runs in outs:
        for logits in runs:  # a stream race (a batch read before it was made) shows up here
            assert sorted(logits) == sorted(expected)
            for i in first:
                np.testing.assert_allclose(logits[i], first[i], atol=1e-2, rtol=1e-2)
    # FP16 on nvJPEG's pixels against FP32 on Pillow's: nearly always the same class
    agree = np.mean([np.argmax(first[i]) == np.argmax(expected[i]) for i in expected])
    assert agree >= 0.75


def test_a_cpu_decode_after_nvjpeg_refused_runs_under_the_decode_deadline(
    worker_bundle_dir, monkeypatch
):
    # the JPEGs the GPU decoder refuses go to the CPU decoder; one that hangs there must cost
    # its post (decode_timeout), not the batch and the partition
    import worker.pipeline

    bundle = load_bundle(worker_bundle_dir)
    engine = CpuDeviceEngine(create_engine(bundle, "onnxruntime", threads=1))
    datas = [encode(photo(96, 64, 3)), encode(photo(50, 70, 6))]
    settings = WorkerSettings(
        bundle=str(worker_bundle_dir),
        gpu_decode=True,
        max_batch=8,
        url_fetch_enabled=False,
        decode_timeout_s=0.3,
    )
    w = StreamWorker(
        settings, [engine], bundle.manifest, None, None, None, WorkerMetrics(), threading.Event()
    )
    release = threading.Event()
    real_decode = worker.pipeline.decode_on_cpu

    def hangs_on_the_narrow_one(prep, spec, **kwargs):
        if prep.jpeg is not None and prep.jpeg.data == datas[1]:
            release.wait(30)
        return real_decode(prep, spec, **kwargs)

    monkeypatch.setattr(worker.pipeline, "decode_on_cpu", hangs_on_the_narrow_one)
    monkeypatch.setattr(
        worker.pipeline, "decode_bisecting", lambda decode, jpegs: ({}, sorted(jpegs))
    )  # nvJPEG refuses both: both go to the CPU decoder
    prepared = [w._prepare(_event(d)) for d in datas]
    logits = w._infer(prepared)
    release.set()
    w.pool.shutdown()
    assert sorted(logits) == [0]
    assert prepared[0].error is None and prepared[0].array is not None
    assert prepared[1].error is not None and prepared[1].error.kind == "decode_timeout"
