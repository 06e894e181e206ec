"""``make-sample``: a SYNTHETIC data set in the exact CompCars web-nature archive layout.

The images are drawn cars (body, cabin, wheels) whose colour and proportions depend on the
class, placed at random on a noisy background, so a small CNN learns them in a few epochs. The
archive's quirks are all there, so the reader's handling of them is exercised end to end:
a year directory named ``unknown``, an empty model name, one make name under two ids, split
lines naming images that are missing, and a model in the archive that no split lists.
"""

from __future__ import annotations

import argparse
import colorsys
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

from training.cli import BadArgumentError, check_out_dir, seed_int
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter

# real makes with their own models, so the demo's trend tables read like the real thing
MAKE_MODELS = {
    "Audi": ["A4L", "Q5", "A6L", "Q3"],
    "BMW": ["X5", "3 Series", "X1", "5 Series"],
    "Toyota": ["Corolla", "RAV4", "Camry", "Yaris"],
    "Volvo": ["XC60", "S60", "XC90", "V40"],
    "Honda": ["Civic", "CR-V", "Accord", "Fit"],
    "Kia": ["K5", "Sportage", "Rio", "Sorento"],
    "Mazda": ["CX-5", "Mazda3", "Mazda6", "MX-5"],
    "Skoda": ["Octavia", "Superb", "Fabia", "Kodiaq"],
    "Fiat": ["Panda", "500", "Tipo", "Punto"],
    "Jeep": ["Wrangler", "Cherokee", "Renegade", "Compass"],
}
MAKE_NAMES = list(MAKE_MODELS)
TRAIN_FRACTION = 0.7
MISSING_PER_SPLIT = 2
MIN_CLASSES = 3  # room for every quirk: an empty model name, one make name under two ids, ...
MIN_PER_CLASS = 2  # one train and one test image


@dataclass(frozen=True)
class SampleClass:
    make_id: int
    model_id: int
    make: str
    model: str  # '' for the deliberately empty model name
    year: str
    in_split: bool


def plan_classes(num_classes: int) -> list[SampleClass]:
    """Class layout with every quirk; ids are non-contiguous like the real archive's."""
    num_makes = max(2, (num_classes + 1) // 2)
    make_ids = [2 + 3 * k for k in range(num_makes)]
    make_names = [MAKE_NAMES[k % len(MAKE_NAMES)] for k in range(num_makes)]
    make_names[-1] = make_names[0]  # one make name under two ids
    out = []
    used = dict.fromkeys(make_names, 0)
    for i in range(num_classes + 1):  # the last one is in the archive but in no split
        k = i % num_makes if i < num_classes else 0
        models = MAKE_MODELS[make_names[k]]
        j = used[make_names[k]]  # models of one make name stay distinct across its ids
        used[make_names[k]] += 1
        model = models[j % len(models)] + ("" if j < len(models) else f" {j // len(models) + 1}")
        out.append(
            SampleClass(
                make_id=make_ids[k],
                model_id=10 + 5 * i,
                make=make_names[k],
                model="" if i == 1 else model,
                year="unknown" if i == 2 % num_classes else str(2010 + i % 6),
                in_split=i < num_classes,
            )
        )
    return out


def draw_car(cls_index: int, num_classes: int, rng: random.Random) -> tuple[Image.Image, tuple]:
    """One image and its car's box (x1, y1, x2, y2), 0-based, exclusive end."""
    w = rng.randint(140, 220)
    h = int(w * rng.uniform(0.65, 0.8))
    base = np.array([rng.randint(60, 200)] * 3) + np.array([rng.randint(-20, 20) for _ in range(3)])
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, (h, w, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)

    frac = cls_index / max(num_classes, 1)
    hue = (frac + rng.uniform(-0.02, 0.02)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, rng.uniform(0.75, 0.95))
    body_colour = (int(r * 255), int(g * 255), int(b * 255))
    aspect = 2.0 + 1.5 * ((cls_index * 3) % num_classes) / max(num_classes - 1, 1)
    cabin_len = 0.35 + 0.3 * ((cls_index * 5 + 1) % num_classes) / max(num_classes - 1, 1)
    cabin_pos = 0.1 + 0.4 * ((cls_index * 7 + 2) % num_classes) / max(num_classes - 1, 1)
    wheel = 0.45 + 0.3 * (cls_index % 3) / 2

    length = w * rng.uniform(0.5, 0.85)
    body_h = length / aspect * 0.6
    cabin_h = body_h * 0.8
    wheel_r = body_h * wheel
    total_h = cabin_h + body_h + wheel_r
    x1 = rng.uniform(2, w - length - 2)
    y1 = rng.uniform(2, max(3, h - total_h - 2))
    flip = rng.random() < 0.5
    body_top = y1 + cabin_h
    cpos = (1 - cabin_pos - cabin_len) if flip else cabin_pos
    cx1 = x1 + length * cpos
    draw.rectangle([cx1, y1, cx1 + length * cabin_len, body_top], fill=(40, 60, 90))
    draw.rectangle([x1, body_top, x1 + length, body_top + body_h], fill=body_colour)
    for wx in (x1 + length * 0.2, x1 + length * 0.8):
        cy = body_top + body_h
        draw.ellipse([wx - wheel_r, cy - wheel_r, wx + wheel_r, cy + wheel_r], fill=(15, 15, 15))
    x2 = min(w, int(np.ceil(x1 + length)))
    y2 = min(h, int(np.ceil(body_top + body_h + wheel_r)))
    return img, (int(x1), int(y1), x2, y2)


def cell_array(names: list[str]) -> np.ndarray:
    """A MATLAB (N,1) cell array of strings, as ``make_model_name.mat`` stores names."""
    cell = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = name
    return cell


def write_names(path: Path, classes: list[SampleClass]) -> None:
    max_make = max(c.make_id for c in classes) + 3
    max_model = max(c.model_id for c in classes) + 4
    makes = [f"Unused make {i}" for i in range(1, max_make + 1)]
    models = [f"Unused model {i}" for i in range(1, max_model + 1)]
    for c in classes:
        makes[c.make_id - 1] = c.make
        models[c.model_id - 1] = c.model
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"make_names": cell_array(makes), "model_names": cell_array(models)})


