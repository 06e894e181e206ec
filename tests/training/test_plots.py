"""The result plots with class names the font cannot draw (Chinese names in CompCars' .mat)."""

from __future__ import annotations

import warnings

from PIL import Image

from training import plots

CLASSES = [
    {"make": "奔驰", "model": "C级 AMG", "make_id": 3, "model_id": 31},
    {"make": "Škoda", "model": "Fabia", "make_id": 1, "model_id": 11},
    {"make": "奔驰", "model": "", "make_id": "奔驰", "model_id": None},  # a folder class
]


def test_a_name_the_font_cannot_draw_is_labelled_by_its_ids(monkeypatch):
    # a font with Latin glyphs only, as matplotlib's default DejaVu Sans, whatever is installed
    monkeypatch.setattr(plots, "_font_chars", lambda: frozenset(range(0x250)))
    assert plots.class_label(CLASSES, 1) == "Škoda Fabia"
    assert plots.class_label(CLASSES, 0) == "class 0 (3/31)"
    assert plots.class_label(CLASSES, 2) == "class 2"


def test_confused_pairs_with_undrawable_names_warn_nothing(tmp_path):
    pairs = [{"true": 0, "pred": 1, "count": 3}, {"true": 2, "pred": 0, "count": 1}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plots.confused_pairs(pairs, CLASSES, tmp_path / "pairs.png")
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]
    with Image.open(path) as img:
        assert img.size[0] > 0
