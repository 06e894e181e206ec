"""Training's loader and the worker's decoder see the same picture (DESIGN: evaluation is exactly
what the worker does): EXIF orientation, transparency, 16-bit grey, and the bbox crop order."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine_build.parity import load_images
from training.datasets.base import Sample
from training.datasets.image_dataset import bbox_crop_box, load_image
from training.preprocessing import PreprocessSpec, preprocess_image
from worker.decoding import decode_image


def _stripes(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue, top rows green: every orientation looks different."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (220, 20, 20)
    arr[:, w // 2 :] = (20, 20, 220)
    arr[: h // 4] = (20, 220, 20)
    return Image.fromarray(arr)


def _jpeg_rotated(path: Path, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    _stripes().save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path.read_bytes()


def _transparent_png(path: Path) -> bytes:
    rgba = Image.new("RGBA", (12, 8), (0, 0, 0, 0))  # transparent pixels that store black
    rgba.paste((200, 30, 30, 255), (0, 0, 6, 8))
    rgba.save(path, format="PNG")
    return path.read_bytes()


def _grey16_png(path: Path) -> bytes:
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(path, format="PNG")
    return path.read_bytes()


def _assert_same(a: Image.Image, b: Image.Image) -> None:
    assert a.mode == b.mode == "RGB"
    assert a.size == b.size
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("make", [_jpeg_rotated, _transparent_png, _grey16_png])
def test_training_loader_equals_worker_decoder(tmp_path, make):
    path = tmp_path / f"img.{'jpg' if make is _jpeg_rotated else 'png'}"
    data = make(path)
    _assert_same(load_image(Sample(path, 0)), decode_image(data))


def test_exif_6_photo_is_trained_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    _jpeg_rotated(path)
    img = load_image(Sample(path, 0))
    assert img.size == (20, 40)  # stored 40x20, shown rotated 90 degrees clockwise
    top_left = np.asarray(img)[2, 2]  # stored bottom-left (red) is shown top-left
    assert top_left[0] > 150 and top_left[2] < 80


def test_bbox_is_cut_from_stored_pixels_then_turned_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    data = _jpeg_rotated(path)
    bbox = (4, 2, 24, 12)  # stored-pixel coordinates, as CompCars labels them
    x1, y1, x2, y2 = bbox_crop_box(bbox, (40, 20))
    upright = decode_image(data)  # 20x40; stored (x, y) is shown at (h - 1 - y, x)
    expected = upright.crop((20 - y2, x1, 20 - y1, x2))
    _assert_same(load_image(Sample(path, 0, bbox)), expected)


def test_engine_build_parity_images_are_decoded_like_the_worker(tmp_path):
    spec = PreprocessSpec(resize=16, crop=16)
    path = tmp_path / "phone.jpg"
    data = _jpeg_rotated(path)
    parity = load_images([path], [0], spec, str(tmp_path))
    assert np.array_equal(parity.images[0], preprocess_image(decode_image(data), spec))


def test_load_image_outlives_its_file(tmp_path):
    path = tmp_path / "plain.png"
    _stripes().save(path)
    img = load_image(Sample(path, 0))
    assert img.getpixel((1, 19)) == (220, 20, 20)  # usable after the file was closed
    buf = io.BytesIO()
    img.save(buf, format="PNG")


def _photo_jpeg(path: Path, size=(320, 200)) -> bytes:
    """A noisy photo-like JPEG several times the resize: the worker decodes it drafted."""
    rng = np.random.default_rng(3)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1)
    noisy = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def _worker_array(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """What the worker's decode threads hand the engine for a post carrying ``data``."""
    import base64
    import json

    from worker.prepare import prepare
    from worker.url_fetch import UrlPolicy

    raw = json.dumps(
        {
            "post_id": "p",
            "image_b64": base64.b64encode(data).decode(),
            "posted_at": "2026-12-07T00:00:00Z",
        }
    ).encode()
    prep = prepare(raw, spec, UrlPolicy(), 10 * 1024 * 1024)
    assert prep.error is None, prep.error
    return prep.array


def test_evaluation_and_parity_decode_a_large_jpeg_exactly_as_the_worker(tmp_path):
    """The worker decodes a JPEG post at a reduced DCT scale (320x200 -> 80x50 for resize 40);
    training's evaluation and engine_build's parity images must see those pixels, not the full
    decode's (which differ by several grey levels after the resize)."""
    from training.datasets.image_dataset import ImageDataset
    from training.transforms import EvalTransform

    spec = PreprocessSpec(resize=40, crop=32)
    path = tmp_path / "photo.jpg"
    data = _photo_jpeg(path)
    served = _worker_array(data, spec)
    full = preprocess_image(decode_image(data), spec)
    assert not np.array_equal(served, full)  # the draft matters for this image
    evaluated, _ = ImageDataset([Sample(path, 0)], EvalTransform(spec), draft_size=spec.resize)[0]
    assert np.array_equal(np.asarray(evaluated), served)
    parity = load_images([path], [0], spec, str(tmp_path))
    assert np.array_equal(parity.images[0], served)
    boxed = load_image(Sample(path, 0, (0, 0, 319, 199)), draft_size=spec.resize)
    assert boxed.size == (320, 200)  # a boxed sample is cut from the full decode


