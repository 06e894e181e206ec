"""Image bytes -> an RGB PIL image, or a PostError saying why not.

Pure and thread-safe: the worker calls it from its decode pool. The pixel budget is checked from
the header before any pixel is decoded, so a decompression bomb costs a header read.
"""

from __future__ import annotations

import binascii
import io
import re
import struct
import warnings

import pybase64
from PIL import Image, ImageFile, UnidentifiedImageError

from training.preprocessing import (  # noqa: F401 (exif_orientation, oriented_rgb re-exported)
    draft_for,
    exif_orientation,
    oriented_rgb,
    shorter_side_size,
)
from worker.errors import PostError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"})
DEFAULT_MAX_PIXELS = 64_000_000
# Decoding cost that the pixel budget does not bound. A progressive JPEG's decoder passes over
# the whole coefficient buffer once per scan, so a few hundred KB of empty scan headers cost
# minutes (7 ms a scan at 64 MP: 2,000 scans in 14 s, docs/faults.md; scratch measurement, not
# recorded in benchmarks/); encoders write about 10 (libjpeg's progressive script), a few
# dozen at most. Header segments and PNG chunks are parsed one at a time in Pillow's Python
# code (~3-4 us each: scratch measurement, not recorded in benchmarks/), so a 10 MB post of
# empty ones holds the GIL for seconds; real files have tens of segments and at most a few
# thousand chunks (8 KB IDATs of a 10 MB PNG: ~1,300).
MAX_JPEG_SCANS = 100
MAX_JPEG_HEADER_SEGMENTS = 1_000
MAX_PNG_CHUNKS = 20_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# RFC 2397 / RFC 3986: the scheme and the ";base64" token are case-insensitive
_DATA_URI = re.compile(r"data:", re.IGNORECASE)
_BASE64_TOKEN = re.compile(r";base64\Z", re.IGNORECASE)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey image
# Pillow warns (through py.warnings, three log lines) for images over Image.MAX_IMAGE_PIXELS
# (89 Mpx) and raises over twice that. Our budget, never above Pillow's (open_checked), refuses
# every such image from its header with a reason of its own, so the warning says nothing; it is
# ignored for the process once, here: warnings.catch_warnings around each open would swap
# process-global state, which is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# What Pillow's decoders raise on corrupt input besides OSError: fuzzed files are known to reach
# struct/index/key errors in format plugins, and a bad post must become a dead letter, not a crash.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URI) with a size cap.

    Standard padded base64 is decoded strictly (SIMD). The variants producers commonly send are
    read too, since each has one meaning: line-wrapped (MIME encoders, the ``base64`` command,
    Python's ``encodebytes``), unpadded (Go's ``RawStdEncoding``) and the URL-safe alphabet
    (``-`` and ``_``). Anything else (spaces or tabs, other characters, both alphabets at once,
    a length no padding mends) is ``bad_base64``, naming what and where.
    """
    start = 0  # where the base64 starts in the field
    if _DATA_URI.match(text):
        header, sep, payload = text.partition(",")
        if not sep or not _BASE64_TOKEN.search(header):
            raise PostError("bad_base64", "data URI is not base64-encoded")
        start, text = len(header) + 1, payload
    # a loose bound from the length alone, before decoding: 4 characters a 3 bytes, plus room
    # for line breaks (CRLF every 64 characters at most: 66/64); the decoded size is exact below
    if len(text) // 4 * 3 > (max_bytes + 3) * 66 // 64:
        raise PostError("too_large", f"image is over {max_bytes} bytes")
    try:
        # pybase64 (SIMD) with validate=True refuses what binascii's strict mode refuses, 50x
        # faster on a 280 KB post; this decode holds the GIL, so it caps a worker process
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        data = _decode_variant(text, start)
    if not data:
        raise PostError("not_an_image", "empty image")
    if len(data) > max_bytes:
        raise PostError("too_large", f"image is {len(data)} bytes, limit {max_bytes}")
    return data


_NOT_BASE64_VARIANT = re.compile(r"[^A-Za-z0-9+/=_\r\n-]")
_WHITESPACE_NAMES = {"\t": "a tab", " ": "a space"}


def _decode_variant(text: str, start: int) -> bytes:
    """``text``, which strict decoding refused, read as line-wrapped, unpadded or URL-safe
    base64; a ``bad_base64`` PostError naming what and where when it is none of these.
    ``start``: where ``text`` starts in the field, for the offsets named.

    The variants cost one pass to drop line breaks and SIMD decoding (with the URL-safe
    alphabet where it is used); the character-by-character search for what is wrong runs only
    for text that is no variant either."""
    joined = text.replace("\r", "").replace("\n", "")  # the same string when it has none
    url_safe = "-" in joined or "_" in joined
    mixed = url_safe and ("+" in joined or "/" in joined)
    body = joined.rstrip("=")
    padding = len(joined) - len(body)
    if not mixed and len(body) % 4 != 1 and (padding == 0 or len(joined) % 4 == 0):
        padded = body + "=" * (-len(body) % 4)
        try:
            return pybase64.b64decode(padded, altchars=b"-_" if url_safe else None, validate=True)
        except (binascii.Error, ValueError):
            pass  # named below
    raise PostError("bad_base64", "invalid base64: " + _variant_problem(text, body, mixed, start))


def _variant_problem(text: str, body: str, mixed: bool, start: int) -> str:
    """What makes ``text`` no base64 variant, and where."""
    if (found := _NOT_BASE64_VARIANT.search(text)) is not None:
        char, offset = found.group(), start + found.start()
        if char.isspace():
            what = _WHITESPACE_NAMES.get(char, f"whitespace ({char!r})")
            return f"{what} at offset {offset} (only line breaks may split base64)"
        return f"{char!r} at offset {offset} is not a base64 character"
    if mixed:
        return "both the standard alphabet (+ /) and the URL-safe one (- _)"
    if "=" in body:
        return f"'=' at offset {start + text.index('=')}, before its end"
    if len(body) % 4 == 1:
        return f"a length of {len(body)} is one character more than whole bytes take (cut short?)"
    return "wrong '=' padding for its length"


def decode_image(
    data: bytes,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: int | None = None,
) -> Image.Image:
    """Decode, apply EXIF orientation, return a loaded RGB image.

    The mode and orientation handling is training's :func:`oriented_rgb`, so a served photo is
    the picture the model was trained and evaluated on.

    ``draft_size``: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 DCT scale whose shorter
    side is still >= draft_size (the resize target), which is several times faster on photos.
    ``resize``: the shorter side the caller resizes to, held to the budget from the header
    (:func:`open_checked`).
    """
    img = open_checked(data, max_pixels, resize=resize)
    try:
        if draft_size:
            draft_for(img, draft_size)
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
    except _BOMB as exc:
        raise PostError("decompression_bomb", str(exc)) from None
    except _CORRUPT as exc:
        raise _corrupt("image data is truncated or corrupt", exc) from None
    return oriented_rgb(img)


def _corrupt(what: str, exc: Exception) -> PostError:
    """truncated_image, or decompression_bomb for Pillow's text-chunk inflation limit."""
    if isinstance(exc, ValueError) and "Decompressed data too large" in str(exc):
        return PostError("decompression_bomb", f"a compressed text chunk inflates too far: {exc}")
    return PostError("truncated_image", f"{what}: {exc}")


