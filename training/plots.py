"""PNG plots of a run's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

# matplotlib's warning for each character its font cannot draw (a Chinese make name in
# make_model_name.mat): several lines on stderr per character, while the label says why instead
GLYPH_WARNING = r"Glyph \d+ .*missing from font"


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported when a plot is drawn: importing it costs
    ~0.7 s, which every ``python -m training`` command (a mistyped flag too) would pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset[int]:
    """The code points matplotlib's default font can draw (DejaVu Sans unless configured)."""
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(ft2font.FT2Font(path).get_charmap())


def drawable(text: str) -> bool:
    """Whether the plots' font has a glyph for every character of ``text``."""
    chars = _font_chars()
    return all(ord(ch) in chars for ch in text)


def class_label(classes: list[dict[str, Any]], index: int) -> str:
    """A class as a plot labels it: ``Audi A4L``; ``class 3 (3/31)`` (its index in labels.json
    and its ids) when the font cannot draw the name, which would otherwise render as boxes."""
    c = classes[index]
    name = f"{c['make']} {c['model']}".strip()
    if drawable(name):
        return name
    ids = "/".join(str(c[k]) for k in ("make_id", "model_id") if c.get(k) is not None)
    return f"class {index} ({ids})" if ids and drawable(ids) else f"class {index}"


def _save(fig: Any, path: Path) -> None:
    """Lay out and write ``fig``, without matplotlib's missing-glyph warnings (see
    ``GLYPH_WARNING``; class labels fall back to ids where the font lacks a glyph)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GLYPH_WARNING, category=UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=100)


def per_class_vs_frequency(
    per_class: list[dict[str, Any]], train_counts: list[int], path: Path
) -> Path:
    """Does accuracy follow training frequency? One point per class."""
    xs = [train_counts[c["index"]] for c in per_class if c["accuracy"] is not None]
    ys = [c["accuracy"] for c in per_class if c["accuracy"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=12, alpha=0.7)
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test top-1 accuracy of the class")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Per-class accuracy vs training frequency")
    _save(fig, path)
    plt.close(fig)
    return path


def confused_pairs(pairs: list[dict[str, Any]], classes: list[dict[str, Any]], path: Path) -> Path:
    """The most frequent (true -> predicted) mistakes as a horizontal bar chart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(pairs), 3) + 1))
    names = [
        f"{class_label(classes, p['true'])} → {class_label(classes, p['pred'])}" for p in pairs
    ]
    ax.barh(range(len(pairs)), [p["count"] for p in pairs])
    ax.set_yticks(range(len(pairs)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images")
    ax.set_title("Most confused pairs (true → predicted)" if pairs else "No confusions")
    _save(fig, path)
    plt.close(fig)
    return path


def compare_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against cost (GFLOPs) per architecture."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["gflops"], r["top1"], s=40)
        ax.annotate(r["arch"], (r["gflops"], r["top1"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("test top-1")
    ax.set_title("Accuracy vs cost")
    _save(fig, path)
    plt.close(fig)
    return path
