"""The pure rule for one failed send (worker.delivery.send_outcome), case by case, no producer."""

from __future__ import annotations

import pytest
from kafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

from worker.dead_letter import HEADER_PREFIX, dlq_headers, parse_dlq_headers
from worker.delivery import (
    DLQ_KEY_PREFIX_BYTES,
    SEND_RETRY_LIMIT,
    Outgoing,
    failed_for_good,
    send_outcome,
)
from worker.errors import PostError

DLQ = "posts.dlq"
OUT = "posts.results"


def dead_letter(key=b"post-1", value=b"x" * 100, extra=()) -> Outgoing:
    headers = [
        ("trace", b"abc"),
        *dlq_headers(PostError("bad_image", "not a JPEG"), "posts", 3, 42, "w-1"),
        *extra,
    ]
    return Outgoing(DLQ, key, value, headers)


def result(key=b"post-1", value=b"{}") -> Outgoing:
    return Outgoing(OUT, key, value, None)


@pytest.mark.parametrize(
    "error",
    [KafkaTimeoutError("no metadata"), NotLeaderForPartitionError(), ValueError("Partitioner")],
)
@pytest.mark.parametrize("make", [result, dead_letter])
def test_a_passing_error_is_retried_as_it_is(error, make):
    msg = make()
    outcome = send_outcome(msg, error, 0, False, DLQ)
    assert outcome.action == "retry" and outcome.record is msg


@pytest.mark.parametrize(
    "error", [TopicAuthorizationFailedError(), TypeError("what"), KafkaTimeoutError("no topic")]
)
def test_a_lasting_refusal_stops_the_worker_only_after_the_retry_limit(error):
    unknown = isinstance(error, KafkaTimeoutError)  # only with the broker answering without it
    msg = result()
    assert send_outcome(msg, error, SEND_RETRY_LIMIT - 1, unknown, DLQ).action == "retry"
    outcome = send_outcome(msg, error, SEND_RETRY_LIMIT, unknown, DLQ)
    assert outcome.action == "fatal"
    assert f"sends to {OUT} still fail after {SEND_RETRY_LIMIT + 1} tries" in outcome.reason
    assert ("create it" in outcome.reason) is unknown


def test_an_outage_is_retried_past_the_retry_limit():
    outcome = send_outcome(result(), NotLeaderForPartitionError(), 50, False, DLQ)
    assert outcome.action == "retry"


@pytest.mark.parametrize("error", [MessageSizeTooLargeError(), RecordListTooLargeError()])
def test_a_result_too_large_stops_the_worker_at_once(error):
    outcome = send_outcome(result(value=b"v" * 300), error, 0, False, DLQ)
    assert outcome.action == "fatal"
    assert "a result of 306 bytes is too large for posts.results" in outcome.reason
    assert "max.message.bytes" in outcome.reason


def test_a_result_refused_for_what_it_is_stops_the_worker_at_once():
    outcome = send_outcome(result(value="text"), TypeError("not bytes"), 0, False, DLQ)
    assert outcome.action == "fatal"
    assert outcome.reason.startswith("a result cannot be sent: value of type str")


def test_a_dead_letter_too_large_is_cut_down_step_by_step_then_dropped():
    msg = dead_letter(key=b"k" * (DLQ_KEY_PREFIX_BYTES + 10), value=b"v" * 5000)
    first = send_outcome(msg, MessageSizeTooLargeError(), 0, False, DLQ)
    assert first.action == "resend" and first.record.value == b""
    assert "posts/3@42" in first.reason and "without its value" in first.reason
    assert dict(first.record.headers)[HEADER_PREFIX + "original_size"] == b"5000"
    second = send_outcome(first.record, MessageSizeTooLargeError(), 1, False, DLQ)
    assert second.action == "resend" and "key and headers cut" in second.reason
    cut = second.record
    assert cut.key == msg.key[:DLQ_KEY_PREFIX_BYTES]
    assert "trace" not in dict(cut.headers)  # the original record's headers go
    assert parse_dlq_headers(cut.headers)["source_offset"] == "42"  # its own verdict stays
    last = send_outcome(cut, MessageSizeTooLargeError(), 2, False, DLQ)
    assert last.action == "drop" and last.record is None
    assert "posts/3@42" in last.reason and "dropped" in last.reason


def test_a_dead_letter_refused_for_what_it_is_goes_without_what_is_refused():
    msg = dead_letter(extra=[("bad", "not bytes"), (b"name", b"v")])
    outcome = send_outcome(msg, TypeError("header"), 0, False, DLQ)
    assert outcome.action == "resend"
    assert "2 header(s) not (UTF-8 str, bytes) pairs" in outcome.reason
    headers = dict(outcome.record.headers)
    assert "bad" not in headers and headers["trace"] == b"abc"
    assert HEADER_PREFIX + "send_refused" in headers
    assert outcome.record.value == msg.value


def test_a_type_error_with_nothing_refused_is_a_metadata_race_and_retried():
    outcome = send_outcome(dead_letter(), TypeError("sorted(None)"), 0, False, DLQ)
    assert outcome.action == "retry"


def test_failed_for_good_names_the_one_refused_record_by_where_it_came_from():
    one = failed_for_good(MessageSizeTooLargeError(), [dead_letter()], OUT, DLQ)
    assert "posts.dlq refuses the dead letter of posts/3@42 (bad_image, key 'post-1')" in one
    assert "max.message.bytes" in one
    many = failed_for_good(ValueError("x"), [result(), dead_letter()], OUT, DLQ)
    assert "posts.dlq, posts.results refused one of the 2 records not delivered" in many
    assert "max.message.bytes" not in many
