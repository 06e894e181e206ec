"""What the worker's own registry exposes beyond its counters: the runtime collectors, the
latency buckets a GPU's milliseconds need, and the age of a record when its outcome goes out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from worker.metrics import WorkerMetrics
from worker.pipeline import record_age


def _exposition(metrics: WorkerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_each_registry_exposes_the_process_and_python_collectors():
    """A registry of one's own leaves out process_resident_memory_bytes, which is how a pod
    near its memory limit is noticed; two workers in one process (tests) must not clash."""
    first, second = WorkerMetrics(), WorkerMetrics()
    for text in (_exposition(first), _exposition(second)):
        assert "\nprocess_resident_memory_bytes " in text
        assert "\npython_gc_objects_collected_total{" in text
        assert "\npython_info{" in text


def test_latency_buckets_resolve_sub_millisecond_times():
    metrics = WorkerMetrics()
    metrics.inference_seconds.observe(0.0003)  # a small TensorRT batch
    text = _exposition(metrics)
    assert 'carstream_inference_seconds_bucket{le="0.00025"} 0.0' in text
    assert 'carstream_inference_seconds_bucket{le="0.0005"} 1.0' in text


@pytest.mark.parametrize(
    ("stamp", "now", "age"),
    [
        (1_000_000, 1_010.5, 10.5),  # CreateTime 1,000 s, published at 1,010.5
        (1_000_000, 990.0, 0.0),  # up to a minute ahead: clock skew, read as fresh
        (1_000_000, 930.0, None),  # further ahead: a bogus producer timestamp
        (-1, 1_000.0, None),  # no timestamp (a message format before 0.10)
        (0, 1_000.0, None),
        (None, 1_000.0, None),
        (True, 1_000.0, None),
    ],
)
def test_record_age_reads_the_kafka_timestamp_and_ignores_missing_or_bogus_ones(stamp, now, age):
    assert record_age(SimpleNamespace(timestamp=stamp), now) == age


def test_a_pods_merged_metrics_keep_each_processes_runtime_figures():
    """The --processes supervisor labels every child's samples: the runtime collectors' too."""
    from prometheus_client.parser import text_string_to_metric_families

    from worker.supervisor import merge_expositions

    merged = merge_expositions(
        [("p0", _exposition(WorkerMetrics())), ("p1", _exposition(WorkerMetrics()))]
    )
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    rss = families["process_resident_memory_bytes"].samples
    assert sorted(s.labels["process"] for s in rss) == ["p0", "p1"]
