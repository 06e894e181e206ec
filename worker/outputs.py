"""A classified batch as what the worker sends: results, dead letters and trend records.

Pure: ``make_outputs`` takes the batch, its decodes and the engine's logits and returns the
records to publish and to count, with no broker or Redis in reach, so every rule about what a
post becomes (a result, a dead letter with its reason, a count or none) is tested on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from engine_build.manifest import Manifest
from worker.dead_letter import HEADER_PREFIX, VALUE_NULL_HEADER, dlq_headers
from worker.errors import RETRYABLE_KINDS, PostError
from worker.postprocess import classify
from worker.prepare import Prepared
from worker.schemas import Prediction, Source, TopKEntry
from worker.settings import WorkerSettings
from worker.trend_keys import TrendRecord


@dataclass
class Pending:
    """A consumed record whose decode is running in the pool."""

    record: Any  # kafka ConsumerRecord
    received: float  # time.monotonic() at poll
    prepared: Future[Prepared]


@dataclass(frozen=True)
class Result:
    """One result to publish, with its status for the metrics (never read back from the JSON)."""

    key: bytes
    value: bytes
    status: str  # "ok" or "low_confidence"

    def __iter__(self):
        """Unpacks as the (key, value) pair it replaced."""
        return iter((self.key, self.value))


def original_headers(record: Any) -> list[tuple[str, bytes]]:
    """The headers a dead letter keeps from its record: all but ``carstream.*`` ones (a replayed
    dead letter's old verdict would be mistaken for the new one). A null header value (legal in
    Kafka) becomes empty bytes: kafka-python's producer refuses None, and a refused dead letter
    must not stop the worker."""
    return [
        (k, b"" if v is None else v)
        for k, v in getattr(record, "headers", None) or []
        if not k.startswith(HEADER_PREFIX)
    ]


def make_outputs(
    batch: list[Pending],
    prepared: list[Prepared],
    logits: dict[int, np.ndarray],
    manifest: Manifest,
    settings: WorkerSettings,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[list[Result], list[tuple[bytes | None, bytes | None, list]], list[TrendRecord]]:
    """Pure: results, dead letters (key, original value, headers), trend records.

    ``logits`` maps a batch position to its row; positions missing from it have an error.
    """
    results: list[Result] = []
    dead: list[tuple[bytes | None, bytes | None, list]] = []
    trends: list[TrendRecord] = []
    # an engine that overflows (FP16) or a corrupt plan can return NaN/inf for some rows: those
    # posts become dead letters, and the rest of the batch is still classified
    non_finite = {i for i, row in logits.items() if not np.isfinite(row).all()}
    rows = sorted(set(logits) - non_finite)
    classified = (
        dict(
            zip(
                rows,
                classify(
                    np.stack([logits[i] for i in rows]), settings.top_k, settings.min_confidence
                ),
                strict=True,
            )
        )
        if rows
        else {}
    )
    classified_at = now()
    for pos, (item, prep) in enumerate(zip(batch, prepared, strict=True)):
        rec = item.record
        if pos not in classified:
            if pos in non_finite:
                error = PostError("internal", "engine returned non-finite logits (NaN or inf)")
            else:
                error = prep.error or PostError("internal", "no inference result")
            # a keyless tombstone: kafka-python sends no record without key and value, so it
            # goes with an empty value and a header that tells it from a producer's b""
            tombstone = rec.key is None and rec.value is None
            dead.append(
                (
                    rec.key,
                    b"" if tombstone else rec.value,
                    [
                        *original_headers(rec),
                        *dlq_headers(
                            error, rec.topic, rec.partition, rec.offset, settings.worker_id
                        ),
                        *([(VALUE_NULL_HEADER, b"1")] if tombstone else []),
                    ],
                )
            )
            trends.append(
                TrendRecord(
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    classified_at,
                    None,
                    None,
                    None,
                    retryable=error.kind in RETRYABLE_KINDS,
                )
            )
            continue
        event = prep.event
        c = classified[pos]
        label = manifest.labels[c.index]
        prediction = Prediction(
            post_id=event.post_id,
            make=label.make,
            model=label.model,
            confidence=round(c.confidence, 6),
            top_k=[
                TopKEntry(
                    make=manifest.labels[i].make, model=manifest.labels[i].model, score=round(s, 6)
                )
                for i, s in c.top_k
            ],
            status="low_confidence" if c.low_confidence else "ok",
            model_name=manifest.model_name,
            model_version=manifest.model_version,
            posted_at=event.posted_at,
            classified_at=classified_at,
            latency_ms=round((time.monotonic() - item.received) * 1000.0, 3),
            city=event.city,
            platform=event.platform,
            source=Source(topic=rec.topic, partition=rec.partition, offset=rec.offset),
            worker_id=settings.worker_id,
        )
        results.append(
            Result(event.post_id.encode(), prediction.model_dump_json().encode(), prediction.status)
        )
        trends.append(
            TrendRecord(
                rec.topic,
                rec.partition,
                rec.offset,
                event.posted_at,
                label.make,
                label.model,
                event.city,
                c.low_confidence,
                event.post_id,
            )
        )
    return results, dead, trends
