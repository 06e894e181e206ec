"""Image bytes -> an RGB PIL image, or a PostError saying why not.

Pure and thread-safe: the worker calls it from its decode pool. The pixel budget is checked from
the header before any pixel is decoded, so a decompression bomb costs a header read.
"""

from __future__ import annotations

import binascii
import io
import logging
import struct

import pybase64
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.errors import PostError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"})
DEFAULT_MAX_PIXELS = 64_000_000
_DATA_URI_PREFIX = "data:"

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey image

log = logging.getLogger(__name__)

# What Pillow's decoders raise on corrupt input besides OSError: fuzzed files are known to reach
# struct/index/key errors in format plugins, and a bad post must become a dead letter, not a crash.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (optionally a ``data:image/...;base64,`` URI) with a size cap."""
    if text.startswith(_DATA_URI_PREFIX):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise PostError("bad_base64", "data URI is not base64-encoded")
        text = payload
    if len(text) // 4 * 3 > max_bytes + 3:
        raise PostError("too_large", f"image is over {max_bytes} bytes")
    try:
        # pybase64 (SIMD) with validate=True refuses what binascii's strict mode refuses, 50x
        # faster on a 280 KB post; this decode holds the GIL, so it caps a worker process
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PostError("bad_base64", f"invalid base64: {exc}") from None
    if not data:
        raise PostError("not_an_image", "empty image")
    if len(data) > max_bytes:
        raise PostError("too_large", f"image is {len(data)} bytes, limit {max_bytes}")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB.

    Transparency is composited on white: a cut-out product shot is seen on a white page, while
    dropping alpha would expose whatever colour the transparent pixels happen to store (often
    black), and the model was trained on opaque photos, so white is the nearest to what it knows.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (mode I only comes from 16-bit PNGs among the allowed formats): scale
        # 0..65535 to 0..255; a plain convert would clip everything above 255 to white
        img = img.point(lambda v: v * (255.0 / 65535.0)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def decode_image(
    data: bytes, *, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode, apply EXIF orientation, return a loaded RGB image.

    ``draft_size``: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 DCT scale whose shorter
    side is still >= draft_size (the resize target), which is several times faster on photos.
    """
    img = open_checked(data, max_pixels)
    try:
        if draft_size and img.format in ("JPEG", "MPO"):
            # picks the smallest DCT scale (1/1, 1/2, 1/4, 1/8) keeping both sides >= draft_size
            img.draft("RGB", (draft_size, draft_size))
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
    except _BOMB as exc:
        raise PostError("decompression_bomb", str(exc)) from None
    except _CORRUPT as exc:
        raise PostError("truncated_image", f"image data is truncated or corrupt: {exc}") from None
    return _to_rgb(_apply_orientation(img))


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open from the header only: an allowed format within the pixel budget, not yet decoded."""
    if not data:
        raise PostError("not_an_image", "empty image")
    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that. Catching the warning
    # needs warnings.catch_warnings, which swaps process-global state and is not thread-safe, so
    # instead any image Pillow would warn about is over our budget too.
    if Image.MAX_IMAGE_PIXELS is not None:
        max_pixels = min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise PostError("not_an_image", "not a recognised image format") from None
    except _BOMB as exc:  # the warning too, where a caller runs with warnings as errors
        raise PostError("decompression_bomb", str(exc)) from None
    except _CORRUPT as exc:
        raise PostError("truncated_image", f"unreadable image header: {exc}") from None
    if img.format not in ALLOWED_FORMATS:
        raise PostError("unsupported_format", f"{img.format} images are not accepted")
    width, height = img.size
    if width < 1 or height < 1:
        raise PostError("not_an_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PostError(
            "decompression_bomb", f"{width}x{height} is {width * height} pixels, limit {max_pixels}"
        )
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF is common; it means "as stored", as in _apply_orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; a corrupt EXIF block leaves the pixels as stored rather than
    rejecting an otherwise good photo (phones and editors write broken EXIF surprisingly often)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # any EXIF parsing failure means "no orientation"
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img
