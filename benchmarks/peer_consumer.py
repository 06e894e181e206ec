"""The per-message peer: the consumer loop most teams write first, as the baseline to beat.

poll one record -> decode -> infer a batch of one -> produce its result and wait for the ack
-> count it in Redis -> commit that one offset. It uses the worker's own decoding,
preprocessing, engine and result schema, so the comparison isolates the loop itself.
Run by benchmarks/e2e_throughput.py with the worker's CARSTREAM_* environment.
"""

from __future__ import annotations

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
from worker.pipeline import Pending, make_outputs
from worker.prepare import prepare
from worker.run import engine_options
from worker.settings import WorkerSettings
from worker.thread_names import name_python_threads
from worker.trends import TrendWriter
from worker.url_fetch import UrlPolicy


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def main() -> int:
    settings = WorkerSettings()
    bundle = load_bundle(settings.bundle)
    # one engine on every thread the worker's instances would use: the peer's loop has no way
    # to run a second one
    opts = engine_options(settings)
    if "threads" in opts and settings.engine_instances > 1:
        opts["threads"] = settings.inference_threads * settings.engine_instances
    engine = create_engine(bundle, settings.backend, **opts)
    manifest = bundle.manifest
    policy = UrlPolicy.from_settings(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common = kafka_common_config(settings)
    consumer = KafkaConsumer(
        settings.input_topic,
        **common,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=1,
        session_timeout_ms=settings.session_timeout_ms,
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
