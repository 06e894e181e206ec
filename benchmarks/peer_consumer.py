"""The per-message peer: the consumer loop most teams write first, as the baseline to beat.

poll one record -> decode -> infer a batch of one -> produce its result and wait for the ack
-> count it in Redis -> commit that one offset. It uses the worker's own decoding,
preprocessing, engine and result schema, so the comparison isolates the loop itself.
Run by benchmarks/e2e_throughput.py with the worker's CARSTREAM_* environment.

It fetches like the worker (worker.run.consumer_config: fetch_max_wait_ms tied to max_wait_ms,
64 MiB per fetch, max_message_bytes per partition), so it does not lose on kafka-python's
defaults (500 ms fetch wait, 1 MiB per partition) that nobody would keep; ``--fetch
kafka-defaults`` puts those back. Its one engine runs on threads x engine_instances threads with
the worker's spinning setting unless ``--threads`` / ``--spinning`` say otherwise, so a best
peer can be measured as well as the first one. Each flag has an environment fallback
(PEER_FETCH, PEER_THREADS, PEER_SPINNING) for worker_ab.py's env-only configs, e.g.
``--config peer-1t:CMD=peer,PEER_THREADS=1,PEER_SPINNING=off``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from engine_build.bundle import load_bundle
from engine_build.runtime import create_engine
from worker.connections import kafka_common_config, redis_client
from worker.outputs import Pending, make_outputs
from worker.prepare import prepare
from worker.run import consumer_config, engine_options
from worker.settings import WorkerSettings
from worker.thread_names import name_python_threads
from worker.trends import TrendWriter
from worker.url_fetch import UrlPolicy


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


FETCH_CHOICES = ("worker", "kafka-defaults")


def get_args_parser() -> argparse.ArgumentParser:
    from bench_args import make_parser, positive_int

    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--fetch",
        choices=FETCH_CHOICES,
        default=os.environ.get("PEER_FETCH", "worker"),
        help="worker: the worker's fetch settings; kafka-defaults: kafka-python's (env PEER_FETCH)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=int(os.environ["PEER_THREADS"]) if os.environ.get("PEER_THREADS") else None,
        help="engine threads (env PEER_THREADS; default: inference_threads x engine_instances)",
    )
    parser.add_argument(
        "--spinning",
        choices=["on", "off"],
        default=os.environ.get("PEER_SPINNING") or None,
        help="ONNX Runtime thread spinning (env PEER_SPINNING; default: inference_spinning)",
    )
    return parser


def peer_engine_options(
    settings: WorkerSettings, threads: int | None = None, spinning: str | None = None
) -> dict:
    """create_engine's options for the peer's one engine: by default on every thread the
    worker's instances would use (its loop has no way to run a second engine)."""
    opts = engine_options(settings)
    if "threads" in opts:
        if threads is not None:
            opts["threads"] = threads
        elif settings.engine_instances > 1:
            opts["threads"] = settings.inference_threads * settings.engine_instances
    if spinning is not None:
        opts.pop("spinning", None)
        if spinning == "off":
            opts["spinning"] = False
    return opts


def peer_consumer_config(settings: WorkerSettings, fetch: str = "worker") -> dict:
    """KafkaConsumer options: the worker's (fetch sizes and wait, group, offsets), one record
    a poll; with ``kafka-defaults`` kafka-python's own fetch settings instead."""
    opts = {**consumer_config(settings), "max_poll_records": 1}
    if fetch == "kafka-defaults":
        for key in ("fetch_max_bytes", "fetch_max_wait_ms", "max_partition_fetch_bytes"):
            opts.pop(key)
    elif fetch != "worker":
        raise ValueError(f"fetch must be one of {FETCH_CHOICES}, not {fetch!r}")
    return opts


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    settings = WorkerSettings()
    bundle = load_bundle(settings.bundle)
    engine = create_engine(
        bundle, settings.backend, **peer_engine_options(settings, args.threads, args.spinning)
    )
    manifest = bundle.manifest
    policy = UrlPolicy.from_settings(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common = kafka_common_config(settings)
    consumer = KafkaConsumer(
        settings.input_topic, **common, **peer_consumer_config(settings, args.fetch)
    )
    producer = KafkaProducer(**common, acks="all", enable_idempotence=True)
    writer = TrendWriter(redis_client(settings), settings.group_id)
    name_python_threads()  # so benchmarks/worker_ab.py can tell Kafka I/O from inference
    print("ready", flush=True)
    while not stop.is_set():
        for records in consumer.poll(timeout_ms=500, max_records=1).values():
            for rec in records:
                received = time.monotonic()
                prep = prepare(rec.value, manifest.preprocess, policy, settings.max_message_bytes)
                logits = {0: engine.infer(prep.array[None])[0]} if prep.error is None else {}
                results, dead, trends = make_outputs(
                    [Pending(rec, received, _Done(prep))],
                    [prep],
                    logits,
                    manifest,
                    settings,
                    lambda: datetime.now(UTC),
                )
                for key, value in results:
                    producer.send(settings.output_topic, key=key, value=value).get(timeout=30)
                for key, value, headers in dead:
                    producer.send(settings.dlq_topic, key=key, value=value, headers=headers).get(30)
                writer.apply(trends)
                consumer.commit(
                    {TopicPartition(rec.topic, rec.partition): OffsetAndMetadata(rec.offset + 1)}
                )
    consumer.close()
    producer.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
