"""Pure worker logic: batching rule, event parsing, post-processing, DLQ headers, outputs."""

from __future__ import annotations

import base64
import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import pytest

from engine_build.manifest import Manifest
from engine_build.scores import softmax
from tests.support import DoneFuture, Rec, tiny_manifest
from training.preprocessing import PreprocessSpec
from worker.batching import Batcher
from worker.dead_letter import dlq_headers, parse_dlq_headers
from worker.errors import PostError
from worker.outputs import Pending, make_outputs
from worker.pipeline import commit_offsets
from worker.postprocess import classify
from worker.prepare import Prepared, prepare
from worker.schemas import MAX_JSON_DEPTH, MAX_JSON_VALUES, Prediction, parse_event
from worker.settings import WorkerSettings
from worker.url_fetch import UrlPolicy


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --- batching ------------------------------------------------------------------------------


def test_batch_flushes_when_full_before_the_deadline():
    clock = FakeClock()
    b = Batcher(max_batch=3, max_wait_ms=1000, clock=clock)
    for i in range(2):
        b.add(i)
    assert not b.ready()
    b.add(2)
    assert b.ready()
    assert b.take() == [0, 1, 2]
    assert len(b) == 0 and not b.ready()


def test_batch_flushes_at_max_wait_counted_from_the_first_item():
    clock = FakeClock()
    b = Batcher(max_batch=100, max_wait_ms=50, clock=clock)
    b.add("a")
    clock.t += 0.030
    b.add("b")
    assert not b.ready()
    assert b.time_left_ms() == pytest.approx(20.0)
    clock.t += 0.019
    assert not b.ready()
    clock.t += 0.002
    assert b.ready()
    assert b.take() == ["a", "b"]


def test_take_returns_at_most_max_batch_and_the_rest_keep_their_wait():
    clock = FakeClock()
    b = Batcher(max_batch=2, max_wait_ms=10, clock=clock)
    for i in range(5):
        b.add(i)
    assert b.take() == [0, 1]
    assert len(b) == 3
    # the rest hold a full batch: it is due now, and a poll must not block for a new wait
    assert b.ready() and b.time_left_ms() == 0.0
    assert b.take() == [2, 3]
    assert len(b) == 1 and not b.ready()
    assert b.time_left_ms() == pytest.approx(10.0)


def test_an_item_left_behind_by_a_full_batch_is_due_max_wait_after_it_arrived():
    # before: take() restarted the wait for the rest, so an item that arrived just after a batch
    # began filling could wait up to twice max_wait
    clock = FakeClock()
    b = Batcher(max_batch=2, max_wait_ms=10, clock=clock)
    b.add("a")
    clock.t += 0.006
    b.add("b")
    b.add("c")  # arrives at 6 ms, behind a full batch
    clock.t += 0.003  # the loop takes the full batch 9 ms in
    assert b.take() == ["a", "b"]
    assert not b.ready() and b.time_left_ms() == pytest.approx(7.0)
    clock.t += 0.007
    assert b.ready()
    assert b.take() == ["c"]
    assert len(b) == 0 and b.time_left_ms() == pytest.approx(10.0)


def test_take_where_removes_items_of_revoked_partitions():
    b = Batcher(max_batch=10, max_wait_ms=10, clock=FakeClock())
    for item in [("p0", 1), ("p1", 2), ("p0", 3)]:
        b.add(item)
    dropped = b.take_where(lambda it: it[0] != "p0")
    assert dropped == [("p0", 1), ("p0", 3)]
    assert b.take() == [("p1", 2)]


def test_after_take_where_the_wait_is_the_oldest_kept_items():
    clock = FakeClock()
    b = Batcher(max_batch=10, max_wait_ms=10, clock=clock)
    b.add(("p0", 1))
    clock.t += 0.004
    b.add(("p1", 2))
    clock.t += 0.004
    b.take_where(lambda it: it[0] != "p0")
    assert b.time_left_ms() == pytest.approx(6.0)  # p1's item arrived 4 ms ago


def test_batcher_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        Batcher(max_batch=0, max_wait_ms=10)


# --- event parsing -------------------------------------------------------------------------

