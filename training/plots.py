"""PNG plots of a run's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported when a plot is drawn: importing it costs
    ~0.7 s, which every ``python -m training`` command (a mistyped flag too) would pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(c: dict[str, Any]) -> str:
    return f"{c['make']} {c['model']}".strip()


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confused_pairs(pairs: list[dict[str, Any]], classes: list[dict[str, Any]], path: Path) -> Path:
    """The most frequent (true -> predicted) mistakes as a horizontal bar chart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(pairs), 3) + 1))
    names = [f"{_label(classes[p['true']])} → {_label(classes[p['pred']])}" for p in pairs]
    ax.barh(range(len(pairs)), [p["count"] for p in pairs])
    ax.set_yticks(range(len(pairs)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images")
    ax.set_title("Most confused pairs (true → predicted)" if pairs else "No confusions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
