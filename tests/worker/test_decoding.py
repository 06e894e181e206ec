"""Decoding every accepted format, refusing the rest, and JPEG draft decoding within tolerance."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from training.preprocessing import PreprocessSpec, preprocess_image
from worker.decoding import (
    MAX_JPEG_HEADER_SEGMENTS,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    decode_base64,
    decode_image,
    structure_cost_problem,
)
from worker.errors import PostError


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def mean_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("JPEG", {"quality": 95}),
        ("JPEG", {"quality": 95, "progressive": True}),
        ("PNG", {}),
        ("WEBP", {"quality": 95}),
        ("BMP", {}),
        ("GIF", {}),
    ],
)
def test_each_format_decodes_to_rgb_with_its_size_and_colour(fmt, kw):
    img = decode_image(encode(solid((200, 40, 40)), fmt, **kw))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.allclose(mean_rgb(img), (200, 40, 40), atol=12)


def test_grayscale_jpeg_becomes_rgb_grey():
    img = decode_image(encode(solid(128, mode="L"), "JPEG"))
    r, g, b = mean_rgb(img)
    assert img.mode == "RGB" and abs(r - 128) < 3 and r == g == b


def test_cmyk_jpeg_keeps_its_colour():
    cmyk = solid((200, 40, 40)).convert("CMYK")
    img = decode_image(encode(cmyk, "JPEG", quality=95))
    assert np.allclose(mean_rgb(img), (200, 40, 40), atol=20)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(solid((10, 200, 10), size=(40, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)


def test_png_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.allclose(mean_rgb(decode_image(encode(rgba, "PNG"))), (255, 255, 255))


def test_webp_and_grey_alpha_are_composited_on_white():
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    half.paste((0, 0, 0, 255), (0, 0, 5, 10))  # left half opaque black, right half transparent
    img = decode_image(encode(half, "WEBP", lossless=True))
    assert img.getpixel((1, 5)) == (0, 0, 0) and img.getpixel((8, 5)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.allclose(mean_rgb(decode_image(encode(la, "PNG"))), (255, 255, 255))


def test_palette_png_with_transparency():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    data = encode(pal, "PNG", transparency=0)
    assert np.allclose(mean_rgb(decode_image(data)), (255, 255, 255))
    opaque = encode(pal, "PNG")
    assert np.allclose(mean_rgb(decode_image(opaque)), (0, 0, 255))


def test_16_bit_png_mid_grey_stays_mid_grey():
    arr = np.full((6, 6), 32768, dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16
    r, g, b = mean_rgb(decode_image(data))
    assert 120 < r < 136 and r == g == b
    dark = encode(Image.fromarray(np.full((6, 6), 1000, dtype=np.uint16)), "PNG")
    assert mean_rgb(decode_image(dark))[0] < 8  # scaled by 65535, not stretched to the maximum


def test_gif_first_frame_is_used():
    frames = [solid((255, 0, 0), (8, 8)), solid((0, 255, 0), (8, 8))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, _ = mean_rgb(decode_image(buf.getvalue()))
    assert r > 200 and g < 50


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "not_an_image"),
        (b"hello, not an image", "not_an_image"),
        (encode(solid((1, 2, 3)), "TIFF"), "unsupported_format"),
        (_png_header_only(100_000, 100_000), "decompression_bomb"),
        (encode(solid((9, 9, 9), (64, 64)), "PNG")[:60], "truncated_image"),
        (encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:400], "truncated_image"),
    ],
)
def test_bad_images_get_their_error_kind(data, kind):
    with pytest.raises(PostError) as info:
        decode_image(data)
    assert info.value.kind == kind


def test_a_real_bomb_is_refused_before_its_pixels_are_decoded():
    data = encode(Image.new("1", (9000, 9000), 0), "PNG")  # 81 Mpx in ~10 KB
    assert len(data) < 50_000
    with pytest.raises(PostError) as info:
        decode_image(data)
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize(
    "warnings_as",
    [
        pytest.param(
            "ignore", marks=pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
        ),
        pytest.param(
            "error", marks=pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
        ),
    ],
)
def test_pillows_own_limit_still_applies_when_the_budget_is_larger(warnings_as):
    # 10000 x 10000 is over Image.MAX_IMAGE_PIXELS (Pillow only warns), 100k x 100k is over twice
    # it (Pillow raises): both are bombs even when the caller's budget would allow them
    for side in (10_000, 100_000):
        with pytest.raises(PostError) as info:
            decode_image(_png_header_only(side, side), max_pixels=10**12)
        assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize("side", [10_000, 12_000, 30_000, 100_000])
def test_images_over_the_cap_get_the_same_reason_whatever_pillow_does(side):
    # Pillow warns from 89 Mpx and raises past 179 Mpx with a text of its own: our reason,
    # with the size, is given either way
    with pytest.raises(PostError) as info:
        decode_image(_png_header_only(side, side))
    assert info.value.kind == "decompression_bomb"
    assert info.value.reason == f"{side}x{side} is {side * side} pixels, limit 64000000"


def test_pillows_bomb_warning_is_not_logged():
    # the worker logs warnings (py.warnings): Pillow's three-line DecompressionBombWarning for
    # images of 89-179 Mpx said nothing that the dead letter's reason does not. A fresh
    # interpreter, since pytest resets warning filters around each test and its collection
    program = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "logging.captureWarnings(True)\n"
        "from worker.decoding import open_checked\n"
        "from worker.errors import PostError\n"
        "try:\n"
        "    open_checked(sys.stdin.buffer.read())\n"
        "except PostError as exc:\n"
        "    print(exc.kind)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", program],
        input=_png_header_only(12_000, 12_000),  # 144 Mpx: Pillow warns, does not raise
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        check=True,
    )
    assert done.stdout == b"decompression_bomb\n", done.stderr
    assert b"DecompressionBomb" not in done.stderr and b"py.warnings" not in done.stderr, (
        done.stderr
    )


def _with_extra_scans(data: bytes, scans: int) -> bytes:
    """The JPEG with `scans` copies of its first scan header (empty scans) before its EOI."""
    sos = data.index(b"\xff\xda")
    header = data[sos : sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]]
    return data[:-2] + header * scans + data[-2:]


def test_a_progressive_jpeg_of_empty_scans_is_refused_before_decoding():
    # each scan is a pass over the whole coefficient buffer: 2,000 empty ones in 20 KB took
    # 14 s to decode at 64 Mpx; the count is checked before Pillow parses anything
    photo = encode(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG", progressive=True)
    assert decode_image(photo).size == (96, 96)  # a real progressive file: ~10 scans
    assert decode_image(_with_extra_scans(photo, MAX_JPEG_SCANS - 20)).size == (96, 96)
    with pytest.raises(PostError) as info:
        decode_image(_with_extra_scans(photo, MAX_JPEG_SCANS + 1))
    assert info.value.kind == "decompression_bomb" and "scans" in info.value.reason
    # a baseline decoder stops at the first extra scan: no count needed, and it is corrupt
    baseline = encode(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG")
    assert structure_cost_problem(_with_extra_scans(baseline, 500)) is None
    with pytest.raises(PostError) as info:
        decode_image(_with_extra_scans(baseline, 500))
    assert info.value.kind == "truncated_image"


def test_header_segments_and_png_chunks_parsed_one_by_one_are_capped():
    jpeg = encode(solid((9, 9, 9), (32, 32)), "JPEG")
    comments = b"\xff\xfe\x00\x02"  # an empty COM segment: Pillow parses each in Python
    assert decode_image(jpeg[:2] + comments * 50 + jpeg[2:]).size == (32, 32)
    with pytest.raises(PostError) as info:
        decode_image(jpeg[:2] + comments * (MAX_JPEG_HEADER_SEGMENTS + 1) + jpeg[2:])
    assert info.value.kind == "decompression_bomb" and "header segments" in info.value.reason

    png = encode(solid((9, 9, 9), (32, 32)), "PNG")
    empty = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    after_ihdr = 8 + 25
    assert decode_image(png[:after_ihdr] + empty * 50 + png[after_ihdr:]).size == (32, 32)
    with pytest.raises(PostError) as info:
        decode_image(png[:after_ihdr] + empty * MAX_PNG_CHUNKS + png[after_ihdr:])
    assert info.value.kind == "decompression_bomb" and "chunks" in info.value.reason


def _after_app0(data: bytes) -> int:
    return 4 + int.from_bytes(data[4:6], "big")  # SOI, then APP0's marker and length


def test_junk_and_fill_bytes_do_not_hide_segments_scans_or_cost():
    photo = encode(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG", progressive=True)
    cut = _after_app0(photo)
    # a junk byte (libjpeg and Pillow skip it) must not end the walk: the COM flood behind it
    # and the progressive frame header (hence the scan count) are still seen
    comments = b"\xff\xfe\x00\x02" * (MAX_JPEG_HEADER_SEGMENTS + 1)
    assert (
        "header segments"
        in structure_cost_problem(photo[:cut] + b"\x00" + comments + photo[cut:]).reason
    )
    scans = _with_extra_scans(photo, MAX_JPEG_SCANS + 1)
    assert "scans" in structure_cost_problem(scans[:cut] + b"\x00" + scans[cut:]).reason
    # a few junk or fill bytes are what broken encoders write: still decoded
    assert decode_image(photo[:cut] + b"\x00\x00" + b"\xff" * 8 + photo[cut:]).size == (96, 96)
    # a flood of fill bytes (Pillow reads each in Python: 8.5 s for 10 MB) is refused
    flood = photo[:2] + b"\xff" * 1_000_000 + photo[2:]
    assert "stray bytes" in structure_cost_problem(flood).reason
    with pytest.raises(PostError) as info:
        decode_image(photo[:cut] + bytes(1_000_000) + photo[cut:])
    assert info.value.kind == "truncated_image"  # no encoder writes that: corrupt, not a bomb


def test_stray_bytes_are_corruption_and_ff_d8_alone_is_no_jpeg():
    # FF D8 and no marker after it: Pillow takes no such file for a JPEG, nor do we
    with pytest.raises(PostError) as info:
        decode_image(b"\xff\xd8" + bytes(7 * 1024 * 1024))
    assert info.value.kind == "not_an_image", info.value
    # a JPEG start and then megabytes of junk: refused before Pillow skips it byte by byte,
    # as a corrupt file
    with pytest.raises(PostError) as info:
        decode_image(b"\xff\xd8\xff" + bytes(7 * 1024 * 1024))
    assert info.value.kind == "truncated_image" and "stray bytes" in info.value.reason


def test_a_progressive_motion_photo_is_not_refused_for_ff_da_in_its_video():
    # data after the image (a motion photo's MP4) holds a chance FF DA every ~64 KB; only SOS
    # markers with a well-formed header count as scans
    photo = encode(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG", progressive=True)
    trailer = b"".join(b"\x00" * 1000 + b"\xff\xda" + bytes([i % 256, 7]) for i in range(300))
    assert decode_image(photo + trailer).size == (96, 96)


def test_a_text_chunk_that_inflates_past_pillows_limit_is_a_bomb_not_corruption():
    from PIL import PngImagePlugin

    png = encode(solid((9, 9, 9), (32, 32)), "PNG")
    body = b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 10))
    ztxt = (
        struct.pack(">I", len(body))
        + b"zTXt"
        + body
        + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    )
    for at in (8 + 25, len(png) - 12):  # before the pixels (read at open) and after (at load)
        with pytest.raises(PostError) as info:
            decode_image(png[:at] + ztxt + png[at:])
        assert info.value.kind == "decompression_bomb"


def test_pixel_budget_is_a_parameter():
    data = encode(solid((0, 0, 0), (100, 100)), "PNG")
    with pytest.raises(PostError, match="decompression_bomb"):
        decode_image(data, max_pixels=5_000)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_jpeg_draft_keeps_resize_size_and_matches_full_decode_after_preprocessing():
    rng = np.random.default_rng(0)
    # a smooth photo-like 1280x960 image: gradients plus blocks plus mild noise
    y, x = np.mgrid[0:960, 0:1280]
    base = np.stack([x / 1280 * 255, y / 960 * 255, (x + y) % 256], axis=-1)
    base[200:600, 300:900] = (30, 90, 200)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=90)
    spec = PreprocessSpec()  # resize 256, crop 224

    drafted = decode_image(data, draft_size=spec.resize)
    full = decode_image(data)
    assert min(drafted.size) >= spec.resize
    assert drafted.size[0] < full.size[0]  # the draft really decoded at a reduced scale
    diff = np.abs(preprocess_image(drafted, spec) - preprocess_image(full, spec))
    assert diff.mean() < 0.05  # normalised units; 0.0065 measured (max 0.30) with Pillow 13


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 768), (512, 384)),  # 1/2: 1/4 would make the short side 192
        ((1500, 1200), (375, 300)),  # 1/4
        ((2100, 2100), (263, 263)),  # 1/8, rounded up
        ((4000, 2100), (500, 263)),
        ((600, 3000), (300, 1500)),
        ((511, 4000), (511, 4000)),  # the short side is under 2 x 256: full scale
    ],
)
def test_draft_picks_the_smallest_scale_that_keeps_both_sides_at_the_target(size, expected):
    data = encode(solid((50, 60, 70), size), "JPEG", quality=80)
    img = decode_image(data, draft_size=256)
    assert img.size == expected and min(img.size) >= 256


def test_draft_then_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(solid((50, 60, 70), (1200, 600)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, draft_size=256).size == (300, 600)


def test_unreadable_exif_keeps_the_image(monkeypatch):
    def broken(img):
        raise SyntaxError("bad EXIF IFD")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "getexif", broken)
    assert decode_image(encode(solid((1, 2, 3)), "JPEG")).size == (40, 30)


def test_truncated_exif_block_keeps_the_image():
    truncated = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"  # IFD runs past the end
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        img = decode_image(encode(solid((1, 2, 3)), "JPEG", exif=truncated))
    assert img.size == (40, 30)


def test_concurrent_decoding_matches_serial_decoding():
    """The worker decodes in a thread pool; no shared state may leak between calls."""
    rng = np.random.default_rng(1)
    payloads = [
        encode(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)), fmt)
        for fmt in ("JPEG", "PNG", "WEBP", "BMP") * 6
    ] + [_png_header_only(100_000, 100_000), b"junk"] * 4

    def outcome(data: bytes):
        try:
            return np.asarray(decode_image(data, draft_size=32)).tobytes()
        except PostError as exc:
            return exc.kind

    serial = [outcome(d) for d in payloads]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(outcome, payloads)) == serial


def test_draft_is_not_applied_below_the_resize_size():
    data = encode(solid((50, 60, 70), (300, 280)), "JPEG")
    assert decode_image(data, draft_size=256).size == (300, 280)


@pytest.mark.parametrize(
    ("prefix", "encode"),
    [
        ("", base64.encodebytes),  # Python's encodebytes, the base64 command: 76-char lines
        ("data:image/png;base64,", base64.encodebytes),
        ("", lambda b: base64.b64encode(b)[:64] + b"\r\n" + base64.b64encode(b)[64:]),  # MIME
        ("", lambda b: base64.b64encode(b) + b"\n"),  # `base64 -w0 f; echo`
        ("", lambda b: base64.b64encode(b).rstrip(b"=")),  # Go's RawStdEncoding
        ("", base64.urlsafe_b64encode),
        ("data:image/png;base64,", lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")),
    ],
)
def test_the_base64_variants_producers_send_are_read(prefix, encode):
    # before: each was bad_base64 (strict decoding), so a producer on one of them lost every post
    payload = b"\x89PNG" + bytes(range(256)) * 3 + b"\xfb\xff"  # '+' '/' or '-' '_' in its text
    assert decode_base64(prefix + encode(payload).decode(), 10_000) == payload


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("QUJD REVG", "a space at offset 4 (only line breaks may split base64)"),
        (
            "data:image/png;base64,QUJD\tREVG",
            "a tab at offset 26 (only line breaks may split base64)",
        ),
        ("QUJD!REVG", "'!' at offset 4 is not a base64 character"),
        ("QUJD-REV+", "both the standard alphabet (+ /) and the URL-safe one (- _)"),
        ("YQ==YQ==", "'=' at offset 2, before its end"),
        ("QUJDR", "a length of 5 is one character more than whole bytes take (cut short?)"),
        ("YQ=", "wrong '=' padding for its length"),
        ("YQ===", "wrong '=' padding for its length"),
    ],
)
def test_what_is_no_base64_variant_is_named_with_where(text, reason):
    with pytest.raises(PostError) as info:
        decode_base64(text, 10_000)
    assert info.value.kind == "bad_base64"
    assert info.value.reason == f"invalid base64: {reason}"


def test_base64_and_data_uri():
    payload = b"\x89PNG..."
    text = base64.b64encode(payload).decode()
    assert decode_base64(text, 1000) == payload
    assert decode_base64("data:image/png;base64," + text, 1000) == payload
    bad_texts = ("!!!", "abc!", "YWJj ZA==", "data:image/png," + text, "é", "YQ==YQ==", "Y")
    for bad in (*bad_texts, text[:8] + "\x00" + text[8:]):
        with pytest.raises(PostError) as info:
            decode_base64(bad, 1000)
        assert info.value.kind == "bad_base64", bad
    assert decode_base64("data:image/jpeg;name=a.jpg;base64," + text, 1000) == payload
    with pytest.raises(PostError) as info:
        decode_base64(base64.b64encode(b"x" * 2000).decode(), 1000)
    assert info.value.kind == "too_large"
    # the size is judged from the text's length, before (and instead of) decoding it
    with pytest.raises(PostError) as info:
        decode_base64("!" * 100_000, 1000)
    assert info.value.kind == "too_large"
    with pytest.raises(PostError) as info:
        decode_base64("", 1000)
    assert info.value.kind == "not_an_image"


def test_a_wrapped_image_just_under_the_cap_is_not_refused_for_its_line_breaks():
    # before: the length bound before decoding counted CRLF line breaks as base64, so an image
    # at 98.5% of the cap, wrapped in 76-character lines, was refused as too large
    cap = 100_000
    payload = bytes(range(256)) * (cap * 985 // 1000 // 256)
    wrapped = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    assert decode_base64(wrapped, cap) == payload
    with pytest.raises(PostError) as info:
        decode_base64(base64.encodebytes(payload + bytes(cap)).decode(), cap)
    assert info.value.kind == "too_large"