GOOD = {"post_id": "p1", "image_b64": "aGVsbG8=", "posted_at": "2026-11-24T10:00:00Z"}


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("2099-12-31T23:59:59.999999Z", datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2026-11-24 11:30:00+01:30", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24t10:00:00.5z", datetime(2026, 11, 24, 10, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_rfc3339_variants_within_range_parse(text, expected):
    assert parse_event(_raw({**GOOD, "posted_at": text}), 10_000).posted_at == expected


def test_valid_event_parses_with_optional_fields_and_ignores_unknown_ones():
    ev = parse_event(_raw({**GOOD, "city": "Lyon", "lang": "fr", "extra": [1]}), 10_000)
    assert ev.post_id == "p1" and ev.city == "Lyon"
    assert ev.posted_at == datetime(2026, 11, 24, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\xff\xfe{", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "schema"),
        (b"null", "schema"),
        (None, "schema"),
        (b"[" * 400 + b"]" * 400, "invalid_json"),
        (_raw({**GOOD, "post_id": ""}), "schema"),
        (_raw({**GOOD, "post_id": "x" * 129}), "schema"),
        (_raw({**GOOD, "post_id": 7}), "schema"),
        (_raw({k: v for k, v in GOOD.items() if k != "posted_at"}), "schema"),
        (_raw({**GOOD, "posted_at": "2026-11-24T10:00:00"}), "schema"),
        (_raw({**GOOD, "posted_at": 1732442400}), "schema"),
        (_raw({**GOOD, "posted_at": "yesterday"}), "schema"),
        # not RFC 3339, though pydantic alone would take them
        (_raw({**GOOD, "posted_at": "1732442400"}), "schema"),
        (_raw({**GOOD, "posted_at": "1732442400.5"}), "schema"),
        (_raw({**GOOD, "posted_at": "2026-11-24T10:00Z"}), "schema"),
        # Go's zero time and the datetime edges: they overflow trend bucket arithmetic
        (_raw({**GOOD, "posted_at": "0001-01-01T00:00:00Z"}), "schema"),
        (_raw({**GOOD, "posted_at": "0001-01-01T00:00:00+01:00"}), "schema"),
        (_raw({**GOOD, "posted_at": "9999-12-31T23:59:59-01:00"}), "schema"),
        (_raw({**GOOD, "posted_at": "1969-12-31T23:59:59Z"}), "schema"),
        (_raw({**GOOD, "posted_at": "2100-01-01T00:00:00Z"}), "schema"),
        (_raw({**GOOD, "image_url": "https://example.com/a.jpg"}), "schema"),
        (_raw({"post_id": "p", "posted_at": GOOD["posted_at"]}), "schema"),
        (b'{"post_id": "a", ' + b'"pad": "' + b"x" * 2000 + b'"}', "too_large"),
    ],
)
def test_bad_events_get_their_error_kind(raw, kind):
    with pytest.raises(PostError) as info:
        parse_event(raw, 1024)
    assert info.value.kind == kind
    assert info.value.reason


def test_brackets_inside_strings_do_not_count_as_nesting():
    ev = parse_event(_raw({**GOOD, "platform": "[[[[[[[[[[[[[[[[[[[[[[[[["}), 10_000)
    assert ev.platform.startswith("[[")
    escaped = parse_event(_raw({**GOOD, "lang": '\\"[[[[[[[[[[[[[[[[[[[["', "city": "x"}), 10_000)
    assert escaped.city == "x"


def _nested(depth: int) -> bytes:
    """An event whose ``extra`` field nests ``depth - 1`` lists inside the top-level object."""
    return _raw({**GOOD, "extra": json.loads("[" * (depth - 1) + "]" * (depth - 1))})


def test_nesting_up_to_the_limit_parses_and_one_more_level_is_refused():
    assert parse_event(_nested(MAX_JSON_DEPTH), 10_000).post_id == "p1"
    with pytest.raises(PostError) as info:
        parse_event(_nested(MAX_JSON_DEPTH + 1), 10_000)
    assert info.value.kind == "invalid_json"


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_nesting_past_the_recursion_limit_is_refused_in_a_decode_thread(opener):
    # 200,000 levels: json.loads gives up at the interpreter's recursion limit; in a pool
    # thread (where the worker parses) that must be the same clean refusal, not a crash
    closer = "]" if opener == "[" else "}"
    text = '{"post_id": "p1", "extra": ' + opener * 200_000 + "1" + closer * 200_000 + "}"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(parse_event, text.encode(), 10_000_000)
        with pytest.raises(PostError) as info:
            future.result()
    assert info.value.kind == "invalid_json"
    assert f"deeper than {MAX_JSON_DEPTH}" in info.value.reason


def test_many_shallow_brackets_are_not_mistaken_for_deep_nesting():
    # more opening brackets than the limit (so the token scan runs), but never deeper than 2
    ev = parse_event(_raw({**GOOD, "extra": [[i] for i in range(50)]}), 10_000)
    assert ev.post_id == "p1"


def test_values_past_the_limit_are_refused_and_the_walk_stops_there():
    wide = _raw({**GOOD, "extra": [[] for _ in range(MAX_JSON_VALUES)]})
    with pytest.raises(PostError) as info:
        parse_event(wide, len(wide))
    assert (
        info.value.kind == "invalid_json" and f"over {MAX_JSON_VALUES} values" in info.value.reason
    )
    assert parse_event(_raw({**GOOD, "extra": list(range(MAX_JSON_VALUES // 2))}), 10**6)


def test_a_flood_of_empty_arrays_is_refused_without_being_built():
    # 2 MB of [[],[],...] is 700,000 lists (~45 MB) that a parse-then-check builds before it
    # counts them (a 10 MB post: 270 MB and 3.5 s of the GIL); the values are counted while the
    # text is parsed, and the parse stops at the limit
    raw = b'{"x":[' + b"[]," * (2 * 1024 * 1024 // 3) + b"[]]}"
    tracemalloc.start()
    try:
        with pytest.raises(PostError) as info:
            parse_event(raw, len(raw))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind == "invalid_json"
    assert f"over {MAX_JSON_VALUES} values" in info.value.reason
    assert peak < 3 * len(raw)  # the decoded text and at most MAX_JSON_VALUES values


def test_commas_and_brackets_inside_strings_are_not_values():
    # the count is exact, not a byte estimate: a field of punctuation is one value
    punctuation = "[{,}]" * (3 * MAX_JSON_VALUES)
    event = parse_event(_raw({**GOOD, "caption": punctuation, "city": ",[{" * 40}), 10**6)
    assert event.post_id == "p1" and event.city == ",[{" * 40


@pytest.mark.parametrize(
    "number",
    ["1\u0661", "-\u0661", "0\u0661", "1.\u0661", "1e\u0661", "01", "1.", "-", "+1", ".5"],
)
def test_numbers_are_json_numbers_in_ascii_digits(number):
    # Python's own pure-Python scanner reads 1 followed by an Arabic-Indic one as 11
    text = _raw(GOOD)[:-1] + b', "n": ' + number.encode().decode("unicode_escape").encode() + b"}"
    with pytest.raises(PostError) as info:
        parse_event(text, 10_000)
    assert info.value.kind == "invalid_json"


@pytest.mark.parametrize("digits", [4299, 4301, 100_000])
def test_a_long_integer_in_an_ignored_field_is_still_json(digits):
    # valid JSON: Python's int() refuses strings past 4300 digits, which dead-lettered the post
    # as invalid_json with advice to change an interpreter setting
    text = _raw(GOOD)[:-1] + b', "ext_id": -' + b"9" * digits + b"}"
    assert parse_event(text, 10**6).post_id == GOOD["post_id"]


def test_a_byte_order_mark_before_the_json_is_ignored():
    # RFC 8259 lets a parser ignore one, Windows tools write one, and `produce --jsonl` reads
    # it (json.loads): the two must agree
    raw = "\ufeff".encode() + _raw(GOOD)
    assert json.loads(raw)["post_id"] == parse_event(raw, 10_000).post_id == GOOD["post_id"]
    with pytest.raises(PostError) as info:  # one mark, not any number of them
        parse_event("\ufeff".encode() * 2 + _raw(GOOD), 10_000)
    assert info.value.kind == "invalid_json"


def _frames_kept(error: BaseException) -> list:
    """Every frame that the error keeps alive through its traceback, or through the
    tracebacks of the exceptions it was raised from (with their locals: the post's text,
    its parsed value, its image)."""
    frames, todo, seen = [], [error], set()
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        todo += [exc.__context__, exc.__cause__]
    return frames


_BIG = "A" * 2_000_000


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (
            _raw({**GOOD, "extra": [[] for _ in range(MAX_JSON_VALUES)], "pad": _BIG}),
            "invalid_json",
        ),
        (_raw({"post_id": "p1", "image_b64": _BIG, "posted_at": "yesterday"}), "schema"),
        (
            _raw({**GOOD, "image_b64": base64.b64encode(b"x" * 1_500_000).decode() + " "}),
            "bad_base64",
        ),
        (
            _raw({**GOOD, "image_b64": base64.b64encode(b"not an image" * 99).decode()}),
            "not_an_image",
        ),
    ],
)
def test_a_dead_letters_error_keeps_no_frame_of_its_post_alive(raw, kind):
    # the error is kept until the batch is delivered: a traceback would keep the text, the
    # parsed value and the image bytes of every frame it passed through
    prep = prepare(raw, PreprocessSpec(resize=40, crop=32), UrlPolicy(enabled=False), 10**7)
    assert prep.error is not None and prep.error.kind == kind
    assert _frames_kept(prep.error) == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # which post_id would win depends on the parser: refuse rather than guess
        ('{"post_id": "a", "post_id": "b", "image_b64": "x", "posted_at": "%s"}', "'post_id'"),
        ('{"post_id": "a", "image_b64": "x", "posted_at": "%s", "m": {"k": 1, "k": 2}}', "'k'"),
        ('{"post_id": "a", "image_b64": "x", "posted_at": "%s", "score": NaN}', "NaN"),
        ('{"post_id": "a", "image_b64": "x", "posted_at": "%s", "score": -Infinity}', "Infinity"),
    ],
)
def test_duplicate_keys_and_non_standard_constants_are_not_json(text, needle):
    with pytest.raises(PostError) as info:
        parse_event((text % GOOD["posted_at"]).encode(), 10_000)
    assert info.value.kind == "invalid_json" and needle in info.value.reason


def test_a_leap_second_is_read_as_the_second_before():
    ev = parse_event(_raw({**GOOD, "posted_at": "2016-12-31T23:59:60.5Z"}), 10_000)
    assert ev.posted_at == datetime(2016, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)
    ev = parse_event(_raw({**GOOD, "posted_at": "2017-01-01 00:59:60+01:00"}), 10_000)
    assert ev.posted_at == datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)
    for elsewhere in (
        "2026-01-01T12:34:60Z",
        "2016-12-31T23:59:60+00:30",
        "0001-01-01T00:59:60+01:00",
    ):
        with pytest.raises(PostError) as info:
            parse_event(_raw({**GOOD, "posted_at": elsewhere}), 10_000)
        assert info.value.kind == "schema"


def test_a_fraction_of_any_length_is_rfc_3339():
    # time-secfrac is "." 1*DIGIT: ten digits (a 100 ps clock) was dead-lettered as schema
    for text, micros in (
        ("2026-01-01T00:00:00.1234567891Z", 123_456),
        ("2026-01-01T00:00:00.9999999999999999Z", 999_999),
        ("2026-01-01T00:00:00." + "5" * 200 + "+00:00", 555_555),
    ):
        ev = parse_event(_raw({**GOOD, "posted_at": text}), 10_000)
        assert ev.posted_at == datetime(2026, 1, 1, 0, 0, 0, micros, tzinfo=UTC)
    for bad in ("2026-01-01T00:00:00.Z", "2026-01-01T00:00:00.12a4Z"):
        with pytest.raises(PostError) as info:
            parse_event(_raw({**GOOD, "posted_at": bad}), 10_000)
        assert info.value.kind == "schema" and "not an RFC 3339 timestamp" in info.value.reason


# --- post-processing -----------------------------------------------------------------------


def test_softmax_is_stable_for_large_fp16_like_logits():
    p = softmax(np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32))
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0)
    assert p[0, 0] > p[0, 1] > p[0, 2]


def test_classify_orders_top_k_and_flags_low_confidence():
    logits = np.array([[0.0, 3.0, 1.0], [0.0, 0.0, 0.1]], dtype=np.float32)
    out = classify(logits, top_k=2, min_confidence=0.5)
    assert [i for i, _ in out[0].top_k] == [1, 2]
    assert out[0].index == 1 and not out[0].low_confidence
    assert out[1].index == 2 and out[1].low_confidence
    assert out[0].confidence == pytest.approx(softmax(logits)[0, 1])


def test_classify_caps_k_at_the_number_of_classes_and_rejects_nan():
    assert len(classify(np.zeros((1, 2), np.float32), 5, 0.1)[0].top_k) == 2
    with pytest.raises(ValueError):
        classify(np.array([[np.nan, 1.0]], np.float32), 1, 0.1)


# --- dead letters --------------------------------------------------------------------------


def test_dlq_headers_round_trip_and_carry_the_source_position():
    headers = dlq_headers(PostError("bad_base64", "invalid padding"), "car-posts", 3, 42, "w-1")
    assert all(isinstance(v, bytes) for _, v in headers)
    parsed = parse_dlq_headers(headers)
    assert parsed == {
        "error_kind": "bad_base64",
        "error_reason": "invalid padding",
        "source_topic": "car-posts",
        "source_partition": "3",
        "source_offset": "42",
        "worker_id": "w-1",
    }


# --- outputs of a batch --------------------------------------------------------------------


def _manifest() -> Manifest:
    return tiny_manifest()


def test_make_outputs_builds_results_dead_letters_and_trend_records():
    settings = WorkerSettings(worker_id="w-9", min_confidence=0.6, top_k=2)
    good = parse_event(_raw({**GOOD, "city": "Lyon"}), 10_000)
    bad_raw = b"\xffnot utf8"
    batch = [
        Pending(Rec("t", 0, 5, b"p1", _raw(GOOD)), 0.0, DoneFuture(None)),
        Pending(Rec("t", 1, 9, None, bad_raw), 0.0, DoneFuture(None)),
    ]
    prepared = [
        Prepared(good, np.zeros((3, 2, 2), np.float32), None, 0.01),
        Prepared(None, None, PostError("invalid_utf8", "not UTF-8 at byte 0"), 0.0),
    ]
    logits = {0: np.array([0.0, 5.0], np.float32)}
    results, dead, trends = make_outputs(batch, prepared, logits, _manifest(), settings)

    assert len(results) == 1
    key, value = results[0]
    pred = Prediction.model_validate_json(value)
    assert key == b"p1" and pred.make == "BMW" and pred.model == "X5"
    assert pred.status == "ok" and pred.model_version == "v1"
    assert [(e.make, e.model) for e in pred.top_k] == [("BMW", "X5"), ("Audi", "A4")]
    assert (pred.source.topic, pred.source.partition, pred.source.offset) == ("t", 0, 5)
    assert pred.worker_id == "w-9" and pred.city == "Lyon"

    assert len(dead) == 1
    dkey, dvalue, headers = dead[0]
    assert dvalue == bad_raw and dkey is None
    assert parse_dlq_headers(headers)["error_kind"] == "invalid_utf8"

    by_offset = {t.offset: t for t in trends}
    assert by_offset[5].make == "BMW" and by_offset[5].city == "Lyon"
    assert not by_offset[5].low_confidence
    assert by_offset[9].make is None  # dead letter: advances the position, counts nothing


def test_dead_letters_keep_the_original_headers_but_not_old_carstream_ones():
    old_verdict = dlq_headers(PostError("schema", "old"), "car-posts", 0, 1, "w-old")
    headers = [("trace-id", b"abc"), ("empty", None), *old_verdict]
    batch = [Pending(Rec("t", 0, 3, b"k", b"{", headers), 0.0, DoneFuture(None))]
    prepared = [Prepared(None, None, PostError("invalid_json", "not JSON"), 0.0)]
    _, dead, _ = make_outputs(batch, prepared, {}, _manifest(), WorkerSettings(worker_id="w-2"))
    (_, _, sent) = dead[0]
    assert sent[:2] == [("trace-id", b"abc"), ("empty", b"")]  # the producer refuses None
    assert [k for k, _ in sent].count("carstream.error_kind") == 1
    parsed = parse_dlq_headers(sent)
    assert parsed["error_kind"] == "invalid_json" and parsed["worker_id"] == "w-2"


def test_a_non_finite_logit_row_is_a_dead_letter_and_the_rest_are_classified():
    settings = WorkerSettings()
    ev = parse_event(_raw(GOOD), 10_000)
    batch = [
        Pending(Rec("t", 0, off, b"p1", _raw(GOOD)), 0.0, DoneFuture(None)) for off in (1, 2, 3)
    ]
    prepared = [Prepared(ev, np.zeros(1, np.float32), None, 0.0)] * 3
    logits = {
        0: np.array([0.0, 5.0], np.float32),
        1: np.array([np.inf, 0.0], np.float32),  # an FP16 engine overflowed
        2: np.array([np.nan, 1.0], np.float32),
    }
    results, dead, trends = make_outputs(batch, prepared, logits, _manifest(), settings)
    assert [Prediction.model_validate_json(v).source.offset for _, v in results] == [1]
    assert len(dead) == 2
    for _, _, headers in dead:
        parsed = parse_dlq_headers(headers)
        assert parsed["error_kind"] == "internal" and "non-finite" in parsed["error_reason"]
    assert [t.make for t in sorted(trends, key=lambda t: t.offset)] == ["BMW", None, None]


def test_low_confidence_result_is_flagged():
    settings = WorkerSettings(min_confidence=0.99)
    ev = parse_event(_raw(GOOD), 10_000)
    batch = [Pending(Rec("t", 0, 1, b"p1", _raw(GOOD)), 0.0, DoneFuture(None))]
    prepared = [Prepared(ev, np.zeros(1, np.float32), None, 0.0)]
    results, _, trends = make_outputs(
        batch, prepared, {0: np.array([0.0, 0.1], np.float32)}, _manifest(), settings
    )
    assert json.loads(results[0].value)["status"] == "low_confidence"
    assert results[0].status == "low_confidence"
    assert trends[0].low_confidence


def test_commit_offsets_are_next_offset_per_partition():
    batch = [Pending(Rec("t", 0, o, None, b""), 0.0, DoneFuture(None)) for o in (4, 7, 5)] + [
        Pending(Rec("t", 2, 0, None, b""), 0.0, DoneFuture(None))
    ]
    offsets = {(tp.partition, om.offset) for tp, om in commit_offsets(batch).items()}
    assert offsets == {(0, 8), (2, 1)}


def test_secrets_never_appear_in_redacted_settings_or_repr():
    # a password in the URL and redis_password together are refused: one of each
    kafka = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "u",
        "sasl_password": "hunter2",
    }
    in_url = WorkerSettings(**kafka, redis_url="redis://:topsecret@127.0.0.1:6380/0")
    apart = WorkerSettings(**kafka, redis_password="alsosecret")
    text = "".join(json.dumps(s.redacted()) + repr(s) + str(s) for s in (in_url, apart))
    for secret in ("hunter2", "topsecret", "alsosecret"):
        assert secret not in text


