"""Dead-letter records: the original bytes, unchanged, with headers that say why."""

from __future__ import annotations

from worker.errors import PostError

HEADER_PREFIX = "carstream."


# on a dead letter whose original had neither key nor value, sent with an empty value
VALUE_NULL_HEADER = HEADER_PREFIX + "value_null"


def dlq_headers(
    error: PostError, topic: str, partition: int, offset: int, worker_id: str
) -> list[tuple[str, bytes]]:
    """Kafka headers for a dead-lettered record (all UTF-8 strings)."""
    values = {
        "error_kind": error.kind,
        "error_reason": error.reason,
        "source_topic": topic,
        "source_partition": str(partition),
        "source_offset": str(offset),
        "worker_id": worker_id,
    }
    return [(HEADER_PREFIX + k, v.encode("utf-8", "replace")) for k, v in values.items()]


def parse_dlq_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The inverse, for readers and tests: ``{"error_kind": ..., ...}``."""
    return {
        k[len(HEADER_PREFIX) :]: v.decode("utf-8", "replace")
        for k, v in headers or []
        if k.startswith(HEADER_PREFIX)
    }
