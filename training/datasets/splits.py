"""Split files (CompCars' ``train.txt``/``test.txt``, sv_data's ``*_surveillance.txt``): one image
path per line, relative to the archive's ``image/`` folder.

A path that leaves the archive is refused, naming the file and line: a split file is data, and
must not make training read (or, in a bundle's parity set, ship) files from elsewhere. Mistakes
that still give a usable data set (a line listed twice, an image in both splits, a class with no
training images) are warned about once per run, with counts and a few examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from training.datasets.base import DatasetError

log = logging.getLogger(__name__)

EXAMPLES = 3
_warned: set[tuple[Any, ...]] = set()


def examples(items: list[str]) -> str:
    """The first few items, for a message: ``a, b, c, ...``."""
    shown = ", ".join(items[:EXAMPLES])
    return shown + (", ..." if len(items) > EXAMPLES else "")


def normal_line(line: str) -> str:
    """A listed path as compared across lines: ``a//b`` and ``./a/b`` name ``a/b``."""
    return str(PurePosixPath(line))


def escape_problem(line: str) -> str | None:
    """How a listed path would leave the archive's ``image/`` folder, or None when it stays in."""
    path = PurePosixPath(line)
    if path.is_absolute():
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' component"
    return None


def duplicate_message(path: Path, lines: list[str]) -> str | None:
    """A warning about lines of one split file that list the same image, or None."""
    counts = Counter(normal_line(ln) for ln in lines)
    repeated = [ln for ln, n in counts.items() if n > 1]
    if not repeated:
        return None
    extra = sum(n - 1 for n in counts.values())
    return (
        f"{path}: {extra} duplicate line(s), {len(repeated)} image(s) listed more than once "
        f"(e.g. {examples(repeated)}); each listing is used, so those images weigh more"
    )


def warn_once(message: str, *files: Path) -> None:
    """Log ``message`` as a warning unless it was logged for the same, unchanged ``files`` before:
    training indexes the train and the test split, and each reads both split files."""
    stamps = []
    for f in files:
        try:
            st = f.stat()
            stamps.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((str(f), None, None))
    key = (message, *stamps)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def read_split(path: Path) -> list[str]:
    """The non-empty lines of a split file, stripped, in file order (a UTF-8 BOM is accepted)."""
    if not path.is_file():
        raise DatasetError(f"missing split file {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"split file {path} is not UTF-8 text ({exc.reason})") from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if problem := escape_problem(line):
            raise DatasetError(
                f"{path}, line {number}: {line!r} escapes the archive ({problem}); split files "
                "list paths inside image/"
            )
        lines.append(line)
    if message := duplicate_message(path, lines):
        warn_once(message, path)
    return lines


def class_label(cls: dict[str, Any]) -> str:
    """A class as people read it in a message: ``Audi A4L (2/10)`` (names, then ids)."""
    name = f"{cls.get('make', '')} {cls.get('model', '')}".strip()
    ids = "/".join(str(cls[k]) for k in ("make_id", "model_id") if cls.get(k) is not None)
    return f"{name} ({ids})" if ids else name


def split_warnings(
    files: dict[str, Path],
    rows: dict[str, list[tuple[str, int]]],
    classes: list[dict[str, Any]],
) -> list[str]:
    """Warnings about how the two splits relate: images listed in both (the test metrics would
    count images trained on) and classes with test images but no training images (the model
    cannot learn them). ``rows`` maps ``train``/``test`` to ``(line, class index)`` pairs."""
    out = []
    train_lines = {normal_line(ln) for ln, _ in rows["train"]}
    both = sorted({normal_line(ln) for ln, _ in rows["test"]} & train_lines)
    if both:
        out.append(
            f"{len(both)} image(s) are listed in both {files['train']} and {files['test']} "
            f"(e.g. {examples(both)}): test metrics will count images the model trained on"
        )
    trained = {target for _, target in rows["train"]}
    untrained = sorted({target for _, target in rows["test"]} - trained)
    if untrained:
        out.append(
            f"{len(untrained)} of {len(classes)} classes have test images but no line in "
            f"{files['train']} (e.g. {examples([class_label(classes[t]) for t in untrained])}): "
            "the model cannot learn them"
        )
    return out