def test_kafka_security_settings_reach_the_client_config():
    from worker.connections import kafka_common_config

    s = WorkerSettings(
        bootstrap_servers="b1:9093, b2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="carstream",
        sasl_password="hunter2",
        ssl_cafile="/etc/ca.crt",
    )
    config = kafka_common_config(s)
    assert config["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "carstream"
    assert config["sasl_plain_password"] == "hunter2"  # unwrapped only here, for the client
    assert config["ssl_cafile"] == "/etc/ca.crt" and config["ssl_check_hostname"] is True
    plain = kafka_common_config(WorkerSettings())
    assert "sasl_mechanism" not in plain and "ssl_cafile" not in plain


def test_sasl_without_mechanism_or_credentials_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sasl_mechanism"):
        WorkerSettings(security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="sasl_username"):
        WorkerSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN")


def test_a_reason_quoting_raw_bytes_is_printable_and_encodes_as_utf8():
    error = PostError("url_fetch_failed", "status line: \x00\x10JFIF\x1b[2J\n\ud800 " + "x" * 600)
    assert error.reason.isprintable() and len(error.reason) == 500
    assert error.reason.startswith("status line: \\x00\\x10JFIF\\x1b[2J\\n\\ud800 ")
    error.reason.encode("utf-8")  # a DLQ header value: a lone surrogate would not encode
    assert PostError("schema", "posted_at: bad").reason == "posted_at: bad"