def open_checked(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, resize: int | None = None
) -> Image.Image:
    """Open from the header only: an allowed format within the pixel budget, not yet decoded.

    With ``resize``, its resize is held to the budget here too (:func:`check_resized_size`):
    decoded first, a 1x64,000,000 PNG of 124 KB took 1.3-3.5 GB (Pillow's 8-byte row pointers,
    copied by each mode conversion and rotation), against ~0.8 GB for any image that passes.
    """
    if not data:
        raise PostError("not_an_image", "empty image")
    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that: any image Pillow
    # would warn about is over our budget too (and the warning is ignored, see the top).
    if Image.MAX_IMAGE_PIXELS is not None:
        max_pixels = min(max_pixels, Image.MAX_IMAGE_PIXELS)
    problem = structure_cost_problem(data)
    if problem:
        raise problem
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise PostError("not_an_image", "not a recognised image format") from None
    except _BOMB as exc:  # the warning too, where a caller runs with warnings as errors
        size = _header_size(data)
        reason = _too_many_pixels(*size, max_pixels) if size else str(exc)
        raise PostError("decompression_bomb", reason) from None
    except _CORRUPT as exc:
        raise _corrupt("unreadable image header", exc) from None
    if img.format not in ALLOWED_FORMATS:
        raise PostError("unsupported_format", f"{img.format} images are not accepted")
    width, height = img.size
    if width < 1 or height < 1:
        raise PostError("not_an_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PostError("decompression_bomb", _too_many_pixels(width, height, max_pixels))
    if resize:
        check_resized_size(width, height, resize, max_pixels)
    return img


def check_resized_size(
    width: int, height: int, resize: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """PostError decompression_bomb when resizing the shorter side to ``resize`` would make an
    image of more than ``max_pixels``, the budget its decoded pixels are held to.

    The decode budget alone misses extreme aspect ratios: a 274-byte 1x100000 PNG decodes to
    100,000 pixels, but resizing its shorter side to 256 makes 256x25,600,000 (26 GB of RGB),
    which a worker's memory limit answers by killing the replica, for every replica that reads
    the post. Any photo's resize stays far below the budget, so no real post is refused. The
    resized size is symmetric in width and height, so the header's size answers for the image
    after its EXIF rotation too.
    """
    new_w, new_h = shorter_side_size(width, height, resize)
    resized = new_w * new_h
    if resized > max_pixels:
        raise PostError(
            "decompression_bomb",
            f"{width}x{height} resized to a shorter side of {resize} is {resized} pixels, "
            f"limit {max_pixels}",
        )


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} is {width * height} pixels, limit {max_pixels}"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an allowed format, without Pillow's pixel check.

    Image.open raises for images over twice Image.MAX_IMAGE_PIXELS with a text of its own,
    before the size can be read from the image it refused; the format's opener, called as
    Image.open calls it, reads the header without that check. Only on that refusal's path.
    """
    prefix = data[:16]
    for name in Image.ID:
        if name not in ALLOWED_FORMATS:
            continue
        factory, accept = Image.OPEN[name]
        if accept and not accept(prefix):
            continue
        try:
            return factory(io.BytesIO(data), "").size
        except (*_CORRUPT, *_BOMB, TypeError):  # what Image.open skips a format for
            continue
    return None


_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


def structure_cost_problem(data: bytes) -> PostError | None:
    """Why decoding `data` would cost far more than its size and pixels say, or None.

    Checked before Pillow parses anything. JPEG header segments and PNG chunks are walked by
    their lengths, only up to the limit; junk and fill bytes between JPEG segments, which
    Pillow skips one byte at a time in Python, are skipped here at C speed and held to a small
    budget. Scans are counted only in progressive JPEGs (a baseline decoder stops at an extra
    scan), as SOS markers followed by a well-formed SOS header: entropy-coded data holds no
    markers, and the header check leaves out the chance ``FF DA`` of data after the image (a
    motion photo's video). A search, ~0.25 ms a MB (scratch measurement, not recorded in
    benchmarks/), small beside a progressive decode.

    The problems are ``decompression_bomb`` errors, except a JPEG with too many stray bytes,
    which is corrupt (``truncated_image``): no encoder writes kilobytes of junk between
    segments. Data that Pillow would not take for a JPEG (``FF D8`` without a marker after it)
    is left to Pillow, which calls it ``not_an_image``.
    """
    if data[:3] == b"\xff\xd8\xff":  # what Pillow's JPEG and MPO openers accept
        problem, frame = _jpeg_header_problem(data)
        if problem:
            return problem
        if frame in _PROGRESSIVE_SOF:
            scans = _jpeg_scans(data, MAX_JPEG_SCANS + 1)
            if scans > MAX_JPEG_SCANS:
                return PostError(
                    "decompression_bomb", f"progressive JPEG has over {MAX_JPEG_SCANS} scans"
                )
    elif data[:8] == _PNG_SIGNATURE and _png_chunks(data, MAX_PNG_CHUNKS + 1) > MAX_PNG_CHUNKS:
        return PostError("decompression_bomb", f"PNG has over {MAX_PNG_CHUNKS} chunks")
    return None


_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
# every start-of-frame marker: C4 (DHT), C8 (JPG) and CC (DAC) share the range but are no frames
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
MAX_JPEG_STRAY_BYTES = 4096  # junk and fill bytes between header segments, in all


def draft_factor(width: int, height: int, size: int) -> int:
    """The DCT scale Pillow's ``draft("RGB", (size, size))`` decodes a JPEG at: the largest of
    8, 4, 2 that keeps both sides >= ``size``, else 1 (``JpegImageFile.draft``'s choice: a side
    already below ``size``, a thumbnail, is decoded at full scale)."""
    scale = min(width // size, height // size)
    return next((k for k in (8, 4, 2) if scale >= k), 1)


def jpeg_frame(data: bytes) -> int | None:
    """The second byte of the JPEG's start-of-frame marker (0xC0 baseline, 0xC1 extended
    sequential, 0xC2 progressive, 0xC9 arithmetic-coded, ...), None when there is none before
    the first scan. Pillow reports only "progressive", and refuses arithmetic coding."""
    return _jpeg_header_problem(data)[1]


def _jpeg_header_problem(data: bytes) -> tuple[PostError | None, int | None]:
    """Walk the marker segments before the first scan: a problem (too many segments, too many
    stray bytes) or None, and the frame marker among them (:func:`jpeg_frame`)."""
    pos, n, count, stray, frame = 2, len(data), 0, 0, None
    while pos + 1 < n:
        if data[pos] != 0xFF:  # junk before a marker: skipped up to the next 0xFF
            nxt = data.find(b"\xff", pos)
            skipped = (n if nxt == -1 else nxt) - pos
        elif data[pos + 1] == 0xFF:  # fill bytes: skipped up to the last 0xFF before a marker
            window = data[pos : pos + MAX_JPEG_STRAY_BYTES + 2]
            skipped = len(window) - len(window.lstrip(b"\xff")) - 1
        else:
            skipped = 0
        if skipped:
            stray += skipped
            if stray > MAX_JPEG_STRAY_BYTES:
                reason = (
                    f"JPEG is corrupt: over {MAX_JPEG_STRAY_BYTES} stray bytes between segments"
                )
                return PostError("truncated_image", reason), frame
            pos += skipped
            continue
        marker = data[pos + 1]
        count += 1
        if count > MAX_JPEG_HEADER_SEGMENTS:
            reason = f"JPEG has over {MAX_JPEG_HEADER_SEGMENTS} header segments"
            return PostError("decompression_bomb", reason), frame
        if marker in (0xDA, 0xD9):  # SOS, EOI
            break
        # the first frame marker, or a progressive one anywhere (what the scan bound checks)
        if marker in _SOF and (frame is None or marker in _PROGRESSIVE_SOF):
            frame = marker
        if marker in _STANDALONE_MARKERS:
            pos += 2
        elif pos + 3 < n:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        else:
            break
    return None, frame


def _jpeg_scans(data: bytes, stop_at: int) -> int:
    """SOS markers with a well-formed header (length 6 + 2 x components, 1-4 components),
    counted up to `stop_at`."""
    count, pos = 0, data.find(b"\xff\xda")
    while pos != -1 and count < stop_at:
        header = data[pos + 2 : pos + 5]
        if (
            len(header) == 3
            and 1 <= header[2] <= 4
            and header[0] == 0
            and header[1] == 6 + 2 * header[2]
        ):
            count += 1
        pos = data.find(b"\xff\xda", pos + 2)
    return count


def _png_chunks(data: bytes, stop_at: int) -> int:
    """Chunks after the signature, counted by their length fields up to `stop_at`."""
    pos, n, count = 8, len(data), 0
    while pos + 8 <= n and count < stop_at:
        count += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return count


def has_end_of_image(data: bytes) -> bool:
    """Whether the JPEG has an EOI marker after its first scan starts.

    The header segments (APPn, with EXIF thumbnails that end in EOI markers of their own) are
    skipped by their lengths; in entropy-coded data 0xFF is always stuffed or a restart marker,
    so a 0xFFD9 after the SOS is the image's end. Data after the EOI (a motion photo's video) is
    allowed, as Pillow allows it.
    """
    pos, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return False
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # SOS: the scan data follows its header
            # searched from the end, where a JPEG's EOI is: a forward search stops at every
            # stuffed 0xFF of the scan (315 us of the GIL against 0.08 us on a 425 KB photo JPEG:
            # commit 0d4555a's microbenchmark; decode CPU 0.9 -> 0.6 ms a post on the GPU-decode
            # path, benchmarks/results/eoi_rfind)
            return data.rfind(b"\xff\xd9", pos + 2) != -1
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif marker == 0xD9:  # EOI before any scan
            return False
        else:
            if pos + 3 >= n:
                return False
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False
