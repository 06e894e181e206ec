"""Files whose bytes are identical in the training and the test split: test images already seen.

CompCars (and scraped folder trees) hold exact duplicates, the same photo under two names; when
one is listed for training and the other for testing, the test score counts an image the model
was trained on. This finds them for any reader, from the indexes' paths alone.

Cheap on a large archive: every file is ``os.stat``-ed; only files whose size equals the size of
a file in the other split are read, first their first ``PREFIX_BYTES``, then in full only where
those prefixes still match (files no longer than the prefix are settled by it). The digest is
BLAKE2b: a match is byte identity, short of a deliberate collision.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX_BYTES = 64 * 1024
READ_CHUNK = 1024 * 1024

# (training files, test files) of one group of candidates, keyed by what they share so far
Groups = dict[Hashable, tuple[list[Path], list[Path]]]


@dataclass(frozen=True)
class TrainTestDuplicates:
    """Test images whose bytes equal a training image's, in test-index order."""

    # (training file, test file): per leaked test image, the first training file it equals
    pairs: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many test images have a byte-identical training image."""
        return len(self.pairs)


def _file_size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since it was indexed: the loader reports it, nothing to compare here
        return None


def _digest(path: Path, limit: int | None) -> bytes | None:
    """BLAKE2b of the first ``limit`` bytes of ``path`` (all when None); None if unreadable."""
    h = hashlib.blake2b(digest_size=32)
    left = limit
    try:
        with open(path, "rb") as f:
            while left is None or left > 0:
                chunk = f.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                if left is not None:
                    left -= len(chunk)
    except OSError:
        return None
    return h.digest()


def _split_groups(groups: Groups, key: Callable[[Path], Hashable | None]) -> Groups:
    """Each group split further by ``key``; only sub-groups with files of both splits are kept."""
    out: Groups = {}
    for outer, (train, test) in groups.items():
        sub: dict[Hashable, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
        for side, paths in enumerate((train, test)):
            for p in paths:
                k = key(p)
                if k is not None:
                    sub[k][side].append(p)
        for inner, (a, b) in sub.items():
            if a and b:
                out[(outer, inner)] = (a, b)
    return out


def find_train_test_duplicates(
    train: Iterable[Path], test: Iterable[Path], prefix_bytes: int = PREFIX_BYTES
) -> TrainTestDuplicates:
    """The test files whose bytes equal some training file's (a path listed in both splits
    counts too). Pure apart from reading the files; unreadable files are left out."""
    train_paths = list(dict.fromkeys(Path(p) for p in train))
    test_paths = list(dict.fromkeys(Path(p) for p in test))
    sizes: dict[Path, int | None] = {p: _file_size(p) for p in (*train_paths, *test_paths)}
    groups = _split_groups({None: (train_paths, test_paths)}, sizes.get)
    groups = _split_groups(groups, lambda p: _digest(p, prefix_bytes))
    settled: Groups = {}
    longer: Groups = {}
    for key, (a, b) in groups.items():
        size = key[0][1]  # ((None, size), prefix digest)
        (longer if size > prefix_bytes else settled)[key] = (a, b)
    settled.update(_split_groups(longer, lambda p: _digest(p, None)))
    first_train: dict[Path, Path] = {}
    for train_group, test_group in settled.values():
        for t in test_group:
            first_train.setdefault(t, train_group[0])
    return TrainTestDuplicates([(first_train[t], t) for t in test_paths if t in first_train])
