"""The worker loop: poll -> batch -> decode (thread pool) -> infer -> publish -> count -> commit.

Delivery rules (DESIGN.md): results and dead letters are delivered first, then the batch's trend
increments and partition positions go to Redis in one atomic script, and only then are the
offsets committed. A crash anywhere before the commit redelivers the batch: results may repeat
(same post_id, same answer), counts never do. Kafka and Redis failures are retried with backoff;
a batch that could not be delivered and applied is never committed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    ClusterAuthorizationFailedError,
    CommitFailedError,
    CorruptRecordError,
    FencedInstanceIdError,
    GroupAuthorizationFailedError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
    UnsupportedCodecError,
)
from kafka.structs import OffsetAndMetadata
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from engine_build.manifest import Manifest
from engine_build.runtime import Engine, on_device
from worker.backoff import Backoff
from worker.batching import Batcher
from worker.connections import metadata_answers, redis_refusal, topic_unknown
from worker.decode_pool import DecodePool
from worker.delivery import (
    SEND_REFUSALS,
    SEND_RETRY_LIMIT,
    TOO_LARGE,
    Outgoing,
    delivered,
    error_kind,
    failed_for_good,
    producer_failure,
    send_outcome,
)
from worker.engine_isolation import EngineFailureLog, infer_isolating
from worker.errors import FatalWorkerError, PostError
from worker.gpu_preprocess import decode_bisecting, decode_jpegs, preprocess_rows
from worker.metrics import WorkerMetrics
from worker.outputs import Pending, Result, make_outputs
from worker.prepare import Prepared, decode_on_cpu, prepare
from worker.settings import WorkerSettings
from worker.thread_names import name_this_thread
from worker.trend_keys import TrendRecord, applied_key
from worker.trends import ApplyResult, TrendWriter
from worker.url_fetch import UrlPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnreadableRecord:
    """Stands in for a record the Kafka client cannot parse (its bytes are out of reach)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes = b""
    headers: list | None = None


# batches handed over at once in the overlapped loop, beyond one per engine instance: one
# publishing and counting, one ready to start the moment an instance is free; more would only
# hold posts back from a later, fuller batch
SPARE_INFLIGHT_BATCHES = 2
# how long a poll blocks while a batch is in flight: the commit of a finished batch waits this long
INFLIGHT_POLL_MS = 20.0
# how often the loop looks again at a decode that is not running against its deadline (queued
# behind others, waiting for a CPU slot, or past the deadline and not written off), enforcing the
# deadline on the running ones meanwhile
DECODE_START_POLL_S = 0.5

PROBE_POLL_MS = 2000  # how long to wait for one partition's record when locating a corrupt one
MAX_CORRUPT_SKIP = 100_000  # offsets skipped at most per unreadable record batch
# the lag gauge's end offsets come with fetches; a loop that has not fetched for this long (a
# batch stuck retrying, a full pipeline) asks the broker for them, at most this often, waiting
# at most LAG_END_TIMEOUT_MS (the broker may be what is out)
LAG_END_REFRESH_S = 10.0
LAG_END_TIMEOUT_MS = 1000
# a redelivery re-reads the batches applied but not committed: at most max_inflight (a few) of
# them, more only when commits kept failing. A partition whose records the trends writer ignores
# for this many max_batch-sized batches in a row reads offsets below its stored applied one:
# its topic was recreated or the group's offsets were reset back, and nothing of it is counted
IGNORED_RUN_BATCHES = 10
IGNORED_WARN_EVERY_S = 300.0  # that warning, again at most this often per partition
# Once the stop flag is set, delivering, counting and committing what is in flight gets this long
# in all, counted from the moment the flag is set: each wait on the broker (a flush, a send's
# acknowledgement, a commit) gets what is left of it, a delivery round that fails is not retried,
# and a batch not done by then stays uncommitted (its records are read again after the restart,
# and Redis counts them once). Closing the clients comes after it; the whole shutdown must stay
# well inside the pod's grace period (terminationGracePeriodSeconds: 90, docs/deploy.md), not
# run into kafka-python's 120 s delivery timeout during a broker outage.
DRAIN_DEADLINE_S = 30.0
# how long one delivery round waits for the producer to flush, and then for each send's
# acknowledgement (kafka-python fails a record itself after its delivery_timeout_ms)
SEND_WAIT_S = 30.0
# the longest a wait on the broker goes without looking at the stop flag
WAIT_SLICE_S = 1.0
# a batch delivered and counted at the drain deadline still gets this long for its commit
STOP_COMMIT_MIN_MS = 1000
# and a batch finished at the deadline this long for each wait of its delivery (a flush, a
# send's acknowledgement): a healthy broker answers in milliseconds, a silent one is not waited
# out, and a results record sent but not waited for would be published again after a restart
STOP_SEND_MIN_S = 2.0


def unparseable(exc: BaseException) -> bool:
    """Whether ``exc`` came from parsing fetched records (not from the network or the group):
    a corrupt record, a codec the client lacks, or a compressed payload that does not decode
    (gzip/zlib/lz4 errors escape kafka-python's own wrapping)."""
    if isinstance(exc, CorruptRecordError | UnsupportedCodecError):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return any("/kafka/record/" in f.filename.replace("\\", "/") for f in frames)


class BatchAbortedError(Exception):
    """A batch could not be delivered or applied before shutdown; it stays uncommitted."""


def record_age(record: Any, now: float) -> float | None:
    """Seconds from ``record``'s Kafka timestamp to ``now`` (wall clock), 0 for a timestamp up
    to a minute ahead (clock skew), None where there is none (-1, a pre-0.10 record) or it is
    further ahead: a producer sets CreateTime as it likes, and a bogus one must not read as
    freshness."""
    stamp = getattr(record, "timestamp", None)
    if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp <= 0:
        return None
    age = now - stamp / 1000.0
    if age < -60.0:
        return None
    return max(age, 0.0)


Offsets = dict[TopicPartition, OffsetAndMetadata]


# poll errors that no retry ends: a missing ACL, or a static member another pod replaced
REFUSED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    FencedInstanceIdError,
)


@dataclass(frozen=True)
class InFlight:
    """A batch handed to the inference and delivery threads: the future of the offsets to
    commit once it is delivered, and its partitions' epochs when it was taken."""

    offsets: Future[Offsets]
    epochs: dict[TopicPartition, int]


def torch_stack(rows: list[Any]) -> Any:
    import torch

    return torch.stack(rows)


def partition_lag(
    end: int | None, committed: int | None, position: int | None = None
) -> int | None:
    """Records of a partition not committed yet: its end offset (the next one to be written)
    minus the committed one (the next to process); None while either is unknown.

    ``position``: the consumer's next offset, given only when every record polled from the
    partition is committed. What lies between the commit and it can then only be control
    records (a transaction's commit marker takes an offset), which are no work: without it, a
    topic written by a transactional producer read a lag of 1 for ever once idle.
    """
    if end is None or committed is None:
        return None
    resume = committed if position is None else max(committed, position)
    return max(0, end - resume)


