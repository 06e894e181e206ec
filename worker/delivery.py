"""What the worker publishes, and what it does with a send that failed.

Pure rules around kafka-python's producer, kept apart from the loop that drives it: which
records ``KafkaProducer.send`` refuses for what they are (``Outgoing.refused``), how a dead
letter too large for its topic is cut down (``Outgoing.smaller``), when a producer has failed for
good (``producer_failure``), and, for one failed send, whether to retry it, resend it smaller,
drop it or stop the worker (``send_outcome``). The loop in ``worker.pipeline`` sends, waits and
retries; these decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidTxnStateError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)

from worker.dead_letter import HEADER_PREFIX, parse_dlq_headers

TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# What kafka-python 3.0's KafkaProducer.send raises, besides KafkaError, before a record is
# queued: TypeError or ValueError for a record it refuses for what it is (``Outgoing.refused``
# mirrors those checks), and also for a record it would take, when a metadata refresh on the
# sender thread drops the topic between send's metadata check and its partitioner
# ("Partitioner did not assign a partition", "Topic ... not found in ClusterMetadata", or
# ``sorted(None)`` in DefaultPartitioner); IndexError / ZeroDivisionError when the topic's
# metadata lists no partitions (``random.choice([])``, ``idx %= 0``). Only a refused record is
# permanent; the rest is retried like a KafkaError.
SEND_REFUSALS = (TypeError, ValueError, IndexError, ZeroDivisionError)
# the types KafkaProducer.send takes for a serialized key or value (exact types, not subclasses)
BYTES_LIKE = (bytes, bytearray, memoryview, type(None))
# a dead letter still too large without its value keeps this much of its key (a post_id key,
# at most 128 characters, always fits whole)
DLQ_KEY_PREFIX_BYTES = 512


def sendable_header(item: Any) -> bool:
    """Whether KafkaProducer.send takes this header: a (str, bytes) tuple whose name encodes as
    UTF-8 (kafka-python encodes it when sizing the record; a lone surrogate cannot be)."""
    if not (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], bytes)
    ):
        return False
    try:
        item[0].encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sendable_headers(headers: Any) -> list[tuple[str, bytes]]:
    """The headers of ``headers`` that KafkaProducer.send takes (none when it is not a list)."""
    if not isinstance(headers, list | tuple):
        return []
    return [h for h in headers if sendable_header(h)]


@dataclass(frozen=True)
class Outgoing:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list | None

    def smaller(self) -> Outgoing | None:
        """The next smaller form of a dead letter the DLQ topic refused as too large.

        First without its value; then also with its key cut to ``DLQ_KEY_PREFIX_BYTES`` and
        without the original record's headers; each step adds headers saying what was left out.
        None when nothing is left to cut.
        """
        headers = list(self.headers or [])
        if self.value:
            note = [
                (HEADER_PREFIX + "value_omitted", b"too large for the dead-letter topic"),
                (HEADER_PREFIX + "original_size", str(len(self.value)).encode()),
            ]
            # b"", not None: a keyless record needs a value (kafka-python refuses neither)
            return Outgoing(self.topic, self.key, b"", [*headers, *note])
        own = [(k, v) for k, v in headers if k.startswith(HEADER_PREFIX)]
        long_key = self.key is not None and len(self.key) > DLQ_KEY_PREFIX_BYTES
        if not long_key and len(own) == len(headers):
            return None
        note = []
        key = self.key
        if long_key:
            note += [
                (HEADER_PREFIX + "key_truncated", b"too large for the dead-letter topic"),
                (HEADER_PREFIX + "original_key_size", str(len(self.key)).encode()),
            ]
            key = self.key[:DLQ_KEY_PREFIX_BYTES]
        if len(own) < len(headers):
            note.append((HEADER_PREFIX + "headers_omitted", str(len(headers) - len(own)).encode()))
        return Outgoing(self.topic, key, b"", [*own, *note])

    def refused(self) -> list[str]:
        """What of this record KafkaProducer.send refuses for what it is, whatever the broker
        (kafka-python 3.0 ``kafka/producer/kafka.py`` send: key and value both None, headers
        not a list of (str, bytes) tuples, a key or value not bytes; a header name that is not
        UTF-8 in its record sizing). Empty when it refuses nothing: a TypeError or ValueError
        it raises then came from elsewhere (a metadata change) and is worth a retry."""
        problems = []
        if self.headers is not None:
            if not isinstance(self.headers, list):
                problems.append(f"headers of type {type(self.headers).__name__}")
            else:
                bad = len(self.headers) - len(sendable_headers(self.headers))
                if bad:
                    problems.append(f"{bad} header(s) not (UTF-8 str, bytes) pairs")
        if type(self.key) not in BYTES_LIKE:
            problems.append(f"key of type {type(self.key).__name__}")
        if type(self.value) not in BYTES_LIKE:
            problems.append(f"value of type {type(self.value).__name__}")
        if self.key is None and self.value is None:
            problems.append("neither key nor value")
        return problems

    def sendable(self, error: BaseException) -> Outgoing | None:
        """This dead letter without what KafkaProducer.send refuses of it (``refused``), with a
        ``carstream.send_refused`` header saying what was left out and why; None when it
        refuses nothing of it. The value, and every header it takes, still go."""
        problems = self.refused()
        if not problems:
            return None
        key = self.key if type(self.key) in BYTES_LIKE else None
        value = self.value if type(self.value) in BYTES_LIKE else b""
        if key is None and value is None:
            value = b""  # kafka-python sends no record without both
        reason = f"{type(error).__name__}: {error}; left out: {', '.join(problems)}"[:500]
        note = (HEADER_PREFIX + "send_refused", reason.encode("utf-8", "replace"))
        return Outgoing(self.topic, key, value, [*sendable_headers(self.headers), note])


# send errors that retrying rarely ends: no write ACL on an output topic, or the errors that
# leave kafka-python's idempotent producer failed for good (TransactionManager._FATAL_ERRORS).
# A topic authorization error from send's metadata wait leaves the producer healthy and can pass
# while ACLs or topics catch up with a deploy, so these stop the worker after SEND_RETRY_LIMIT
# rounds, not at once; a producer in its fatal state stops it at once (producer_failure).
PRODUCER_REFUSED = (
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    ProducerFencedError,
    InvalidTxnStateError,
)
# retry rounds (backoff 0.2 s doubling: ~3 s in all) before a refusal above, a TypeError or
# ValueError from send that Outgoing.refused cannot explain (a metadata race clears after one
# refresh; one that persists is a deleted topic or a bug), or a topic the broker answers without
# (connections.topic_unknown: a missing topic where the broker does not create topics), stops the
# worker
SEND_RETRY_LIMIT = 4


def delivered(future: Any) -> bool:
    """Whether a send's outcome (a future, or the error send raised) is a delivered record."""
    if isinstance(future, BaseException):
        return False
    try:
        future.get(timeout=0)
    except Exception:
        return False
    return True


