"""Seeded fuzzing of the worker's pure core: what a hostile or buggy producer can put on the topic.

A post that makes the worker raise after its batch was consumed is redelivered to every replica
in turn (the offset is never committed), so the properties here are "never raises" ones:

1. ``parse_event`` turns any bytes into a PostEvent or a PostError, nothing else;
2. every accepted event gives trend keys and expiry times (the writer runs after the results are
   published) and ``make_outputs`` gives one result or dead letter and one trend record per post,
   whatever the logits;
3. ``prepare`` never raises and returns a finite array of the spec's shape or a known error kind.

Deterministic: a fixed seed per property (``hypothesis`` is not a dependency). A failure names
the case number and the input. CARSTREAM_FUZZ_SEED and CARSTREAM_FUZZ_SCALE explore further.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import struct
import time
import typing
import zlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image

from engine_build.manifest import Manifest
from tests.support import DoneFuture, Rec, tiny_manifest
from training.preprocessing import PreprocessSpec
from worker.errors import ErrorKind, PostError
from worker.outputs import Pending, make_outputs
from worker.prepare import Prepared, prepare
from worker.schemas import MAX_JSON_DEPTH, PostEvent, Prediction, parse_event
from worker.settings import WorkerSettings
from worker.trend_keys import (
    DEFAULT_HOUR_TTL_S,
    DEFAULT_MINUTE_TTL_S,
    PREFIX,
    TrendRecord,
    expire_at,
    hour_bucket,
    increments,
    minute_bucket,
)
from worker.url_fetch import UrlPolicy

# fuzzed EXIF blocks make Pillow's TIFF tag reader warn, and headers past Pillow's own pixel limit
# make Image.open warn before open_checked refuses them: expected on this input
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

SEED = int(os.environ.get("CARSTREAM_FUZZ_SEED", "20261125"))
SCALE = float(os.environ.get("CARSTREAM_FUZZ_SCALE", "1"))
MAX_BYTES = 64 * 1024
KINDS = set(typing.get_args(ErrorKind))
SPEC = PreprocessSpec(resize=40, crop=32)
NO_URLS = UrlPolicy(enabled=False)  # image_url posts are refused before any lookup
LABELS = [
    {"make": "Audi", "model": "A4"},
    {"make": "BMW", "model": "X5"},
    {"make": "Citroën", "model": "C4 Cactus"},
    {"make": "トヨタ", "model": "カローラ"},
    {"make": "Make:With Separators", "model": "Model|With:Separators"},
]


def n(cases: int) -> int:
    return max(1, int(cases * SCALE))


# --- generators --------------------------------------------------------------------------------

UNICODE_SAMPLES = [
    "é",
    "ß",
    "İ",
    "ﬁ",
    "\u200b",
    "\u0000",
    "\ufeff",
    "\U0001f697",
    "٣",
    "２",
    "\u2028",
    "\\",
    '"',
    ":",
    "|",
    "\ud800",  # a lone surrogate: json.dumps writes it escaped, json.loads reads it back
]


def rand_text(rng: random.Random, max_len: int = 12) -> str:
    out = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.6:
            out.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.9:
            out.append(rng.choice(UNICODE_SAMPLES))
        else:
            out.append(chr(rng.randint(0x80, 0x10FFFF)))
    return "".join(out)


def rand_offset(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(["Z", "z", "+00:00", "-00:00"])
    if r < 0.6:
        return rng.choice(["+23:59", "-23:59", "+14:00", "-12:00", "+05:45", "-09:30"])
    if r < 0.9:
        return f"{rng.choice('+-')}{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return rng.choice(["", "+24:00", "-99:99", "+0530", "UTC", "+5:30", " Z", "+23:60"])


def rand_posted_at(rng: random.Random) -> str:
    """Mostly well-formed RFC 3339, crowded around the 1970 and 2100 bounds."""
    r = rng.random()
    if r < 0.45:  # within a day and a half of a bound, any offset
        bound = rng.choice([datetime(1970, 1, 1), datetime(2100, 1, 1)])
        t = bound + timedelta(seconds=rng.randint(-130_000, 130_000))
    elif r < 0.75:
        t = datetime(1970, 1, 1) + timedelta(seconds=rng.randint(0, 4_102_444_799))
    else:  # far outside, down to year 1 and up to 9999
        t = datetime(rng.choice([1, 2, 1000, 1969, 2100, 2101, 5000, 9999]), 1, 1)
        t += timedelta(seconds=rng.randint(0, 31_535_999)) if t.year < 9999 else timedelta(0)
    sep = rng.choice("TTTTt ")
    text = f"{t:%Y-%m-%d}{sep}{t:%H:%M:%S}"
    r = rng.random()
    if r < 0.1:
        text = text[:-2] + "60"  # a leap second
    elif r < 0.15:
        text = text[:11] + rng.choice(["24:00:00", "23:59:61", "99:00:00"])
    elif r < 0.2:
        text = text[:5] + rng.choice(["02-29", "02-30", "13-01", "00-10", "12-32"]) + text[10:]
    if rng.random() < 0.4:
        digits = rng.choice([1, 3, 6, 7, 9, 9, 10, 20])
        text += "." + "".join(rng.choice("09") for _ in range(digits))
    text += rand_offset(rng)
    if rng.random() < 0.05:  # non-ASCII digits match the regex's \d but are not dates
        text = text.replace("2", rng.choice("２٢"), 1)
    return text


def rand_event(rng: random.Random) -> dict:
    ev: dict = {"post_id": rand_text(rng, 20) or "p", "posted_at": rand_posted_at(rng)}
    if rng.random() < 0.8:
        ev["image_b64"] = base64.b64encode(rng.randbytes(rng.randint(1, 24))).decode()
    else:
        ev["image_url"] = rng.choice(
            ["https://cdn.example.com/a.jpg", "http://127.0.0.1/x", "ftp://x", "https://"]
        )
    for field in ("platform", "city", "lang"):
        if rng.random() < 0.5:
            ev[field] = rand_text(rng, 30)
    return ev


ODD_VALUES = [
    None,
    True,
    0,
    -1,
    2**63,
    -(2**64),
    10**400,
    1.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    " ",
    "x" * 200,
    [],
    {},
    ["2026-01-01T00:00:00Z"],
    {"$date": "2026-01-01T00:00:00Z"},
    "1700000000",
    "2026-01-01",
    "2026-01-01T00:00:00",
]


def mutate_fields(rng: random.Random, ev: dict) -> dict:
    ev = dict(ev)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(
            ["post_id", "posted_at", "image_b64", "image_url", "city", "platform", "lang", "extra"]
        )
        r = rng.random()
        if r < 0.2:
            ev.pop(field, None)
        elif r < 0.8:
            ev[field] = rng.choice(ODD_VALUES)
        else:
            ev[field] = rand_text(rng, rng.choice([5, 50, 200]))
    return ev


def dumps(rng: random.Random, ev: dict) -> str:
    """JSON text; non-finite floats come out as NaN/Infinity literals, which parse_event refuses."""
    return json.dumps(ev, ensure_ascii=rng.random() < 0.5)


def text_mutation(rng: random.Random, ev: dict) -> str:
    r = rng.random()
    if r < 0.2:  # duplicate keys: refused (json.loads alone keeps the last)
        field = rng.choice(["post_id", "posted_at", "image_b64"])
        dup = json.dumps(rng.choice([*ODD_VALUES, rand_posted_at(rng)]))
        return dumps(rng, ev)[:-1] + f', "{field}": {dup}}}'
    if r < 0.4:  # nesting around the depth limit, in an ignored field or in a real one
        depth = rng.randint(MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH + 2)
        opener = rng.choice(["[", '{"a":'])
        closer = "]" if opener == "[" else "}"
        nested = opener * (depth - 1) + "1" + closer * (depth - 1)
        field = rng.choice(["extra", "city", "posted_at"])
        return dumps(rng, ev)[:-1] + f', "{field}": {nested}}}'
    if r < 0.55:  # raw numeric literals json.dumps would never write
        literal = rng.choice(
            ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-0", "0.0e-400"]
        )
        field = rng.choice(["post_id", "posted_at", "city", "extra"])
        return dumps(rng, ev)[:-1] + f', "{field}": {literal}}}'
    if r < 0.7:  # escapes: lone surrogates, NUL, escaped quotes
        esc = rng.choice(["\\ud800", "\\udfff\\ud800", "\\u0000", '\\"', "\\\\", "\\uZZZZ", "\\"])
        field = rng.choice(["post_id", "posted_at", "city"])
        return dumps(rng, ev)[:-1] + f', "{field}": "a{esc}b"}}'
    if r < 0.8:
        return rng.choice(["[]", "null", "1", '"s"', "{}", "", " ", "\ufeff{}", "[" * 20000])
    return dumps(rng, ev)


def byte_mutation(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.3 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif r < 0.5 and data:
            del data[rng.randrange(len(data)) :]
        elif r < 0.7:
            i = rng.randint(0, len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif r < 0.8 and data:
            i = rng.randrange(len(data))
            data[i] = rng.choice(b'{}[]",:\\0')
        elif r < 0.9:
            data[0:0] = rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xc0\x80", b" "])
        else:
            data += b" " * rng.randint(0, MAX_BYTES // 2)  # past the size limit, sometimes
    return bytes(data)


def fuzz_raw(rng: random.Random) -> bytes:
    ev = rand_event(rng)
    r = rng.random()
    if r < 0.35:
        return dumps(rng, ev).encode("utf-8", "surrogatepass")
    if r < 0.6:
        return dumps(rng, mutate_fields(rng, ev)).encode("utf-8", "surrogatepass")
    if r < 0.8:
        return text_mutation(rng, ev).encode("utf-8", "surrogatepass")
    return byte_mutation(rng, dumps(rng, ev).encode("utf-8", "surrogatepass"))


def parse(raw: bytes | None, case: int) -> PostEvent | None:
    try:
        return parse_event(raw, MAX_BYTES)
    except PostError as exc:
        assert exc.kind in KINDS, f"case {case}: unknown kind {exc.kind!r} for {raw[:300]!r}"
        return None
    except Exception as exc:
        pytest.fail(f"case {case}: parse_event raised {exc!r} for {raw[:300]!r}")


# --- 1. parse_event ----------------------------------------------------------------------------


def test_parse_event_raises_only_post_error_for_any_bytes():
    rng = random.Random(SEED)
    accepted = 0
    for case in range(n(20000)):
        raw = fuzz_raw(rng)
        event = parse(raw, case)
        if event is not None:
            accepted += 1
            assert isinstance(event, PostEvent)
            utc = event.posted_at.astimezone(UTC)
            assert datetime(1970, 1, 1, tzinfo=UTC) <= utc < datetime(2100, 1, 1, tzinfo=UTC)
            assert (event.image_b64 is None) != (event.image_url is None)
    parse(None, -1)
    assert accepted > n(20000) // 20, "the generator should produce plenty of valid events too"


def test_posted_at_bounds_and_odd_offsets_in_the_fuzzer_corpus():
    """Fixed cases the generator aims at, pinned so a change of generator cannot lose them."""

    def accepted(posted_at: str) -> bool:
        raw = json.dumps({"post_id": "p", "image_b64": "AAAA", "posted_at": posted_at}).encode()
        return parse(raw, 0) is not None

    assert accepted("1970-01-01T00:00:00Z")
    assert accepted("1970-01-01T23:59:00+23:59")  # 1970-01-01T00:00Z
    assert not accepted("1970-01-01T23:58:59+23:59")
    assert accepted("2099-12-31T23:59:59.999999999Z")  # truncated, not rounded into 2100
    assert accepted("2099-12-31T00:00:59-23:59")  # 2099-12-31T23:59:59Z
    assert not accepted("2099-12-31T00:01:00-23:59")  # 2100-01-01T00:00Z
    assert not accepted("9999-12-31T23:59:59-23:59")
    assert not accepted("0001-01-01T00:00:00+00:01")
    assert accepted("2016-12-31T23:59:60Z")  # a leap second reads as the second before
    assert not accepted("1969-12-31T23:59:60Z")  # ... which is still before 1970
    assert not accepted("２０２６-01-01T00:00:00Z")


# --- 2. trend keys and make_outputs --------------------------------------------------------------


def check_trend_keys(record: TrendRecord, now: float, case: int) -> None:
    try:
        pairs = increments(record)
        expiries = {
            key: expire_at(key, DEFAULT_MINUTE_TTL_S, DEFAULT_HOUR_TTL_S, now) for key, _ in pairs
        }
    except Exception as exc:
        pytest.fail(f"case {case}: trend keys of {record!r} raised {exc!r}")
    if record.make is None:
        assert pairs == []
        return
    assert pairs
    minute, hour = minute_bucket(record.posted_at), hour_bucket(record.posted_at)
    utc = record.posted_at.astimezone(UTC)
    assert datetime.strptime(minute, "%Y%m%d%H%M").replace(tzinfo=UTC) == utc.replace(
        second=0, microsecond=0
    )
    assert datetime.strptime(hour, "%Y%m%d%H").replace(tzinfo=UTC) == utc.replace(
        minute=0, second=0, microsecond=0
    )
    for key, expire in expiries.items():
        assert key.startswith(PREFIX)
        res, bucket = key[len(PREFIX) :].split(":")[1:3]
        assert (res, bucket) in (("m", minute), ("h", hour)), key
        assert isinstance(expire, int) and expire <= int(now) + DEFAULT_HOUR_TTL_S


def accepted_events(rng: random.Random, count: int) -> list[tuple[bytes, PostEvent]]:
    out = []
    case = 0
    while len(out) < count:
        raw = fuzz_raw(rng)
        event = parse(raw, case)
        case += 1
        if event is not None:
            out.append((raw, event))
    return out


def test_every_accepted_event_gives_trend_keys_that_parse_back():
    rng = random.Random(SEED + 1)
    now = time.time()
    for case, (_, event) in enumerate(accepted_events(rng, n(1500))):
        label = rng.choice(LABELS)
        record = TrendRecord(
            "car-posts",
            rng.randrange(64),
            rng.randrange(2**63),
            event.posted_at,
            label["make"],
            label["model"] or None,
            event.city,
            rng.random() < 0.3,
        )
        check_trend_keys(record, now, case)


def manifest() -> Manifest:
    return tiny_manifest(LABELS, SPEC)


def rand_logits(rng: random.Random, dtype) -> np.ndarray:
    info = np.finfo(dtype)
    row = []
    for _ in LABELS:
        r = rng.random()
        if r < 0.7:
            row.append(rng.gauss(0, 5))
        elif r < 0.85:
            row.append(rng.choice([float(info.max), float(-info.max), float(info.tiny), 0.0]))
        else:
            row.append(rng.choice([math.nan, math.inf, -math.inf]))
    with np.errstate(over="ignore"):
        return np.array(row, dtype=dtype)


def test_make_outputs_gives_one_outcome_and_one_trend_record_per_post():
    rng = random.Random(SEED + 2)
    mf = manifest()
    pool = accepted_events(rng, n(300))
    now = time.time()
    for case in range(n(150)):
        settings = WorkerSettings(
            worker_id="fuzz", top_k=rng.randint(1, 8), min_confidence=rng.random()
        )
        dtype = rng.choice([np.float32, np.float16])
        batch, prepared, logits = [], [], {}
        for pos in range(rng.randint(1, 32)):
            offset = rng.randrange(2**40)
            if rng.random() < 0.75:
                raw, event = rng.choice(pool)
                prepared.append(Prepared(event, np.zeros(1, np.float32), None, 0.0))
                if rng.random() < 0.9:  # else the engine lost it: "no inference result"
                    logits[pos] = rand_logits(rng, dtype)
            else:
                raw = rng.randbytes(rng.randint(0, 40))
                prepared.append(Prepared(None, None, PostError("schema", "bad"), 0.0))
            key = raw[:16] if rng.random() < 0.5 else None
            batch.append(
                Pending(Rec("car-posts", pos % 3, offset, key, raw), 0.0, DoneFuture(None))
            )
        try:
            results, dead, trends = make_outputs(batch, prepared, logits, mf, settings)
        except Exception as exc:
            pytest.fail(f"case {case}: make_outputs raised {exc!r} on logits {logits!r}")
        assert len(results) + len(dead) == len(batch), f"case {case}"
        assert len(trends) == len(batch), f"case {case}"
        assert sorted(t.offset for t in trends) == sorted(p.record.offset for p in batch)
        finite = {pos for pos, row in logits.items() if np.isfinite(row).all()}
        assert len(results) == len(finite), f"case {case}"
        for _, value in results:
            pred = Prediction.model_validate_json(value)
            assert 0.0 <= pred.confidence <= 1.0 and len(pred.top_k) == min(
                settings.top_k, len(LABELS)
            )
        for record in trends:
            check_trend_keys(record, now, case)


# --- 3. prepare ----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seed_images(rng: random.Random) -> list[bytes]:
    """Small valid files of every accepted format and the awkward modes."""

    def noise(mode: str, size: tuple[int, int]) -> Image.Image:
        channels = len(Image.new(mode, (1, 1)).getbands())
        raw = rng.randbytes(size[0] * size[1] * channels)
        return (
            Image.frombytes(mode, size, raw)
            if mode != "P"
            else Image.frombytes("L", size, raw).convert("P")
        )

    rgb = noise("RGB", (24, 17))
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(rgb, "JPEG", quality=80),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb, "JPEG", exif=exif.tobytes()),
        encode(noise("L", (9, 40)), "JPEG"),
        encode(noise("CMYK", (16, 16)), "JPEG"),
        encode(rgb, "PNG"),
        encode(noise("RGBA", (20, 20)), "PNG"),
        encode(noise("LA", (7, 5)), "PNG"),
        encode(noise("P", (12, 12)), "PNG", transparency=0),
        encode(Image.new("I;16", (10, 10), 30000), "PNG"),
        encode(Image.new("1", (33, 3)), "PNG"),
        encode(rgb, "GIF"),
        encode(rgb, "BMP"),
        encode(rgb, "WEBP"),
        encode(noise("RGBA", (8, 8)), "WEBP", lossless=True),
        encode(rgb, "TIFF"),  # a real image of a format the worker refuses
        encode(Image.new("L", (1, 3000)), "PNG"),  # long, within the resize budget
    ]


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (valid CRC) and whose data is at most one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (min(width, 100_000) + 1)))
        + chunk(b"IEND", b"")
    )


def patch_dimensions(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the size fields of a JPEG SOF, GIF screen or BMP header to extreme values."""
    w = rng.choice([0, 1, 2, 65535, 40000, rng.randint(1, 65535)])
    h = rng.choice([0, 1, 2, 65535, 40000, rng.randint(1, 65535)])
    buf = bytearray(data)
    if data[:2] == b"\xff\xd8":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            i = data.find(marker)
            if i >= 0:
                buf[i + 5 : i + 9] = struct.pack(">HH", h, w)
    elif data[:3] == b"GIF":
        buf[6:10] = struct.pack("<HH", w, h)
    elif data[:2] == b"BM":
        buf[18:26] = struct.pack("<ii", w * rng.choice([1, -1]), h * rng.choice([1, -1]))
    return bytes(buf)