def test_training_decodes_a_large_jpeg_drafted_and_every_random_crop_stays_full_size(tmp_path):
    # before: training decoded every JPEG whole (an 8000x6000 photo: ~1.6 s a read) to crop a
    # random part of it down to 224 px
    import torch
    from torchvision.transforms import v2 as tv

    from training.transforms import TRAIN_CROP_RATIO, TRAIN_CROP_SCALE, train_draft_size

    spec = PreprocessSpec(resize=256, crop=224)
    draft = train_draft_size(spec)
    assert draft == 438
    path = tmp_path / "big.jpg"
    Image.new("RGB", (3600, 2000), (90, 120, 150)).save(path, format="JPEG", quality=90)
    img = load_image(Sample(path, 0), draft)
    assert img.size == (900, 500)  # 1/4 scale: 1/8 (450x250) would leave crops under 224 px
    torch.manual_seed(0)
    for _ in range(2000):
        _, _, h, w = tv.RandomResizedCrop.get_params(
            torch.empty(3, img.height, img.width), TRAIN_CROP_SCALE, TRAIN_CROP_RATIO
        )
        assert min(h, w) >= spec.crop - 1, (h, w)  # -1: torchvision rounds the crop's sides
    # a boxed sample is decoded whole: its box is in the stored pixels
    x1, y1, x2, y2 = bbox_crop_box((0, 0, 3000, 1800), (3600, 2000))
    assert load_image(Sample(path, 0, (0, 0, 3000, 1800)), draft).size == (x2 - x1, y2 - y1)


def _grey16_ramp() -> np.ndarray:
    """Every 257th 16-bit grey level: 0, 257, ... 65535, which map to 0..255 exactly."""
    return np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", "<u2"), (".tif", "<u2"), (".tif", ">u2")])
def test_16_bit_grey_is_scaled_in_either_byte_order(tmp_path, suffix, dtype):
    """Big-endian 16-bit grey (a TIFF's I;16B) is scaled like the PNG's 16-bit grey: it used to
    fail Pillow's point() ('not supported for this mode') and be skipped; the PNG's pixels, the
    worker's too, are what they were (value // 257)."""
    from training.datasets.base import image_problem

    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(_grey16_ramp().astype(dtype)).save(path)
    assert image_problem(path) is None
    pixels = np.asarray(load_image(Sample(path, 0)))
    assert np.array_equal(pixels, np.repeat((_grey16_ramp() // 257)[..., None], 3, axis=2))
    if suffix == ".png":
        _assert_same(load_image(Sample(path, 0)), decode_image(path.read_bytes()))


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [
        (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F"),  # trained on as black
        (np.full((8, 8), 2**20, dtype=np.int32), "I"),  # 32-bit: trained on as white
        (np.array([[-300, 200], [-5, 9]], dtype=np.int16), "I"),  # signed: negatives clipped
    ],
)
def test_tiff_pixels_with_no_faithful_rgb_are_unusable_not_trained_on(
    tmp_path, caplog, pixels, mode
):
    """A float, 32-bit or signed TIFF has no one 8-bit picture: the index check counts it as
    unusable, with the reason, instead of the loader training on black or white."""
    import logging

    from training.datasets import load_index
    from training.datasets.base import image_problem

    for split in ("train", "test"):
        for cls in ("Audi", "BMW"):
            (tmp_path / split / cls).mkdir(parents=True)
            _stripes().save(tmp_path / split / cls / "ok.png")
    odd = tmp_path / "train" / "Audi" / "odd.tif"
    Image.fromarray(pixels).save(odd)
    with Image.open(odd) as img:
        assert img.mode == mode
    problem = image_problem(odd)
    assert problem.startswith("unsupported pixels (") and f"(mode {mode})" in problem
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        idx = load_index("folder", tmp_path, "train")
    assert [s.path.name for s in idx.samples] == ["ok.png", "ok.png"]
    assert idx.skipped_corrupt == 1
    assert any(str(odd) in r.getMessage() and "unsupported pixels" in r.getMessage()
               for r in caplog.records)  # fmt: skip