def producer_failure(producer: Any) -> BaseException | None:
    """The error that left kafka-python's idempotent producer failed for good, or None.

    With ``enable_idempotence`` any error kafka-python will not retry moves its transaction
    manager to a fatal state: a broker's MessageSizeTooLarge for a one-record batch, an
    InvalidRecord, a missing IDEMPOTENT_WRITE ACL (surfacing as a plain KafkaError). From then on
    it fails every record with that same error, so the futures' errors no longer say which
    record was at fault, and only a new producer sends again. (``_transaction_manager`` is
    kafka-python 3.0's; a producer without one is never reported failed.)
    """
    manager = getattr(producer, "_transaction_manager", None)
    if manager is None or not manager.has_fatal_error():
        return None
    return manager.last_error or KafkaError("the producer is in its fatal error state")


def describe(msg: Outgoing, dlq_topic: str) -> str:
    """A record to send, as an operator finds it: a dead letter by the position of the post it
    is about, a result by its post_id."""
    key = (msg.key or b"")[:128].decode("utf-8", "replace")
    if msg.topic != dlq_topic:
        return f"the result for post_id {key!r}"
    kind = error_kind(msg.headers)
    return f"the dead letter of {origin(msg)} ({kind}, key {key!r})"


def error_kind(headers: Sequence[tuple[str, bytes]] | None) -> str:
    """The ``carstream.error_kind`` header of a dead letter (``internal`` when missing)."""
    kind = dict(sendable_headers(headers)).get("carstream.error_kind", b"internal")
    return kind.decode("utf-8", "replace")


def origin(msg: Outgoing) -> str:
    """Where the post a dead letter is about was read: ``topic/partition@offset``."""
    where = parse_dlq_headers(sendable_headers(msg.headers))
    return (
        f"{where.get('source_topic')}/{where.get('source_partition')}@{where.get('source_offset')}"
    )