def image_payload(rng: random.Random, seeds: list[bytes]) -> str:
    r = rng.random()
    if r < 0.1:
        data = rng.choice(seeds)
    elif r < 0.3:
        data = byte_mutation_image(rng, rng.choice(seeds))
    elif r < 0.4:
        data = rng.choice(seeds)[: rng.randint(0, 200)]  # truncated
    elif r < 0.5:
        data = patch_dimensions(rng, rng.choice(seeds))
    elif r < 0.6:
        data = png_with_size(
            rng.choice([1, 2000, 100_000, 2**31 - 1, 0]), rng.choice([1, 5, 70_000])
        )
    elif r < 0.7:
        data = rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF"])
        data += rng.randbytes(rng.randint(0, 64))
    else:
        data = rng.randbytes(rng.randint(0, 256))
    text = base64.b64encode(data).decode()
    r = rng.random()
    if r < 0.1:
        return "data:image/png;base64," + text
    if r < 0.15:
        return rng.choice(["data:image/png," + text, "data:;base64", "data:image/jpeg;base64,"])
    if r < 0.25 and text:  # broken base64: padding, whitespace, url-safe alphabet, junk
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(["=", "\n", " ", "-", "_", "!", "é", "=="]) + text[i:]
    return text


def byte_mutation_image(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        if rng.random() < 0.7:
            buf[i] = rng.randrange(256)
        else:
            del buf[i : i + rng.randint(1, 16)]
    return bytes(buf)


def check_prepared(p: Prepared, raw: bytes, gpu: bool, case: int) -> None:
    where = f"case {case} (gpu_jpeg={gpu}) on {raw[:200]!r}"
    if p.error is not None:
        assert p.error.kind in KINDS, where
        assert p.error.kind != "internal", f"{where}: a decoder error escaped: {p.error.reason}"
        assert p.array is None and p.jpeg is None, where
    elif p.jpeg is not None:
        assert gpu and p.array is None and 1 <= p.jpeg.orientation <= 8, where
    else:
        assert p.array is not None, where
        assert p.array.shape == (3, SPEC.crop, SPEC.crop) and p.array.dtype == np.float32, where
        assert np.isfinite(p.array).all(), where


def test_prepare_never_raises_and_returns_an_array_or_a_known_error():
    rng = random.Random(SEED + 3)
    seeds = seed_images(rng)
    kinds: set[str] = set()
    for case in range(n(3000)):
        r = rng.random()
        if r < 0.75:
            ev = {"post_id": "p", "posted_at": "2026-11-25T14:03:00Z"}
            ev["image_b64"] = image_payload(rng, seeds)
            if rng.random() < 0.05:
                ev["image_url"] = "https://cdn.example.com/a.jpg"  # both: a schema error
            raw = json.dumps(ev).encode()
        elif r < 0.85:
            raw = json.dumps(
                {
                    "post_id": "p",
                    "posted_at": "2026-11-25T14:03:00Z",
                    "image_url": rng.choice(["https://example.com/a.jpg", "http://[::1]/", "x"]),
                }
            ).encode()
        else:
            raw = fuzz_raw(rng)
        gpu = rng.random() < 0.3
        try:
            p = prepare(raw, SPEC, NO_URLS, MAX_BYTES, draft=rng.random() < 0.5, gpu_jpeg=gpu)
        except Exception as exc:
            pytest.fail(f"case {case}: prepare raised {exc!r} on {raw[:200]!r}")
        check_prepared(p, raw, gpu, case)
        kinds.add("ok" if p.error is None else p.error.kind)
    # the generator reaches both sides and the main image error kinds
    assert {"ok", "bad_base64", "not_an_image", "truncated_image", "decompression_bomb"} <= kinds
    assert {"url_refused", "schema", "unsupported_format"} <= kinds


# --- regressions found by this fuzzer ------------------------------------------------------------


@pytest.mark.parametrize("gpu", [False, True])
def test_an_extreme_aspect_ratio_is_refused_before_the_resize(gpu):
    """A 274-byte 1x100000 PNG passed the decode budget (100,000 pixels), then resizing its
    shorter side to 256 allocated 256x25,600,000 pixels: 26 GB, an OOM kill of every replica that
    read the post. (A 1x20000 one took 18 s and 5 GB.) JPEGs for the GPU are checked from the
    header, before nvJPEG and the device resize."""
    spec = PreprocessSpec()  # the production 256/224
    for data in (
        encode(Image.new("L", (1, 100_000)), "PNG"),
        encode(Image.new("L", (60_000, 1)), "JPEG"),
    ):
        raw = json.dumps(
            {
                "post_id": "p",
                "posted_at": "2026-11-25T14:03:00Z",
                "image_b64": base64.b64encode(data).decode(),
            }
        ).encode()
        started = time.perf_counter()
        p = prepare(raw, spec, NO_URLS, 10**6, gpu_jpeg=gpu)
        assert p.error is not None and p.error.kind == "decompression_bomb", p.error
        assert time.perf_counter() - started < 2.0
    # a long but plausible picture (a 20:1 banner) is still classified
    banner = encode(Image.new("RGB", (2000, 100), (200, 10, 10)), "PNG")
    raw = json.dumps(
        {
            "post_id": "p",
            "posted_at": "2026-11-25T14:03:00Z",
            "image_b64": base64.b64encode(banner).decode(),
        }
    ).encode()
    p = prepare(raw, spec, NO_URLS, 10**6)
    assert p.error is None and p.array.shape == (3, 224, 224)
