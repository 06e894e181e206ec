"""A fresh worker's /metrics already has every labelled counter series at 0, so an `increase()`
alert sees the first retry, dead letter or result, and a new lag/commit-time gauge is there."""

from __future__ import annotations

from typing import get_args

from prometheus_client import generate_latest

from worker.errors import ErrorKind
from worker.metrics import WorkerMetrics


def test_a_fresh_worker_exposes_each_known_label_value_at_zero():
    metrics = WorkerMetrics()
    value = metrics.registry.get_sample_value
    for status in ("ok", "low_confidence"):
        assert value("carstream_results_total", {"status": status}) == 0
    kinds = get_args(ErrorKind)
    assert "corrupt_record" in kinds and "too_large" in kinds
    for kind in kinds:
        assert value("carstream_dead_letters_total", {"kind": kind}) == 0
        assert value("carstream_dead_letters_dropped_total", {"kind": kind}) == 0
    for target in ("kafka", "redis"):
        assert value("carstream_retries_total", {"target": target}) == 0
    text = generate_latest(metrics.registry).decode()
    assert 'carstream_retries_total{target="redis"} 0.0' in text


def test_the_last_commit_time_starts_at_the_workers_start_and_the_help_texts_say_what_they_count():
    metrics = WorkerMetrics()
    # the start stands for a commit: a worker that has not committed yet is not stuck for ever
    assert metrics.registry.get_sample_value("carstream_last_commit_timestamp_seconds") > 0
    text = generate_latest(metrics.registry).decode()
    assert "records already counted" not in text  # a recreated topic's records never were
    assert "# HELP carstream_lag records of the partition not committed yet" in text
