"""Images refused from their header cost a header read, not a decode: measured in a fresh
process, whose peak memory is its own. And data URIs read whatever the case of their tokens."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from worker.decoding import decode_base64, decode_image
from worker.errors import PostError

# prepare() on the event read from stdin, in a fresh interpreter: what it refused the post as,
# and how far its peak RSS rose over the call, imports and input already paid. VmHWM, not
# ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest process would
# start at its parent's peak and hide most of its own
_PREPARE_AND_MEASURE = """
import re, sys
from training.preprocessing import PreprocessSpec
from worker.prepare import prepare
from worker.url_fetch import UrlPolicy
def peak_kb():
    with open("/proc/self/status") as status:
        return int(re.search(r"^VmHWM:\\s+(\\d+) kB", status.read(), re.M).group(1))
raw = sys.stdin.buffer.read()
before = peak_kb()
p = prepare(raw, PreprocessSpec(), UrlPolicy(), 10**8)
grew = peak_kb() - before
print(p.error and p.error.kind, grew // 1024, p.error and p.error.reason, sep="\\n")
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _blank_png(width: int, height: int, color_type: int, channels: int, orientation: int) -> bytes:
    """A valid 8-bit PNG of zeros, compressed a MB at a time (a 128 MB image in ~0.3 s), with
    an eXIf orientation unless it is 1."""
    row = bytes(1 + width * channels)  # filter byte, pixels
    rows_per_block = max(1, (1 << 20) // len(row))
    deflate, parts, left = zlib.compressobj(9), [], height
    while left:
        n = min(rows_per_block, left)
        parts.append(deflate.compress(row * n))
        left -= n
    parts.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    exif = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
    exif += struct.pack(">H", orientation) + bytes(6)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + (_chunk(b"eXIf", exif) if orientation != 1 else b"")
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("color_type", "channels", "orientation"),
    [(0, 1, 1), (4, 2, 3)],  # grey; grey with alpha, rotated 180 degrees
    ids=["L", "LA-orientation-3"],
)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_a_tall_png_within_the_pixel_budget_is_refused_before_its_pixels_are_decoded(
    color_type, channels, orientation
):
    # 1x64,000,000 is exactly the 64 MP budget in ~125-190 KB; decoded before its resize was
    # checked, Pillow's 8-byte row pointers (512 MB a copy) took the worker to 1.3-3.5 GB
    png = _blank_png(1, 64_000_000, color_type, channels, orientation)
    assert len(png) < 250_000
    event = {
        "post_id": "p",
        "posted_at": "2026-11-25T10:00:00Z",
        "image_b64": base64.b64encode(png).decode(),
    }
    done = subprocess.run(
        [sys.executable, "-c", _PREPARE_AND_MEASURE],
        input=json.dumps(event).encode(),
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        check=True,
    )
    kind, grew_mb, reason = done.stdout.decode().splitlines()
    assert kind == "decompression_bomb", done.stdout
    assert reason.startswith("1x64000000 resized to a shorter side of 256 is "), reason
    assert int(grew_mb) < 600, f"peak RSS rose {grew_mb} MB refusing a {len(png)}-byte PNG"


def test_the_resize_bound_is_the_same_from_the_header():
    # 256 x int(256 * 976) = 63,963,136 pixels: within 64 MP; one row more is over it
    assert decode_image(_blank_png(1, 976, 0, 1, 1), resize=256).size == (1, 976)
    with pytest.raises(PostError) as info:
        decode_image(_blank_png(977, 1, 0, 1, 1), resize=256)
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize(
    "prefix",
    ["DATA:image/png;BASE64,", "Data:image/png;Base64,", "data:IMAGE/PNG;name=a.png;BASE64,"],
)
def test_data_uri_tokens_are_case_insensitive(prefix):
    # RFC 2397 / RFC 3986: the scheme and ";base64" are case-insensitive
    payload = b"\x89PNG not really"
    assert decode_base64(prefix + base64.b64encode(payload).decode(), 1000) == payload


def test_a_data_uri_without_base64_is_refused_in_any_case():
    with pytest.raises(PostError) as info:
        decode_base64("DATA:image/png," + base64.b64encode(b"abc").decode(), 1000)
    assert info.value.kind == "bad_base64"
    assert info.value.reason == "data URI is not base64-encoded"