def fully_ignored(
    records: Sequence[TrendRecord], result: ApplyResult, positions: dict[tuple[str, int], int]
) -> dict[tuple[str, int], tuple[bool, int, int, int]]:
    """Per (topic, partition) of one applied batch: whether the trends writer ignored all of its
    records, their count, and their lowest and highest offsets.

    ``positions`` are the stored applied offsets read after the call. One past every offset of
    the partition means nothing of it was applied (applying moves it to the highest one); equal
    to the highest is that or an application, and only the whole batch ignored settles it.
    """
    offsets: dict[tuple[str, int], list[int]] = {}
    for rec in records:
        offsets.setdefault((rec.topic, rec.partition), []).append(rec.offset)
    everything = result.ignored >= len(records)
    out = {}
    for key, offs in offsets.items():
        stored = positions.get(key)
        ignored = stored is not None and (stored > max(offs) or everything)
        out[key] = (ignored, len(offs), min(offs), max(offs))
    return out


class IgnoredRuns:
    """How many records of each partition the trends writer ignored in a row, and when a run
    is long enough to warn about (``IGNORED_RUN_BATCHES``).

    A redelivery ignores a few batches and then counts again; a longer run reads offsets below
    the stored applied one (a recreated topic, offsets reset back), and would count nothing
    until an operator deletes that position.
    """

    def __init__(self, threshold: int, every_s: float = IGNORED_WARN_EVERY_S) -> None:
        self.threshold = threshold
        self.every_s = every_s
        self._runs: dict[tuple[str, int], int] = {}
        self._warned: dict[tuple[str, int], float] = {}

    def add(self, key: tuple[str, int], ignored: bool, records: int, now: float) -> int | None:
        """Note one batch's records of a partition; the run's length when a warning is due."""
        if not ignored:
            self._runs.pop(key, None)
            self._warned.pop(key, None)
            return None
        run = self._runs[key] = self._runs.get(key, 0) + records
        if run < self.threshold:
            return None
        last = self._warned.get(key)
        if last is not None and now - last < self.every_s:
            return None
        self._warned[key] = now
        return run


