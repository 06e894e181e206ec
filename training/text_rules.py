"""Which characters a name that people will read may not hold: one rule for every such name.

A class name (from a folder or CompCars' ``.mat`` files), a model name and version, and an
artifact's file name go into labels.json, the checkpoint, the bundle's manifest, every result
message, the logs and CSV exports. A control character (newline, tab, escape, NUL...) or a
line/paragraph separator there would break lines, forge log entries or split CSV rows, so the
readers (``training.datasets``) and ``engine_build.manifest`` refuse them with this one scan.

Standard library only (and training/__init__.py is empty), so engine_build imports it cheaply.
"""

from __future__ import annotations

import unicodedata

# Unicode categories refused: control characters (Cc: newline, tab, escape, NUL, DEL...) and the
# line and paragraph separators (Zl U+2028, Zp U+2029)
UNPRINTABLE = ("Cc", "Zl", "Zp")


def first_unprintable(text: str) -> str | None:
    """The first control character or line/paragraph separator in ``text``, or None."""
    return next((c for c in text if unicodedata.category(c) in UNPRINTABLE), None)
