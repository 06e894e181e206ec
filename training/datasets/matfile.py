"""Reading a names ``.mat`` file (CompCars' make/model names) in a short-lived child process.

Why a child: ``scipy.io.loadmat`` on a damaged file raises whatever its parser trips over
(TypeError, UnboundLocalError, MemoryError, ...) and on some byte flips crashes in its C code
(a segfault), which would end a training run with no message at all. The child loads the file,
checks it and hands back the names as JSON; any exception it meets, a crash, or a hang becomes a
:class:`DatasetError`, one line naming the file. One child per file per process: the reply is
cached while the file is unchanged (training indexes both splits from the same file).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets.base import DatasetError

READ_TIMEOUT_S = 120.0  # the real file loads in milliseconds; this is for a reader stuck in a loop
CHILD_MEMORY_BYTES = 2 << 30  # address space the child may add after its imports
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ``training/``
# appended to sys.path, not put in PYTHONPATH: an installed package's root is site-packages,
# which must not come before the standard library
CHILD_CODE = (
    f"import sys; sys.path.append({str(PACKAGE_ROOT)!r}); "
    "from training.datasets.matfile import child_main; child_main()"
)

_replies: dict[tuple[str, int, int, str], str] = {}


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def cell_problem(item: Any) -> str | None:
    """Why one cell of a names array is not a name, or None.

    A name is text, a number (MATLAB keeps numbers as doubles) or empty. Anything else (a struct,
    a nested cell, a complex number) would be printed as a label like ``(array([[1]]),)``.
    """
    if isinstance(item, str):
        return None
    arr = np.asarray(item)
    if arr.dtype.names is not None:
        return "a struct"
    if arr.size == 0:
        return None
    if arr.dtype.kind in "USfiu":
        return None
    if arr.dtype.kind == "O":
        return "a nested cell array"
    return f"a value of type {arr.dtype}"


def names_problem(value: Any) -> str | None:
    """Why a variable is not an array of names (a cell array of strings, a char array), or None."""
    if not isinstance(value, np.ndarray):
        return f"a {type(value).__name__}"
    if value.dtype.names is not None:
        return "a struct, not an array of strings"
    if value.dtype.kind not in "OU":
        return f"an array of {value.dtype}, not of strings"
    if value.size == 0:
        return "empty"
    if value.dtype.kind == "O":
        for i, item in enumerate(value.reshape(-1)):
            if problem := cell_problem(item):
                return f"not an array of strings (element {i + 1} is {problem})"
    return None


def resolve(parser: str) -> Any:
    """The function ``module:name`` names (a parser of a loaded .mat dict)."""
    module, _, name = parser.partition(":")
    return getattr(importlib.import_module(module), name)


def parse_mat(mat_path: Path, parser: str) -> Any:
    """Load ``mat_path`` and run ``parser`` (``module:function``, taking the loaded dict and the
    path) on it, in this process; any failure of the reader is a DatasetError naming the file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as exc:  # damaged bytes make loadmat raise almost anything, MemoryError too
        raise DatasetError(f"unreadable {mat_path}: {first_line(exc)}") from exc
    try:
        return resolve(parser)(mat, mat_path)
    except DatasetError:
        raise
    except Exception as exc:  # odd contents the parser did not foresee: still the file's fault
        raise DatasetError(f"unreadable {mat_path}: {first_line(exc)}") from exc


def _limit_memory() -> None:
    """Cap the child's address space a little above what its imports took, so a damaged header
    claiming a huge array fails with MemoryError instead of filling the machine (Linux only)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = used + CHILD_MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError):
        pass


def child_main() -> None:
    """The child's entry point: ``argv = [parser, path]``; prints one JSON reply on stdout."""
    import scipy.io  # noqa: F401  (imported before the memory cap)

    parser, path = sys.argv[1], sys.argv[2]
    resolve(parser)
    _limit_memory()
    try:
        reply = {"names": parse_mat(Path(path), parser)}
    except DatasetError as exc:
        reply = {"error": str(exc).splitlines()[0]}
    except MemoryError:
        reply = {"error": f"unreadable {path}: MemoryError"}
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()


def child_env() -> dict[str, str]:
    """The parent's environment, with one BLAS thread."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def signal_name(number: int) -> str:
    try:
        return f"signal {number}, {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"


def run_child(mat_path: Path, parser: str) -> str:
    """The child's JSON reply for ``mat_path``; a crash, hang or garbled reply is a DatasetError."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD_CODE, parser, os.fspath(mat_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=READ_TIMEOUT_S,
            env=child_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise DatasetError(
            f"{mat_path} could not be read (the reader took over {READ_TIMEOUT_S:g} s)"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{mat_path} could not be read (no reader process: {exc})") from exc
    if proc.returncode < 0:
        raise DatasetError(
            f"{mat_path} could not be read (the reader crashed: {signal_name(-proc.returncode)})"
        )
    reply = proc.stdout.decode(errors="replace")
    if proc.returncode != 0 or not reply.strip():
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DatasetError(
            f"{mat_path} could not be read (the reader exited with code {proc.returncode}"
            + (f": {detail[-1]})" if detail else ")")
        )
    return reply


def read_mat(mat_path: Path, parser: str) -> Any:
    """What ``parser`` (``module:function``) makes of ``mat_path``, computed in a child process.

    The parser must return JSON-able data and raise DatasetError for contents it refuses.
    """
    st = mat_path.stat()
    key = (os.fspath(mat_path.resolve()), st.st_mtime_ns, st.st_size, parser)
    if key not in _replies:
        _replies[key] = run_child(mat_path, parser)
    try:
        reply = json.loads(_replies[key])
    except ValueError as exc:
        raise DatasetError(f"{mat_path} could not be read (the reader's reply is garbled)") from exc
    if not isinstance(reply, dict) or not ({"names"} <= reply.keys() or {"error"} <= reply.keys()):
        raise DatasetError(f"{mat_path} could not be read (the reader's reply is garbled)")
    if "error" in reply:
        raise DatasetError(str(reply["error"]))
    return reply["names"]