def commit_offsets(batch: list[Pending]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Next offset to read per partition: highest processed offset + 1."""
    top: dict[TopicPartition, int] = {}
    for item in batch:
        tp = TopicPartition(item.record.topic, item.record.partition)
        top[tp] = max(top.get(tp, -1), item.record.offset)
    return {tp: OffsetAndMetadata(off + 1, "", -1) for tp, off in top.items()}


def overlaps(mode: str, engine: Engine, instances: int = 1) -> bool:
    """Whether the loop runs batches on inference and delivery threads (``overlap`` setting).

    ``auto`` turns it on for engines on a GPU (``DeviceEngine``s): there the engine
    does not share the CPU, and a loop that polls, waits for decodes, publishes and commits
    between batches would leave it idle most of the time. It is on for more than one engine
    instance too, which only the inference threads can run side by side. On one CPU engine
    the overlapped loop gained nothing (benchmarks/results/overlap_cpu; an earlier version
    measured slower, loop_overlap_ab): polling and decoding beside ONNX Runtime's parallel
    sections slow the engine as much as the overlap gains.
    """
    if mode == "auto":
        return instances > 1 or on_device(engine)
    return mode == "on"


class StreamWorker(ConsumerRebalanceListener):
    # monotonic time by which the drain must be done (DRAIN_DEADLINE_S); None until stopping
    _drain_deadline: float | None = None

    def __init__(
        self,
        settings: WorkerSettings,
        engines: Sequence[Engine],
        manifest: Manifest,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        trends: TrendWriter,
        metrics: WorkerMetrics,
        stop: threading.Event,
        new_producer: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        """``new_producer`` makes a producer like ``producer``, for when that one fails for good
        (``producer_failure``); without it such a failure stops the worker."""
        if not engines:
            raise ValueError("StreamWorker needs at least one engine")
        self.settings = settings
        # instances of one bundle: the first one's max batch and device stand for all
        self.engines = list(engines)
        self.engine = self.engines[0]
        self.manifest = manifest
        self.consumer = consumer
        self.new_producer = new_producer
        self.producer = producer
        self.trends = trends
        self.metrics = metrics
        self.stop = stop
        self.backoff = Backoff()
        self.pool = DecodePool(
            settings.decode_threads,
            io_threads=settings.fetch_threads if settings.url_fetch_enabled else 0,
        )
        metrics.decode_threads_written_off.set_function(lambda: self.pool.written_off)
        self.batcher: Batcher[Pending] = Batcher(settings.max_batch, settings.max_wait_ms)
        # overlapped loop: each engine instance belongs to one inference thread, which makes
        # every call to it after warm-up (CUDA graphs and streams stay on one thread), and the
        # one delivery thread publishes and counts each batch after it, so the engines start
        # the next batches meanwhile and batches finish in the order taken
        self._unbound: queue.SimpleQueue[Engine] = queue.SimpleQueue()
        for instance in self.engines:
            self._unbound.put(instance)
        self._lane = threading.local()  # .engine: the calling inference thread's instance
        self.inference = ThreadPoolExecutor(
            len(self.engines), thread_name_prefix="inference", initializer=self._bind_engine
        )
        self.delivery = ThreadPoolExecutor(
            1, thread_name_prefix="delivery", initializer=name_this_thread
        )
        # a batch failed, or the loop ended: the batches behind must not apply, and the one
        # retrying gives up (it stays uncommitted)
        self._failed = threading.Event()
        self.overlap = overlaps(settings.overlap, self.engine, len(self.engines))
        if len(self.engines) > 1 and not self.overlap:
            raise ValueError(f"{len(self.engines)} engine instances need the overlapped loop")
        self.max_inflight = len(self.engines) + SPARE_INFLIGHT_BATCHES
        # GPU decode: JPEGs are decoded by nvJPEG on the engine's device, batch by batch
        self.gpu_device = (
            getattr(self.engine, "device", None)
            if settings.gpu_decode and on_device(self.engine)
            else None
        )
        self._prepare = partial(
            prepare,
            spec=manifest.preprocess,
            policy=UrlPolicy.from_settings(
                settings, on_host_pause=lambda _host: self.metrics.url_host_pauses.inc()
            ),
            max_message_bytes=settings.max_message_bytes,
            gpu_jpeg=self.gpu_device is not None,
            cpu_slot=self.pool.cpu_slot,
        )
        # where the group resumes each partition: this worker's last commit there, else the
        # first offset it read there (the commit it started from); carstream_lag counts from it
        self._committed: dict[TopicPartition, int] = {}
        self._engine_failures = EngineFailureLog()  # shared by the inference threads
        # one past the highest offset polled per partition: once the commit reaches it, all the
        # partition's polled work is done (a rewind re-reads records below it)
        self._polled: dict[TopicPartition, int] = {}
        self._end: dict[TopicPartition, int] = {}  # end offsets asked for while not fetching
        self._fetched_at = self._end_asked_at = time.monotonic()
        self._loop_thread: int | None = None  # the thread that owns the consumer (run's)
        self._ignored_runs = IgnoredRuns(IGNORED_RUN_BATCHES * settings.max_batch)
        self._lock = threading.Lock()  # the batcher is also touched by the rebalance callback
        self._rewind: dict[TopicPartition, int] = {}  # first dropped offset per partition
        self._rebalances = 0  # bumped by both callbacks: a corrupt-record search restarts
        # bumped for each partition on its revocation: a batch taken before is not committed for
        # it, even when the partition has come back by the time the batch is delivered
        self._epoch: dict[TopicPartition, int] = {}

    # --- rebalance: finish what was polled from partitions we are about to lose --------------
    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Drop, uncommitted, what was polled from the partitions we lose.

        kafka-python 3 runs this callback on its network thread, where a commit cannot block,
        so the records in hand are not finished here: whoever owns each partition next reads
        them again (this consumer too: the main loop seeks back if it gets the partition back),
        and the trends' applied offsets keep them from being counted twice.
        """
        self._rebalances += 1
        lost = set(revoked)
        with self._lock:
            for tp in lost:
                self._epoch[tp] = self._epoch.get(tp, 0) + 1
            dropped = self.batcher.take_where(
                lambda p: TopicPartition(p.record.topic, p.record.partition) not in lost
            )
            for item in dropped:
                tp = TopicPartition(item.record.topic, item.record.partition)
                self._rewind[tp] = min(self._rewind.get(tp, item.record.offset), item.record.offset)
                # a decode not started yet is work for nothing: the records are read again
                item.prepared.cancel()
        for tp in lost:
            self._committed.pop(tp, None)
            self._polled.pop(tp, None)
            self._end.pop(tp, None)
            self.metrics.lag.remove(str(tp.partition))  # the new owner reports it now
        if dropped:
            log.info("partitions revoked %s: dropped %d uncommitted records", revoked, len(dropped))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._rebalances += 1
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))
        self.metrics.set_ready(True)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Consume until the stop flag is set, then finish what was polled and return."""
        self._loop_thread = threading.get_ident()
        # the drain's deadline counts from the stop flag itself, not from when a thread first
        # looks at it (one may be inside a 30 s commit then)
        threading.Thread(target=self._clock_drain, name="stop-deadline", daemon=True).start()
        self.consumer.subscribe([self.settings.input_topic], listener=self)
        log.info(
            "loop: %s",
            f"overlapped ({len(self.engines)} inference thread(s) and a delivery thread)"
            if self.overlap
            else "serial",
        )
        try:
            if self.overlap:
                self._run_overlapped()
            else:
                self._run_serial()
        except BatchAbortedError as exc:
            log.warning("batch left uncommitted at shutdown: %s", exc)
        finally:
            # An error on this thread (a poll the broker refuses for good) may come while the
            # delivery thread retries through a Kafka or Redis outage, which the join below would
            # wait out, beating the liveness probe meanwhile. So: not ready, no more beats, the
            # batches behind a failed one neither applied nor committed, and the stop flag set,
            # which ends the retries (nothing commits after this point: only this thread commits)
            self.metrics.set_ready(False)
            self._failed.set()
            self.stop.set()
            self.delivery.shutdown(wait=True, cancel_futures=True)
            self.inference.shutdown(wait=True, cancel_futures=True)
            # a decode that never returns must not keep the process from exiting
            self.pool.shutdown(
                wait=True, cancel_futures=True, timeout=self.settings.decode_timeout_s
            )

    def _run_serial(self) -> None:
        """Poll, then infer, publish, count and commit each batch on this thread.

        The decode threads work on the next batch's posts while this one is inferred. On a CPU
        engine this beats the overlapped loop: polling beside the engine takes cores from it.
        """
        s = self.settings
        while not self.stop.is_set():
            self.metrics.beat()
            self._update_lag()
            room = 2 * s.max_batch - len(self.batcher)
            timeout = self.batcher.time_left_ms() if len(self.batcher) else 500
            if room > 0:
                self._poll(int(timeout), room)
            if self.batcher.ready():
                # prefetch the next batch so it decodes while this one is inferred
                extra = 2 * s.max_batch - len(self.batcher)
                if extra > 0:
                    self._poll(0, extra)
                self.process(*self._take())
        given_back = self._give_back_undecoded()
        log.info(
            "stop requested: draining %d decoded records (%d not decoded yet left uncommitted)",
            len(self.batcher),
            given_back,
        )
        while len(self.batcher):
            self.process(*self._take())

    def _run_overlapped(self) -> None:
        """Poll and decode on this thread while the inference and delivery threads run the
        batches before.

        The consumer is only touched here (kafka-python's consumer is not thread-safe): this
        thread polls, hands ready batches over (at most ``max_inflight``), and commits each
        batch's offsets once the delivery thread has published its results and applied its
        counts, in the order the batches were taken. Fetching and decoding thus go on while the
        engine runs, and the engine never waits on a broker round trip, a commit, or the decode
        of posts that arrived during the batch before.
        """
        s = self.settings
        inflight: deque[InFlight] = deque()
        while not self.stop.is_set():
            if not inflight:
                self.metrics.beat()  # otherwise the delivery thread beats, batch by batch
            self._reap(inflight)
            self._update_lag()  # also while the delivery thread is stuck on a batch
            # read ahead: a batch to decode while the engine runs, two when it has no next
            # batch waiting yet; beyond that, polling would only cost CPU the engine needs
            ahead = s.max_batch if len(inflight) >= self.max_inflight else 2 * s.max_batch
            room = ahead - len(self.batcher)
            if room > 0:
                if len(inflight) >= self.max_inflight:
                    # no batch can be handed over before one finishes: a due batch must not
                    # turn this into a poll(0) spin that takes the engine's CPU
                    timeout = INFLIGHT_POLL_MS
                else:
                    timeout = self.batcher.time_left_ms() if len(self.batcher) else 500.0
                    if inflight:  # come back soon to commit what the delivery thread ends
                        timeout = min(timeout, INFLIGHT_POLL_MS)
                self._poll(int(timeout), room)
            elif inflight:
                wait([inflight[0].offsets], timeout=INFLIGHT_POLL_MS / 1000.0)
            if self.batcher.ready() and len(inflight) < self.max_inflight:
                batch, epochs = self._take()
                inflight.append(InFlight(self._submit(batch), epochs))
        given_back = self._give_back_undecoded()
        log.info(
            "stop requested: draining %d decoded records and %d batches in flight (%d not "
            "decoded yet left uncommitted)",
            len(self.batcher),
            len(inflight),
            given_back,
        )
        while len(self.batcher):
            batch, epochs = self._take()
            inflight.append(InFlight(self._submit(batch), epochs))
        while inflight:
            self._reap(inflight, block=True)

    def _give_back_undecoded(self) -> int:
        """At stop, drop (uncommitted) each partition's polled records from its first one whose
        decode has not finished; return how many.

        The loop reads up to two batches ahead, and the decode of what it read can take long (an
        ``image_url`` host that answers slowly: ``url_timeout_s`` per post). Finishing all of it
        could outlast the pod's grace period, and a SIGKILL then would leave even the decoded
        batches uncommitted. What is dropped was never published or counted: the partition's
        next owner (this pod again, after a restart) reads it from the last commit. Only a
        prefix per partition is kept, so the commits stay contiguous.
        """
        with self._lock:
            cut: set[TopicPartition] = set()

            def keep(p: Pending) -> bool:  # called in poll order, so offsets rise per partition
                tp = TopicPartition(p.record.topic, p.record.partition)
                if tp not in cut and p.prepared.done():
                    return True
                cut.add(tp)
                return False

            dropped = self.batcher.take_where(keep)
        for item in dropped:
            item.prepared.cancel()  # a decode not started is work for nothing
        return len(dropped)

    def _reap(self, inflight: deque[InFlight], block: bool = False) -> None:
        """Commit the batches the inference thread has finished, oldest first; re-raise the
        error of one that failed (the batches behind it are then neither counted nor committed).
        """
        while inflight and (block or inflight[0].offsets.done()):
            item = inflight.popleft()
            offsets = self._held_throughout(item.offsets.result(), item.epochs)
            if offsets:
                self._commit(offsets)
            self._update_lag()

    def _take(self) -> tuple[list[Pending], dict[TopicPartition, int]]:
        """The next batch, and its partitions' epochs, read under the lock the revoke callback
        takes: every record in the batcher was polled in its partition's current epoch."""
        with self._lock:
            batch = self.batcher.take()
            parts = {TopicPartition(p.record.topic, p.record.partition) for p in batch}
            return batch, {tp: self._epoch.get(tp, 0) for tp in parts}

    def _held_throughout(self, offsets: Offsets, epochs: dict[TopicPartition, int]) -> Offsets:
        """The offsets of the partitions held from the batch's taking until now.

        A batch finished after its partitions were revoked is not committed for them: the new
        owner reads those records again (Redis counts them once) and commits itself. That holds
        even when a partition has come back meanwhile: the owner between may have committed past
        this batch, and committing it would move the group's offset back.
        """
        held = self.consumer.assignment()
        return {
            tp: om
            for tp, om in offsets.items()
            if tp in held and self._epoch.get(tp, 0) == epochs.get(tp, 0)
        }

    def _poll(self, timeout_ms: int, max_records: int) -> None:
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as exc:
            if not unparseable(exc):
                if not isinstance(exc, KafkaError):
                    raise
                if isinstance(exc, REFUSED):
                    # retrying would keep the liveness probe green while nothing is consumed;
                    # exiting makes it a restart loop that an operator sees
                    raise FatalWorkerError(f"the broker refuses this consumer: {exc!r}") from exc
                self.metrics.retries.labels("kafka").inc()
                log.warning("poll failed (%s); retrying", exc)
                self.stop.wait(1.0)
                return
            try:
                self._skip_corrupt_record(exc)
            except KafkaError as err:  # position/end_offsets timed out: the next poll retries
                self.metrics.retries.labels("kafka").inc()
                log.warning("locating an unreadable record failed (%s); retrying", err)
                self.stop.wait(1.0)
            return
        now = self._fetched_at = time.monotonic()
        self._end.clear()  # the highwater marks are fresh again
        with self._lock:
            for records in polled.values():
                for rec in records:
                    future = self.pool.submit(self._prepare, rec.value, key=rec.key)
                    self.batcher.add(Pending(rec, now, future))
                    tp = TopicPartition(rec.topic, rec.partition)
                    self._committed.setdefault(tp, rec.offset)
                    self._polled[tp] = max(self._polled.get(tp, 0), rec.offset + 1)
            if self._rewind:
                self._apply_rewinds()
        self.metrics.consumed.inc(sum(len(r) for r in polled.values()))

    def _skip_corrupt_record(self, exc: Exception) -> None:
        """Dead-letter the records kafka-python cannot parse, and move past them.

        kafka-python raises (CorruptRecordError for a CRC mismatch or a header key that is not
        UTF-8, which a librdkafka producer can send; a codec error for a payload that does not
        decompress) without naming the partition, and leaves that partition's position on the
        record, so every later poll would fail on it: one bad record would block its partition
        for ever. The partition is found by polling each one alone for a record. A fetch returns
        whole record batches and the client parses a batch from its start, so the records after
        the bad one in the same batch cannot be read either: the offsets from the bad one up to
        the first readable one are skipped. Each joins the batch as a dead letter (empty value:
        the client cannot read its bytes; the headers name the offset, for a replay with another
        client), so they are delivered and committed in order. Every partition is put back where
        it was; a rebalance during the search abandons it (the next poll starts over).
        """
        hint = self._drop_poisoned_fetch()
        generation = self._rebalances
        held = set(self.consumer.assignment())
        saved = {tp: self.consumer.position(tp) for tp in held}
        culprit, first_readable, done = None, None, False
        try:
            order = sorted(held, key=lambda t: (t != hint, t.topic, t.partition))
            for tp in order:
                verdict = self._probe(tp, saved[tp])
                if self._rebalances != generation or verdict == "error":
                    return
                if verdict == "corrupt":
                    culprit = tp
                    break
            if culprit is None:
                self.metrics.retries.labels("kafka").inc()
                log.warning("poll failed on a record (%s) not located yet; retrying", exc)
                self.stop.wait(1.0)
                return
            # never past the log end: a fetch there could reset the position and re-read
            end = self.consumer.end_offsets([culprit]).get(culprit, 0)
            first_readable = saved[culprit] + 1
            while first_readable < min(end, saved[culprit] + MAX_CORRUPT_SKIP):
                if self.stop.is_set():  # the positions are put back; a restart searches again
                    return
                self.metrics.beat()  # a long batch to skip is progress, not a stall
                verdict = self._probe(culprit, first_readable)
                if self._rebalances != generation or verdict == "error":
                    return
                if verdict != "corrupt":
                    break
                first_readable += 1
            done = True
        finally:
            current = self.consumer.assignment()
            self.consumer.resume(*current)
            for tp, position in saved.items():
                if tp in current and not (done and tp == culprit):
                    self.consumer.seek(tp, position)
        first = saved[culprit]
        log.error(
            "%s offsets %d..%d cannot be read by the Kafka client (%s): dead-lettered as "
            "corrupt_record, reading on from offset %d",
            culprit,
            first,
            first_readable - 1,
            exc,
            first_readable,
        )
        now = time.monotonic()
        with self._lock:
            for offset in range(first, first_readable):
                reason = (
                    f"the Kafka client cannot parse the record: {exc}"
                    if offset == first
                    else f"in the record batch of unparseable offset {first}, after it"
                )
                prepared: Future[Prepared] = Future()
                prepared.set_result(Prepared(None, None, PostError("corrupt_record", reason), 0.0))
                record = UnreadableRecord(culprit.topic, culprit.partition, offset)
                self.batcher.add(Pending(record, now, prepared))
            self._committed.setdefault(culprit, first)
        self.consumer.seek(culprit, first_readable)
        self.metrics.consumed.inc(first_readable - first)

    def _drop_poisoned_fetch(self) -> TopicPartition | None:
        """Drop the fetched records whose parsing raised; return their partition, if any.

        kafka-python 3.0 keeps the record iterator that raised as the next in line: a later poll
        at that position gets nothing from it and loops on it for ever (100% CPU, no log). There
        is no public way to drop it, so this reaches into the fetcher (kafka-python is pinned
        below 3.1; the integration test of corrupt records fails if this stops working).
        """
        fetcher = getattr(self.consumer, "_fetcher", None)
        part = getattr(fetcher, "_next_partition_records", None)
        if part is None:
            return None
        tp = part.topic_partition
        part.drain()
        fetcher._next_partition_records = None
        return tp

    def _probe(self, tp: TopicPartition, offset: int) -> str:
        """Poll ``tp`` alone from ``offset`` for one record: "corrupt" (the record at ``offset``
        cannot be parsed), "record", "empty", "moved" (the position was reset elsewhere) or
        "error" (the network or the group failed: no verdict).

        Other partitions are paused; one assigned by a rebalance inside this poll is not, so
        what it returns is handed back (its position set to the first record returned).
        """
        self.consumer.pause(*(self.consumer.assignment() - {tp}))
        self.consumer.resume(tp)
        self.consumer.seek(tp, offset)
        try:
            polled = self.consumer.poll(timeout_ms=PROBE_POLL_MS, max_records=1)
        except Exception as exc:
            if not unparseable(exc):
                log.warning("probing %s at %d failed (%s)", tp, offset, exc)
                return "error"
            self._drop_poisoned_fetch()
            return "corrupt" if self.consumer.position(tp) == offset else "moved"
        assigned = self.consumer.assignment()
        for other, records in polled.items():
            if other != tp and records and other in assigned:
                self.consumer.seek(other, min(r.offset for r in records))
        offsets = [r.offset for r in polled.get(tp, [])]
        if any(o < offset for o in offsets):
            return "moved"
        return "record" if offsets else "empty"

    def _apply_rewinds(self) -> None:
        """Seek back to the first dropped record of every partition we hold again (lock held).

        Without this, a consumer that gets the same partition back after a rebalance would go
        on from its fetch position and skip the records it dropped.
        """
        held = self.consumer.assignment()
        for tp, offset in self._rewind.items():
            self.batcher.take_where(
                lambda p, tp=tp, offset=offset: (
                    TopicPartition(p.record.topic, p.record.partition) != tp
                    or p.record.offset < offset
                )
            )
            if tp in held:
                self.consumer.seek(tp, offset)
                log.info("re-reading %s from offset %d after the rebalance", tp, offset)
        self._rewind.clear()

    def _bind_engine(self) -> None:
        """Inference-thread initializer: this thread's own engine instance (the executor
        starts at most one thread per instance)."""
        name_this_thread()
        self._lane.engine = self._unbound.get_nowait()

    def process(self, batch: list[Pending], epochs: dict[TopicPartition, int]) -> None:
        """Infer, publish, count and commit one batch, all on the calling thread (``epochs``:
        its partitions' epochs when it was taken, see ``_held_throughout``)."""
        offsets = self._held_throughout(self.handle(batch), epochs)
        if offsets:
            self._commit(offsets)
        self._update_lag()

    def _submit(self, batch: list[Pending]) -> Future[Offsets]:
        """Hand one batch to the inference thread and then the delivery thread; the future
        of the offsets to commit once its results are delivered and its counts applied."""
        inferred = self.inference.submit(self._in_order, self.infer_batch, batch)
        return self.delivery.submit(self._finish_after, batch, inferred)

    def _finish_after(
        self, batch: list[Pending], inferred: Future[tuple[list[Prepared], dict]]
    ) -> Offsets:
        """``finish`` on the delivery thread once the batch is inferred (an inference failure
        re-raises here, having set the failed flag)."""
        prepared, logits = inferred.result()
        return self._in_order(self.finish, batch, prepared, logits)

    def _in_order(self, stage: Callable[..., Any], *args: Any) -> Any:
        """Run one stage of a batch, refusing it after any batch failed at any stage.

        A later batch must not apply its counts once an earlier one failed: Redis would move
        the partition's applied position past the failed batch's records, and their redelivery
        would then not be counted. Counts are applied on the one delivery thread, which takes
        the batches in order and waits for each one's inference, so the flag is set before the
        next batch reaches its delivery. (With several engine instances a later batch may be
        inferred after an earlier one failed; its delivery still refuses it.)
        """
        if self._failed.is_set():
            raise BatchAbortedError("an earlier batch failed; this one is left uncommitted")
        try:
            return stage(*args)
        except BaseException:
            self._failed.set()
            raise

    def handle(self, batch: list[Pending]) -> dict[TopicPartition, OffsetAndMetadata]:
        """Infer, publish and count one batch; the offsets to commit once that is done.

        Raises BatchAbortedError at shutdown only, FatalWorkerError when the worker cannot go on.
        """
        if not batch:
            return {}
        prepared, logits = self.infer_batch(batch)
        return self.finish(batch, prepared, logits)

    def infer_batch(self, batch: list[Pending]) -> tuple[list[Prepared], dict[int, np.ndarray]]:
        """Wait for the batch's decodes and run the engine: what each post became, and the
        logits by batch position (a post the engine failed on gets its error in ``prepared``)."""
        self.metrics.batch_size.observe(len(batch))
        prepared = [self._await_decode(item.prepared) for item in batch]
        for prep in prepared:
            self.metrics.decode_seconds.observe(prep.seconds)
        return prepared, self._infer(prepared)

    def _await_decode(self, future: Future[Prepared]) -> Prepared:
        """The decode's outcome, or a ``decode_timeout`` dead letter once it has run past
        ``decode_timeout_s`` (its thread is written off: see worker/decode_pool.py).

        Only running time counts: not the wait in the queue behind other posts, nor the waits
        for a CPU slot, so a busy pool does not make good posts time out. While this post waits,
        the deadline is enforced on every running post (``write_off_overdue``): the one holding
        the slot this post waits for may be a later post's stuck decode.
        """
        limit = self.settings.decode_timeout_s
        running_s = getattr(future, "running_s", lambda: None)
        report_at = 2 * limit  # past the deadline and not written off: say so now and then
        while True:
            if getattr(future, "timed_out", False):
                return self._timed_out(limit)
            ran = running_s()
            if ran is None or ran >= limit or getattr(future, "waiting_since", None) is not None:
                wait_s = DECODE_START_POLL_S  # queued, waiting for a slot, or past the deadline
            else:
                wait_s = limit - ran
            try:
                return future.result(timeout=wait_s)
            except TimeoutError:
                pass
            if self.pool.write_off_overdue(limit):
                log.warning(
                    "decodes ran past decode_timeout_s (%.3g s): their posts are dead-lettered "
                    "and their threads written off (%d written off still running)",
                    limit,
                    self.pool.written_off,
                )
            if getattr(future, "timed_out", False):
                return self._timed_out(limit)
            ran = running_s()
            if ran is not None and ran >= report_at:
                # as many threads written off as allowed: wait it out (the liveness probe
                # restarts a replica whose loop stops turning)
                report_at += limit
                log.error(
                    "a decode has run %.0f s, past decode_timeout_s, and %d written-off decode "
                    "threads are still running: waiting for it",
                    ran,
                    self.pool.written_off,
                )

    def _timed_out(self, limit: float) -> Prepared:
        return Prepared(
            None,
            None,
            PostError(
                "decode_timeout",
                f"decoding (or fetching) the image took over {limit:g} s; the worker stopped "
                "waiting for it",
            ),
            limit,
        )

    def finish(
        self, batch: list[Pending], prepared: list[Prepared], logits: dict[int, np.ndarray]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Publish results and dead letters, then apply the counts: the offsets to commit."""
        results, dead, trend_records = make_outputs(
            batch, prepared, logits, self.manifest, self.settings
        )
        self._deliver(results, dead)
        self._apply_trends(trend_records)
        done, now = time.monotonic(), time.time()
        for item in batch:
            self.metrics.end_to_end_seconds.observe(done - item.received)
            age = record_age(item.record, now)
            if age is not None:
                self.metrics.record_age_seconds.observe(age)
        self.metrics.beat()
        return commit_offsets(batch)

    def _infer(self, prepared: list[Prepared]) -> dict[int, np.ndarray]:
        """Logits by batch position, in engine-sized chunks; an engine failure isolates items.

        A row the engine fails on while it runs others is dead-lettered as ``internal`` (its
        ``prepared`` entry gets the error); an engine that runs nothing raises EngineFailedError.
        """
        # an inference thread's own instance; the serial loop's (main) thread has the only one
        engine = getattr(self._lane, "engine", self.engine)
        if self.gpu_device is not None:
            import torch

            # preprocess and stack on this thread's own stream: on the shared default stream,
            # one instance's resize kernels would queue behind another's (torchvision's nvJPEG
            # decoder is one per process, on a stream of its own that the caller's waits for)
            with torch.cuda.stream(self._preprocess_stream()):
                rows = self._device_rows(prepared)
                out, failed = infer_isolating(
                    engine.infer_device,  # type: ignore[attr-defined]
                    rows,
                    engine.max_batch,
                    torch_stack,
                    torch.zeros_like,
                    self.metrics.inference_seconds.observe,
                    self._engine_failures,
                )
        else:
            rows = {i: p.array for i, p in enumerate(prepared) if p.error is None}
            out, failed = infer_isolating(
                engine.infer,
                rows,
                engine.max_batch,
                np.stack,
                np.zeros_like,
                self.metrics.inference_seconds.observe,
                self._engine_failures,
            )
        for i, reason in failed.items():
            prepared[i] = Prepared(
                prepared[i].event,
                None,
                PostError("internal", f"inference failed: {reason}"),
                prepared[i].seconds,
            )
        return out

    def _preprocess_stream(self) -> Any:
        """The calling thread's CUDA stream for GPU decoding and preprocessing (made once per
        thread); None (the current stream) when the engine's device is not a GPU.

        The engines order their own stream after the caller's (``infer_device``) and return
        only once it is done, so tensors made here are not freed while the engine reads them.
        """
        import torch

        if torch.device(self.gpu_device).type != "cuda":
            return None
        stream = getattr(self._lane, "stream", None)
        if stream is None:
            stream = self._lane.stream = torch.cuda.Stream(self.gpu_device)
        return stream

    def _device_rows(self, prepared: list[Prepared]) -> dict[int, Any]:
        """Normalised CHW tensors on the engine's GPU by batch position (GPU-decode path).

        JPEGs left by the decode threads are decoded in one nvJPEG call; if that call fails
        (torchvision returns nothing then), in halves of it (:func:`decode_bisecting`), and one
        that nvJPEG cannot decode alone goes through the CPU decoder, which either decodes it
        or names what is wrong (the dead-letter reason). Images decoded on the CPU are uploaded
        through pinned memory.
        """
        import torch

        spec = self.manifest.preprocess
        device = self.gpu_device
        jpegs = {
            i: p.jpeg for i, p in enumerate(prepared) if p.error is None and p.jpeg is not None
        }
        images: dict[int, torch.Tensor] = {}
        if jpegs:
            images, refused = decode_bisecting(lambda js: decode_jpegs(js, device), jpegs)
            for i in refused:
                prepared[i] = self._decode_on_cpu(prepared[i])
        rows, failed = preprocess_rows(images, spec, {i: jpegs[i].orientation for i in images})
        for i in failed:  # this image alone: the CPU decoder, or its dead letter
            del images[i]
            prepared[i] = self._decode_on_cpu(prepared[i])
        for i, prep in enumerate(prepared):
            if i not in images and prep.error is None and prep.array is not None:
                host = torch.from_numpy(prep.array)
                if torch.device(device).type == "cuda":  # pinned: an asynchronous copy
                    host = host.pin_memory()
                rows[i] = host.to(device, non_blocking=True)
        return rows

    def _decode_on_cpu(self, prep: Prepared) -> Prepared:
        """``decode_on_cpu`` in the decode pool, in a CPU slot and under ``decode_timeout_s``
        like every other decode: a JPEG nvJPEG refused is by that token an unusual one."""
        spec = self.manifest.preprocess
        return self._await_decode(
            self.pool.submit(decode_on_cpu, prep, spec, cpu_slot=self.pool.cpu_slot)
        )

    def _deliver(self, results: list[Result], dead: list) -> None:
        """Publish results and dead letters; only the sends that failed are retried.

        What becomes of one failed send (retried, resent cut down, dropped, or the worker
        stopped) is ``send_outcome``'s rule; this loop sends, waits and retries.

        A producer that failed for good (``producer_failure``: kafka-python's idempotent
        producer does not survive a broker's refusal of a record as too large) is replaced by
        ``new_producer``, and the round's undelivered records are resent one at a time, so the
        refused one is known and cut down. Failed any other way, or with no ``new_producer``,
        it is a FatalWorkerError. Records to retry wait for the round's backoff.

        A send that blocked its ``max_block_ms`` and timed out (no metadata for the topic, or no
        buffer space) fails the round's other records to that topic with its error unsent: each
        would block as long, and a round of many dead letters would outlast the liveness probe.
        """
        s = self.settings
        pending = [Outgoing(s.output_topic, r.key, r.value, None) for r in results]
        pending += [Outgoing(s.dlq_topic, k, v, h) for k, v, h in dead]
        dropped: list[Outgoing] = []  # dead letters that can never be sent
        attempt = 0
        isolate = False  # one record a round: after the producer failed for good
        while pending:
            last_error: Exception | None = None
            failing: dict[str, Exception] = {}  # the last retried error of each topic
            sent: list[tuple[Outgoing, Any]] = []
            held = pending[1:] if isolate else []
            blocked: dict[str, KafkaTimeoutError] = {}  # topic -> the timeout its send ran into
            unknown: set[str] = set()  # topics the broker answered without, this round
            for msg in pending[:1] if isolate else pending:
                if msg.topic in blocked:  # it would block max_block_ms again
                    sent.append((msg, blocked[msg.topic]))
                    continue
                answers = metadata_answers(self.producer)
                try:
                    future = self.producer.send(
                        msg.topic, key=msg.key, value=msg.value, headers=msg.headers
                    )
                except KafkaTimeoutError as exc:  # it blocked max_block_ms
                    future = blocked[msg.topic] = exc
                    if topic_unknown(self.producer, msg.topic, answers):
                        unknown.add(msg.topic)
                    self._beat()  # waiting on the broker, not a wedged loop
                except (KafkaError, *SEND_REFUSALS) as exc:  # raised by send itself: sorted below
                    future = exc
                sent.append((msg, future))
            # the round's waits share one floor past the drain's deadline (STOP_SEND_MIN_S)
            floor_at = time.monotonic() + STOP_SEND_MIN_S
            try:
                self._wait_sliced(lambda t: self.producer.flush(timeout=t), SEND_WAIT_S, floor_at)
            except KafkaError as exc:
                log.warning("flush failed: %s", exc)
            failure = producer_failure(self.producer)
            if failure is not None:  # before any future's error is read as this record's own
                undelivered = [m for m, f in sent if not delivered(f)]
                if not isolate:
                    # every record failed with the one error: resend those not delivered one
                    # at a time, on a new producer, so the one the broker refuses is known
                    self._renew_producer(failure, undelivered)
                    isolate = True
                    pending = undelivered + held
                    continue
                if not isinstance(failure, TOO_LARGE):
                    raise self._failed_for_good(failure, undelivered) from failure
                # alone in its round, this record is the one the broker refused as too large:
                # a dead letter goes on below, cut down, on a new producer
                self._renew_producer(failure, undelivered)
            retry = []
            for msg, future in sent:
                error = future if isinstance(future, Exception) else None
                if error is None:
                    try:
                        self._wait_sliced(future.get, SEND_WAIT_S, floor_at, future)
                        continue
                    except KafkaError as exc:
                        error = exc
                outcome = send_outcome(msg, error, attempt, msg.topic in unknown, s.dlq_topic)
                if outcome.action == "fatal":
                    raise FatalWorkerError(outcome.reason) from error
                if outcome.action == "retry":
                    retry.append(msg)
                    last_error = failing[msg.topic] = error
                elif outcome.action == "resend":
                    log.warning("%s", outcome.reason)
                    retry.append(outcome.record)
                else:
                    log.error("%s", outcome.reason)
                    dropped.append(msg)
            pending = retry + held
            if last_error is not None:  # not only dead letters to resend smaller or repaired
                self.metrics.retries.labels("kafka").inc()
                log.warning(
                    "%d sends failed (%s); retry %d",
                    len(pending),
                    "; ".join(f"to {topic}: {exc}" for topic, exc in failing.items()),
                    attempt + 1,
                )
                self._beat()  # retrying through an outage is not a wedged loop
                # stopping (or the loop failed): the grace period is short, and the batch,
                # uncommitted, is read again after the restart (Redis counts it once)
                if self._failed.is_set() or not self.backoff.wait(attempt, self.stop):
                    raise BatchAbortedError(f"results not delivered: {last_error}")
                attempt += 1
        for result in results:
            self.metrics.results.labels(result.status).inc()
        lost = Counter(error_kind(msg.headers) for msg in dropped)
        for _, _, headers in dead:
            kind = error_kind(headers)
            if lost[kind]:  # counted apart: the DLQ does not hold it
                lost[kind] -= 1
                self.metrics.dead_letters_dropped.labels(kind).inc()
            else:
                self.metrics.dead_letters.labels(kind).inc()

    def _failed_for_good(
        self, failure: BaseException, undelivered: Sequence[Outgoing] = ()
    ) -> FatalWorkerError:
        """The error stopping the worker when the producer failed for good on ``undelivered``."""
        s = self.settings
        return FatalWorkerError(failed_for_good(failure, undelivered, s.output_topic, s.dlq_topic))

    def _renew_producer(self, failure: BaseException, undelivered: Sequence[Outgoing] = ()) -> None:
        """Replace a producer that failed for good (``producer_failure``) with a new one; stop
        the worker when it cannot make one."""
        if self.new_producer is None:
            raise self._failed_for_good(failure, undelivered) from failure
        log.warning("the Kafka producer failed for good (%r); making a new one", failure)
        self.metrics.retries.labels("kafka").inc()
        try:
            self.producer.close(timeout=0)
        except Exception as exc:  # it failed already; closing is only tidying up
            log.debug("closing the failed producer: %r", exc)
        try:
            self.producer = self.new_producer()
        except Exception as exc:  # connect timeout or interrupted: no producer to go on with
            raise FatalWorkerError(f"a new Kafka producer did not connect: {exc!r}") from exc

    def _apply_trends(self, records: list[TrendRecord]) -> None:
        """Apply a batch's counts, retrying a Redis outage for as long as it lasts.

        A refusal (a password rotated or an ACL revoked under a running worker) is not an
        outage: retried, it kept the liveness probe green while nothing was committed, so
        ``SEND_RETRY_LIMIT`` of them in a row stop the worker, as an authorization refusal by
        the broker does.
        """
        refusals = 0
        for attempt in itertools.count():
            try:
                result = self.trends.apply(records)
                if result.ignored:
                    self.metrics.trends_ignored.inc(result.ignored)
                if result.duplicates:
                    self.metrics.trend_duplicates.inc(result.duplicates)
                break
            except RedisError as exc:
                refusal = self._redis_refusal(exc)
                refusals = refusals + 1 if refusal is not None else 0
                if refusals >= SEND_RETRY_LIMIT:
                    raise FatalWorkerError(
                        f"Redis refuses this worker: {refusal} (after {attempt + 1} tries)"
                    ) from exc
                self.metrics.retries.labels("redis").inc()
                log.warning("applying trends failed (%s); retry %d", exc, attempt + 1)
                self._beat()  # a Redis outage: a restart would not end it
                # none once the loop failed (the worker is going down, the batch stays
                # uncommitted)
                if self._failed.is_set() or not self._retry_after(attempt):
                    raise BatchAbortedError(f"trends not applied: {exc}") from exc
        self._watch_ignored(records, result)

    def _redis_refusal(self, exc: RedisError) -> str | None:
        """Why Redis refuses this worker for good (``redis_refusal``), or None.

        A server that began requiring a password drops a connection that sends a long command
        unauthenticated (the trends write), which redis-py reports as a broken connection
        only; a PING then gets the server's answer (NOAUTH, an AuthenticationError).
        """
        refusal = redis_refusal(exc)
        if refusal is None and isinstance(exc, RedisConnectionError):
            try:
                self.trends.ping()
            except RedisError as probe:
                refusal = redis_refusal(probe)
        return refusal

    def _watch_ignored(self, records: list[TrendRecord], result: ApplyResult) -> None:
        """Warn when a partition's records have been ignored for longer than a redelivery
        lasts (``IgnoredRuns``): the INFO line per batch and the counter are all that would
        show otherwise, while nothing of the partition is counted."""
        if not result.ignored:
            for rec in records:
                self._ignored_runs.add((rec.topic, rec.partition), False, 0, 0.0)
            return
        try:
            positions = self.trends.positions()
        except RedisError as exc:  # the batch is applied; the next ignored one checks again
            log.debug("reading the applied positions failed: %r", exc)
            return
        now = time.monotonic()
        for (topic, partition), (ignored, count, low, high) in fully_ignored(
            records, result, positions
        ).items():
            run = self._ignored_runs.add((topic, partition), ignored, count, now)
            if run is None:
                continue
            log.warning(
                "trends: %d records of %s:%d in a row were ignored as applied before: its stored "
                "applied offset is %d, and the worker reads offsets %d..%d. A redelivery ignores "
                "a few batches at most; the topic was likely deleted and recreated, or the "
                "group's offsets reset back, and nothing of this partition is counted. If so, "
                "delete the position (docs/trends.md): HDEL %s %s:%d (or DEL the whole hash for "
                "a recreated topic)",
                run,
                topic,
                partition,
                positions[(topic, partition)],
                low,
                high,
                applied_key(self.settings.group_id),
                topic,
                partition,
            )

    def _commit(self, offsets: Offsets) -> None:
        """Commit, retrying a broker failure; give up (the records are then read again, and
        Redis counts them once) on a rebalance, after 5 tries, or once stopping after 3 or at
        the drain's deadline (each try then waits only what is left of it, STOP_COMMIT_MIN_MS
        at least: a batch delivered and counted gets one short try)."""
        for attempt in range(5):
            left = self._drain_left()
            timeout_ms = None if left is None else max(STOP_COMMIT_MIN_MS, int(left * 1000))
            try:
                self.consumer.commit(offsets=offsets, timeout_ms=timeout_ms)
                for tp, meta in offsets.items():
                    self._committed[tp] = meta.offset
                self.metrics.last_commit.set_to_current_time()
                return
            except (CommitFailedError, RebalanceInProgressError) as exc:
                # the group is rebalancing or has: only a poll() can finish the join, so a retry
                # here fails the same way (kafka-python 3 raises RebalanceInProgressError while
                # the join is pending). Whoever owns the partitions next re-reads these records.
                log.warning(
                    "commit refused during a rebalance (%s); records will be redelivered", exc
                )
                return
            except KafkaError as exc:
                self.metrics.retries.labels("kafka").inc()
                log.warning("commit failed (%s); retry %d", exc, attempt + 1)
                if not self._retry_after(attempt):
                    break  # stopping: the grace period is short, a redelivery is harmless
        log.error("giving up committing %s; records will be redelivered and deduplicated", offsets)

    def _retry_after(self, attempt: int) -> bool:
        """Wait out try ``attempt``'s back-off; False when not to try again: once stopping, a
        few quick tries (3) within the drain's deadline, for a commit or a Redis apply."""
        return self.backoff.wait(attempt, self.stop) or (attempt < 2 and bool(self._drain_left()))

    def _clock_drain(self) -> None:
        """The ``stop-deadline`` thread: start the drain's clock the moment the flag is set."""
        self.stop.wait()
        self._drain_left()

    def _drain_left(self) -> float | None:
        """Seconds left of the drain (DRAIN_DEADLINE_S, from when the stop flag was first seen
        set); None while not stopping."""
        if not self.stop.is_set():
            return None
        now = time.monotonic()
        if self._drain_deadline is None:  # two threads at once differ by microseconds
            self._drain_deadline = now + DRAIN_DEADLINE_S
        return max(0.0, self._drain_deadline - now)

    def _wait_sliced(
        self,
        wait: Callable[[float], Any],
        limit_s: float,
        floor_at: float = 0.0,
        future: Any = None,
    ) -> Any:
        """``wait(timeout)`` (a producer's flush, a send's ``get``) for ``limit_s`` in all, in
        slices of at most WAIT_SLICE_S, so that a stop cuts it to what is left of the drain
        (but not before ``floor_at``, a delivery round's STOP_SEND_MIN_S), and a failed loop to
        nothing. kafka-python raises KafkaTimeoutError when a slice runs
        out, and also for a record that expired in its buffer: that one (its ``future`` done,
        or raised well before the slice ran out) is re-raised at once."""
        end = time.monotonic() + limit_s
        while True:
            started = time.monotonic()
            stop_at = end
            drain = self._drain_left()
            if drain is not None:
                # not before ``floor_at``: a batch finished at the deadline is still
                # acknowledged by a healthy broker (flush(0) fails whatever the broker)
                stop_at = min(end, max(started + drain, floor_at))
            if self._failed.is_set():
                stop_at = started
            left = stop_at - started
            slice_s = max(0.0, min(WAIT_SLICE_S, left))
            try:
                return wait(slice_s)
            except KafkaTimeoutError:
                if (
                    left <= WAIT_SLICE_S
                    or getattr(future, "is_done", False)
                    or time.monotonic() - started < slice_s / 2
                ):
                    raise

    def _beat(self) -> None:
        """A retry loop's heartbeat, none once the loop failed (the worker is going down: the
        liveness probe must not stay green while it waits). On the consumer's thread (the
        serial loop) it refreshes the lag gauge too, which then shows the stuck batch; in the
        overlapped loop the retries run on the delivery thread, and the consumer's thread goes
        on refreshing it."""
        if self._failed.is_set():
            return
        self.metrics.beat()
        if threading.get_ident() == self._loop_thread:
            self._update_lag()

    def _update_lag(self) -> None:
        """Set ``carstream_lag`` for each partition held: its end offset minus where the group
        resumes it (``_committed``), so records read but stuck before their commit count.

        The end offset is the client's highwater mark, which only fetches refresh. Once the
        loop has not fetched for LAG_END_REFRESH_S (a batch retrying through an outage, a full
        pipeline) it is asked of the broker, at most that often, so the lag of a stuck worker
        grows with what is produced meanwhile; with the broker out too it stays at the last
        known end. A partition nothing was read from yet has no value. Consumer thread only:
        kafka-python's consumer is not thread-safe.
        """
        assigned = self.consumer.assignment()
        held = [tp for tp in list(self._committed) if tp in assigned]
        now = time.monotonic()
        due = now - max(self._fetched_at, self._end_asked_at) >= LAG_END_REFRESH_S
        if held and due and not self.stop.is_set():
            self._end_asked_at = now
            try:
                self._end.update(self.consumer.end_offsets(held, timeout_ms=LAG_END_TIMEOUT_MS))
            except KafkaError as exc:  # the broker is out too: the last known end stands
                log.debug("end offsets for carstream_lag: %r", exc)
        for tp in held:
            try:
                high = self.consumer.highwater(tp)
            except KafkaError:  # revoked since assignment() (IllegalStateError)
                continue
            # the larger: an end offset asked for is newer than a fetch's, never behind it
            ends = [end for end in (high, self._end.get(tp)) if end is not None]
            committed = self._committed.get(tp)
            position = None
            if committed is not None and committed >= self._polled.get(tp, 0):
                with contextlib.suppress(KafkaError):  # revoked meanwhile: the commit alone
                    position = self.consumer.position(tp, timeout_ms=0)
            lag = partition_lag(max(ends, default=None), committed, position)
            if lag is not None:
                self.metrics.lag.labels(str(tp.partition)).set(lag)