@dataclass(frozen=True)
class SendOutcome:
    """What to do with one record whose send failed, and the line that says why.

    ``retry``: send ``record`` (the same one) again after the round's backoff. ``resend``: send
    ``record``, a cut-down form, next round (logged as a warning; no backoff needed for it alone).
    ``drop``: nothing of it can be sent (logged as an error, counted as a dropped dead letter).
    ``fatal``: stop the worker with ``reason``; retrying would keep the liveness probe green while
    nothing is delivered.
    """

    action: Literal["retry", "resend", "drop", "fatal"]
    record: Outgoing | None = None
    reason: str = ""


def send_outcome(
    msg: Outgoing, error: BaseException, attempt: int, topic_unknown: bool, dlq_topic: str
) -> SendOutcome:
    """The rule for a send of ``msg`` that failed with ``error`` in retry round ``attempt``.

    A dead letter too large for the DLQ topic (the producer's ``max_request_size``, or the
    broker's limit) is sent again without its value, then with its key cut short and without the
    original record's headers, with headers saying so: losing the bytes of an oversized bad post
    beats blocking its partition for ever. One still too large then (a DLQ topic that takes no
    more than a few hundred bytes) is dropped. A dead letter the producer refuses for what it is
    (``Outgoing.refused``: a header that is not a (str, bytes) pair, say) is sent again without
    what it refuses. A result too large for the results topic, or refused for what it is, is
    fatal: it would fail the same way for ever. So, after ``SEND_RETRY_LIMIT`` rounds, are an
    authorization refusal (``PRODUCER_REFUSED``), a TypeError/ValueError that ``refused`` cannot
    explain, and a topic the broker still answers without (``topic_unknown``). Every other error,
    including a TypeError or ValueError the producer raises for a record it would take (a
    metadata change under it, see ``SEND_REFUSALS``), is retried.
    """
    too_large = isinstance(error, TOO_LARGE)
    refused = msg.refused() if isinstance(error, SEND_REFUSALS) else []
    if attempt >= SEND_RETRY_LIMIT and (
        isinstance(error, PRODUCER_REFUSED)
        or (isinstance(error, SEND_REFUSALS) and not refused)
        or topic_unknown
    ):
        missing = (
            f"; the broker answers without topic {msg.topic}: create it" if topic_unknown else ""
        )
        return SendOutcome(
            "fatal",
            reason=f"sends to {msg.topic} still fail after {attempt + 1} tries: {error!r}{missing}",
        )
    if not too_large and not refused:
        return SendOutcome("retry", msg)
    size = len(msg.key or b"") + len(msg.value or b"") if too_large else 0
    if msg.topic != dlq_topic:
        if refused:
            return SendOutcome(
                "fatal", reason=f"a result cannot be sent: {', '.join(refused)} ({error})"
            )
        return SendOutcome(
            "fatal",
            reason=f"a result of {size} bytes is too large for {msg.topic} ({error}); "
            "raise the topic's max.message.bytes",
        )
    if refused:
        return SendOutcome(
            "resend",
            msg.sendable(error),
            f"dead letter of {origin(msg)} cannot be sent as it is "
            f"({type(error).__name__}: {error}); sending it without {', '.join(refused)}",
        )
    smaller = msg.smaller()
    if smaller is None:
        return SendOutcome(
            "drop",
            reason=f"dead letter of {origin(msg)} is too large for {msg.topic} even without its "
            f"value and original headers and with its key cut to {DLQ_KEY_PREFIX_BYTES} bytes "
            f"({error}); dropped",
        )
    cut = "without its value" if msg.value else "with its key and headers cut"
    return SendOutcome(
        "resend",
        smaller,
        f"dead letter of {origin(msg)} ({size} bytes) is too large for {msg.topic}; "
        f"sending it {cut}",
    )


def failed_for_good(
    failure: BaseException, undelivered: Sequence[Outgoing], output_topic: str, dlq_topic: str
) -> str:
    """Why the worker stops when the producer failed for good on ``undelivered`` (one record
    once they are sent one at a time: the one the topic refuses).

    A restart does not help by itself: it reads the same batch and sends the same record.
    """
    if len(undelivered) == 1:
        refused = f"{undelivered[0].topic} refuses {describe(undelivered[0], dlq_topic)}"
    elif undelivered:
        topics = ", ".join(sorted({m.topic for m in undelivered}))
        refused = f"{topics} refused one of the {len(undelivered)} records not delivered"
    else:
        refused = f"{output_topic} or {dlq_topic} refused a record"
    hint = (
        "; raise the topic's max.message.bytes to at least the worker's max_message_bytes"
        if isinstance(failure, TOO_LARGE)
        else ""
    )
    return (
        f"the Kafka producer failed for good: {refused} ({failure!r}){hint}; nothing of this "
        "batch is committed, and a restart reads the same batch and fails the same way until "
        "the topic accepts the record"
    )