def make_sample(out: Path, num_classes: int, per_class: int, seed: int) -> dict[str, int]:
    """Write the sample archive under ``out`` (``out/data/...``); return what was written."""
    rng = random.Random(seed)
    data = Path(out) / "data"
    classes = plan_classes(num_classes)
    write_names(data / "misc" / "make_model_name.mat", classes)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    n_train = max(1, round(per_class * TRAIN_FRACTION))
    images = 0
    for i, c in enumerate(classes):
        for j in range(per_class):
            rel = f"{c.make_id}/{c.model_id}/{c.year}/{seed:x}{i:03d}{j:04d}.jpg"
            img, (x1, y1, x2, y2) = draw_car(i, num_classes, rng)
            (data / "image" / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(data / "image" / rel, quality=90)
            label = (data / "label" / rel).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            viewpoint = rng.randint(1, 5)
            label.write_text(f"{viewpoint}\n1\n{x1 + 1} {y1 + 1} {x2} {y2}\n")
            images += 1
            if c.in_split:
                splits["train" if j < n_train else "test"].append(rel)
    for split, lines in splits.items():  # listed but absent, as in the real archive
        for k in range(MISSING_PER_SPLIT):
            c = classes[k % num_classes]
            lines.append(f"{c.make_id}/{c.model_id}/{c.year}/missing_{split}_{k}.jpg")
    split_dir = data / "train_test_split" / "classification"
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (split_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return {
        "classes": num_classes,
        "images": images,
        "train": len(splits["train"]) - MISSING_PER_SPLIT,
        "test": len(splits["test"]) - MISSING_PER_SPLIT,
        "missing_listed": 2 * MISSING_PER_SPLIT,
    }


def int_at_least(minimum: int, why: str) -> Callable[[str], int]:
    """An argparse type for an integer of at least ``minimum``: the first refusal names the real
    minimum (a generic ">= 1" for 0 followed by ">= 3" for 1 sent users round twice)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum} ({why})")
        return value

    return parse


def get_args_parser(add_parser=None, name: str = "make-sample") -> argparse.ArgumentParser:
    kwargs = {
        "description": "Write a small SYNTHETIC data set (drawn cars, not photos) in the exact "
        "CompCars web-nature archive layout, with the archive's quirks, for demos and tests.",
        "formatter_class": DefaultsHelpFormatter,
    }
    parser = (
        add_parser(name, help="write a SYNTHETIC CompCars-layout sample", **kwargs)
        if (add_parser)
        else OneLineParser(prog=f"python -m training {name}", **kwargs)
    )
    parser.add_argument("--out", type=path_arg, required=True, help="archive root to write")
    parser.add_argument(
        "--classes",
        type=int_at_least(MIN_CLASSES, "the sample needs room for every quirk"),
        default=6,
        help=f"models in the split (at least {MIN_CLASSES})",
    )
    parser.add_argument(
        "--per-class",
        type=int_at_least(MIN_PER_CLASS, "one train and one test image"),
        default=30,
        help=f"images per model (at least {MIN_PER_CLASS})",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that already exists and is not empty, replacing the files the "
        "sample writes (without it such an --out is refused; nothing else there is deleted)",
    )
    return parser


def check_out_is_new(out: Path, overwrite: bool) -> None:
    """Refuse an --out that already holds something (an earlier sample, or anything else) unless
    --overwrite says to write over it: a mistyped --out must not silently change a data set. An
    empty directory is used as is."""
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    raise BadArgumentError(
        f"--out {out} already exists and is not empty; pass --overwrite to write the sample over it"
    )


def main(args: argparse.Namespace) -> dict[str, int]:
    # the parser refuses these already; a Namespace built in code is checked here
    if args.classes < MIN_CLASSES:
        raise BadArgumentError(
            f"--classes must be >= {MIN_CLASSES} (the sample needs room for every quirk)"
        )
    if args.per_class < MIN_PER_CLASS:
        raise BadArgumentError(
            f"--per-class must be >= {MIN_PER_CLASS} (one train and one test image)"
        )
    check_out_dir(args.out)
    check_out_is_new(args.out, args.overwrite)
    summary = make_sample(args.out, args.classes, args.per_class, args.seed)
    print(
        f"wrote SYNTHETIC CompCars-layout sample to {args.out}: {summary['classes']} classes, "
        f"{summary['train']} train / {summary['test']} test images "
        f"(+{summary['missing_listed']} listed-but-missing, +1 unlisted model)"
    )
    return summary
