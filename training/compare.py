"""``compare``: train and evaluate several architectures on the same data; the seed's table.

Accuracy (top-1 with its 95% interval, top-5, make top-1) next to cost (training time,
parameters, GFLOPs at the crop size, PyTorch FP32 inference images/s on this machine), as
compare.md, compare.json and compare.png. Every arch is scored on the same test images, so
each one is tested against the best with paired statistics (exact McNemar, paired bootstrap):
compare_tests.json, and the per-image predictions behind them in compare_predictions.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training import plots
from training import train as train_cmd
from training.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    model_from_checkpoint,
)
from training.cli import BadArgumentError, StopRequested, positive_int
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter
from training.datasets import DatasetIndex
from training.datasets.image_dataset import UnreadableImages
from training.distributed import DistInfo, barrier, cleanup, from_main, init_distributed
from training.metrics import (
    classification_metrics,
    paired_comparison,
    topk_correct,
    wilson_interval,
)
from training.models import ARCHS, UnknownArchError, build_model
from training.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

# the worker's max_batch is at most 4096 (worker/settings.py), so no larger batch ever reaches a
# deployed engine; 40960 images at 224 px would be a 23 GiB input tensor before the first layer
MAX_BENCH_BATCH = 4096
ALPHA = 0.05  # significance level of the paired tests; the intervals are (1 - ALPHA)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
PREDICTIONS_FILE = "compare_predictions.csv"
TESTS_FILE = "compare_tests.json"
TABLE_FILE = "compare.md"
ROWS_FILE = "compare.json"
PLOT_FILE = "compare.png"
# every file a comparison writes into --out itself (each arch's run writes into its sub-directory)
COMPARE_FILES = (ROWS_FILE, TESTS_FILE, PREDICTIONS_FILE, TABLE_FILE, PLOT_FILE)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def inference_throughput(
    model: nn.Module,
    image_size: int,
    device: torch.device,
    batch: int = 16,
    iters: int = 2,
    repeats: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    """Forward throughput of the PyTorch FP32 eager model on random input: ``warmup`` batches,
    then ``repeats`` timed runs of ``iters`` batches each; images/s is their median (the min
    and max are kept). This is neither the deployed engine (TensorRT FP16) nor its batching."""
    model = model.eval().to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    for _ in range(warmup):
        model(x)
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(batch * iters / (time.perf_counter() - start))
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "backend": "pytorch-eager",
        "precision": "fp32",
        "device": str(device),
        "batch": batch,
        "repeats": repeats,
        "iters_per_repeat": iters,
        "warmup_batches": warmup,
    }


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    if not archs:
        raise BadArgumentError("--archs is empty")
    dupes = sorted({a for a in archs if archs.count(a) > 1})
    if dupes:
        raise BadArgumentError(f"--archs {text}: {', '.join(dupes)} named twice")
    for a in archs:
        if a not in ARCHS:
            raise UnknownArchError(f"unknown arch {a!r} in --archs; choose from {', '.join(ARCHS)}")
    return archs


def _top5_cell(r: dict[str, Any]) -> str:
    if r.get("top5_informative", True):
        return f"{r['top5']:.3f}"
    return f"n/a ({r.get('top5_k')} classes)"


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    """The per-arch table; rows with a ``top1_ci`` show it, rows with ``vs_best`` the paired
    test against the best arch."""
    lines = [
        header,
        "",
        "| arch | top-1 [95% CI] | top-5 | make top-1 (by name) | make top-1 (by id) "
        "| train time (s) | params (M) | GFLOPs | inference img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ci = r.get("top1_ci")
        top1 = f"{r['top1']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        by_id = r.get("make_top1_by_id")
        lines.append(
            f"| {r['arch']} | {top1} | {_top5_cell(r)} | {r['make_top1']:.3f} | "
            f"{'' if by_id is None else f'{by_id:.3f}'} | "
            f"{r['train_seconds']:.1f} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | "
            f"{r['inference_images_per_s']:.1f} |"
        )
    lines += ["", *paired_section(rows)]
    return "\n".join(lines).rstrip("\n") + "\n"


def paired_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each arch against the best top-1 on the same images, and the verdict."""
    others = [r for r in rows if r.get("vs_best")]
    if not others:
        return []
    best = others[0]["vs_best"]["best"]
    n = others[0]["vs_best"]["num_images"]
    lines = [
        f"## Paired tests against the best top-1 ({best}), on the same {n} test images",
        "",
        f"| arch | top-1 minus {best} | {1 - ALPHA:.0%} paired-bootstrap CI | right only here "
        f"| right only on {best} | McNemar exact p | at {ALPHA:.0%} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in others:
        v = r["vs_best"]
        verdict = "significant" if v["significant"] else "**not significant**"
        lo, hi = v["diff_ci"]
        lines.append(
            f"| {r['arch']} | {v['diff']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {v['only_this_right']} "
            f"| {v['only_best_right']} | {v['mcnemar_p']:.3g} | {verdict} |"
        )
    weak = [r["arch"] for r in others if not r["vs_best"]["significant"]]
    lines.append("")
    if weak:
        many = f", not corrected for {len(others)} comparisons" if len(others) > 1 else ""
        lines.append(
            f"Not significantly different from {best} at {ALPHA:.0%} (exact McNemar{many}): "
            f"{', '.join(weak)}. Their order in this table may be noise: more test images or "
            "several seeds are needed to rank them."
        )
    else:
        lines.append(f"Every other arch is significantly below {best} at {ALPHA:.0%}.")
    return lines


def footnotes(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    bench = r.get("inference", {})
    text = (
        f"Top-1 intervals: Wilson score, {1 - ALPHA:.0%}. Make top-1 by name counts a prediction "
        "right when its make name is the true one (what the worker reports and the trends "
        "count); by id, when its CompCars make id is."
    )
    if not r.get("top5_informative", True):
        text += f" Top-5 is not shown: with {r.get('top5_k')} classes it is 1.0 for any model."
    if bench:
        text += (
            f" Inference img/s: {bench['backend']} {bench['precision'].upper()} on "
            f"{bench['device']}, batch {bench['batch']}, median of {bench['repeats']} timed "
            f"runs of {bench['iters_per_repeat']} batches after {bench['warmup_batches']} "
            "warm-up batches: a relative figure between archs, not the deployed TensorRT FP16 "
            "engine's throughput (benchmarks/ measures that)."
        )
    return text + f" Per-image predictions: {PREDICTIONS_FILE}; all pairs: {TESTS_FILE}.\n"


def get_args_parser(add_parser=None, name: str = "compare") -> argparse.ArgumentParser:
    kwargs = {
        "description": "Train and evaluate several ResNets on the same data; write a table.",
        "formatter_class": DefaultsHelpFormatter,
    }
    parser = (
        add_parser(name, help="compare architectures", **kwargs)
        if add_parser
        else OneLineParser(prog=f"python -m training {name}", **kwargs)
    )
    parser.add_argument("--archs", default="resnet18,resnet34,resnet50", help="comma-separated")
    parser.add_argument("--out", type=path_arg, required=True, help="one sub-directory per arch")
    train_cmd.add_data_args(parser)
    train_cmd.add_train_args(parser)
    parser.add_argument(
        "--bench-batch",
        type=positive_int,
        default=16,
        help=f"inference benchmark batch, 1..{MAX_BENCH_BATCH} (the worker's largest max_batch)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def arch_run_args(args: argparse.Namespace, arch: str) -> argparse.Namespace:
    run_args = copy.copy(args)
    run_args.arch, run_args.out = arch, args.out / arch
    run_args.resume, run_args.stop_after = None, None
    return run_args


def previous_archs(out: Path) -> list[str]:
    """The archs of the comparison whose compare.json is in ``out`` (those whose checkpoint is
    ``out/<arch>``); [] when there is none or it cannot be read."""
    try:
        rows = json.loads((out / ROWS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(rows, list):
        return []
    archs = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        arch, checkpoint = r.get("arch"), r.get("checkpoint")
        if not isinstance(arch, str) or not isinstance(checkpoint, str):
            continue  # a hand-edited or foreign file: not a run of ours to remove
        if arch in ARCHS and Path(checkpoint).name == arch and arch not in archs:
            archs.append(arch)
    return archs


def remove_previous_comparison(out: Path, archs: list[str]) -> list[str]:
    """Remove what an earlier comparison wrote into ``out`` (``COMPARE_FILES`` and their temp
    files) and, for the archs it trained that this one does not (``archs``), their runs' files
    (``train.remove_previous_run``; a sub-directory left empty goes too); return what was
    removed. ``compare --overwrite`` calls it once the data loaded and passed the leak check,
    before the first run: its arch runs replace their
    own sub-directories, but the old table would otherwise stay, describing the old runs, until
    this comparison writes its own, and for ever if it fails or is interrupted before that;
    and the old archs' checkpoints would sit beside the new ones as if part of this comparison.
    Nothing else in ``out`` is touched."""
    removed = []
    stale_archs = [a for a in previous_archs(out) if a not in archs]
    for name in COMPARE_FILES:
        for path in (out / name, *sorted(out.glob(f".{name}.*.tmp"))):
            if path.is_symlink() or path.is_file():
                path.unlink()
                removed.append(path.name)
    for arch in stale_archs:
        run_dir = out / arch
        if run_dir.is_symlink() or not run_dir.is_dir():
            continue
        try:  # a run still writing there holds its lock: leave it be
            lock = train_cmd.hold_out_lock(run_dir)
        except BadArgumentError as exc:
            log.warning("--overwrite: not removing %s: %s", run_dir, exc)
            continue
        try:
            gone = train_cmd.remove_previous_run(run_dir)
            (run_dir / train_cmd.LOCK_FILE).unlink()
        finally:
            lock.close()
        try:
            run_dir.rmdir()  # only when nothing else is in it
            removed.append(f"{arch}/")
        except OSError:
            removed += [f"{arch}/{name}" for name in gone]
    return removed


def main(args: argparse.Namespace, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Train and measure each arch; return the table's rows (rank 0) or [] (other ranks).
    ``stop`` (set by SIGTERM) ends it between two steps of a run, as an interruption."""
    archs = parse_archs(args.archs)
    if args.bench_batch > MAX_BENCH_BATCH:  # refused now, not after every arch has trained
        raise BadArgumentError(f"--bench-batch {args.bench_batch}: must be <= {MAX_BENCH_BATCH}")
    train_cmd.check_train_args(args)  # so is a bad --image-size or --batch-size
    # every arch's --out is checked before the first one trains, not after it
    for arch in archs:
        train_cmd.check_no_checkpoint_in_out(arch_run_args(args, arch), can_resume=False)
    dist_info = init_distributed(args.device)  # one process group for all the runs (under torchrun)
    try:
        try:
            rows = _compare(args, archs, dist_info, stop)
        except Exception as exc:
            if stop is None or not stop.is_set():
                raise
            # a failure once the stop was requested is its doing: the interruption, not a crash
            raise StopRequested from exc
        barrier(dist_info)  # the other ranks wait while rank 0 measures and writes the table
        return rows
    finally:
        cleanup(dist_info)


def score_checkpoint(
    out: Path,
    index: DatasetIndex,
    args: argparse.Namespace,
    device: torch.device,
    dist_info: DistInfo | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any] | None:
    """The checkpoint training left in ``out`` scored on ``index`` as training's final
    evaluation scores it (EMA weights when kept, FP16 autocast and channels_last on CUDA unless
    --no-amp): its metrics and, per image kept, the prediction and whether top-1/top-5 are
    right. Images that do not decode are left out of ``images`` and of every per-image list.

    Under DDP (``dist_info``) every rank scores its shard, as training's evaluation does: rank 0
    reads the checkpoint and hands the others its arch, classes and preprocessing (their own
    disk may not hold it), ``evaluate_split`` gives them its weights, and rank 0 gets the scores
    (the others None) instead of rescoring alone while they wait in the next run's first
    collective, past its timeout on a large test split."""
    info = dist_info or DistInfo()
    ckpt, failure = None, None
    if info.is_main:
        try:
            ckpt = load_checkpoint(out)
        except CheckpointError as exc:
            failure = str(exc)
    shared = None if ckpt is None else (ckpt["arch"], int(ckpt["num_classes"]), ckpt["preprocess"])
    failure, shared = from_main(info, (failure, shared))
    if failure is not None:
        raise CheckpointError(failure)
    arch, num_classes, preprocess = shared
    on_cuda = device.type == "cuda"
    model = (
        model_from_checkpoint(ckpt, True, out)
        if ckpt is not None
        else build_model(arch, num_classes).eval()  # rank 0's weights arrive in evaluate_split
    )
    model = model.to(device, memory_format=torch.channels_last) if on_cuda else model.to(device)
    unreadable = UnreadableImages(strict=args.strict)
    if info.enabled:
        log.info(
            "rank %d of %d rescores its share of %s's test set", info.rank, info.world_size, arch
        )
    loader = train_cmd.eval_loader(index, PreprocessSpec(**preprocess), args, info)
    amp = on_cuda and not args.no_amp
    scored = train_cmd.evaluate_split(
        model,
        loader,
        device,
        info,
        amp=amp,
        channels_last=on_cuda,
        unreadable=unreadable,
        stop=stop,
    )
    if scored is None:  # not rank 0: it has the scores
        return None
    logits, targets = scored
    kept = [str(s.path) for s in index.samples if str(s.path) not in unreadable.paths]
    if len(kept) != len(targets):  # cannot happen with an in-order loader; never mis-pair
        raise RuntimeError(f"{out}: {len(targets)} scores for {len(kept)} images")
    preds = logits.argmax(dim=1)
    train_counts = ckpt.get("train_class_counts")
    return {
        "metrics": classification_metrics(logits, targets, index.classes, train_counts),
        "images": kept,
        "targets": targets.tolist(),
        "preds": preds.tolist(),
        "correct": (preds == targets).tolist(),
        "top5_correct": topk_correct(logits, targets, 5).tolist(),
    }


def paired_tests(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every pair of archs scored on the same images: b against a (b - a), McNemar and the paired
    bootstrap; ``best`` is the arch with the highest top-1 (the first one on a tie)."""
    archs = list(scores)
    best = max(archs, key=lambda a: sum(scores[a]["correct"]))  # max keeps the first of a tie
    pairs = []
    for a, b in itertools.combinations(archs, 2):
        if scores[a]["images"] != scores[b]["images"]:
            raise RuntimeError(f"{a} and {b} were not scored on the same images")
        test = paired_comparison(
            scores[a]["correct"], scores[b]["correct"], ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
        )
        pairs.append({"a": a, "b": b, **test})
    return {
        "alpha": ALPHA,
        "test": "exact McNemar (two-sided binomial test on the discordant images)",
        "interval": f"{1 - ALPHA:.0%} percentile paired bootstrap of top1(b) - top1(a)",
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "best": best,
        "num_images": len(next(iter(scores.values()))["images"]),
        "pairs": pairs,
    }


def vs_best(tests: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """``arch`` against the best arch, read off their pair in ``tests``: ``diff`` = top1(arch)
    - top1(best) and its interval, the images only one of them got right, McNemar's p and
    whether it is below alpha. None for the best arch itself."""
    best = tests["best"]
    if arch == best:
        return None
    for p in tests["pairs"]:
        if {p["a"], p["b"]} != {arch, best}:
            continue
        sign = 1 if p["b"] == arch else -1  # the pair's diff is top1(b) - top1(a)
        lo, hi = (sign * x for x in p["diff_ci"])
        mine, theirs = ("b", "a") if p["b"] == arch else ("a", "b")
        return {
            "best": best,
            "num_images": p["num_images"],
            "top1": p[f"top1_{mine}"],
            "top1_best": p[f"top1_{theirs}"],
            "diff": sign * p["diff"],
            "diff_ci": [min(lo, hi), max(lo, hi)],
            "only_this_right": p[f"{mine}_only"],
            "only_best_right": p[f"{theirs}_only"],
            "mcnemar_p": p["mcnemar_p"],
            "significant": p["significant"],
        }
    raise KeyError(f"no pair {arch}/{best}")


def predictions_csv(scores: dict[str, dict[str, Any]], classes: list[dict[str, Any]]) -> bytes:
    """One row per test image: its path, true class (index, make, model) and, per arch, the
    predicted class and whether top-1 and top-5 are right (1/0)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    archs = list(scores)
    writer.writerow(
        ["image", "target", "make", "model"]
        + [f"{a}_{col}" for a in archs for col in ("pred", "correct", "top5_correct")]
    )
    first = scores[archs[0]]
    for i, (image, target) in enumerate(zip(first["images"], first["targets"], strict=True)):
        row = [image, target, classes[target]["make"], classes[target]["model"]]
        for a in archs:
            sc = scores[a]
            row += [sc["preds"][i], int(sc["correct"][i]), int(sc["top5_correct"][i])]
        writer.writerow(row)
    return buf.getvalue().encode()


def _compare(
    args: argparse.Namespace,
    archs: list[str],
    dist_info: DistInfo,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    device = train_cmd.resolve_device(args.device, dist_info)
    # loaded and leak-checked once, for every arch, and before --overwrite removes anything: a
    # comparison refused for its data (exit 2) must leave the previous one as it was
    data = train_cmd.load_checked_data(args, dist_info, stop)
    if dist_info.is_main and args.overwrite:
        removed = remove_previous_comparison(args.out, archs)
        if removed:
            log.info(
                "--overwrite: removed %s of the previous comparison from %s", removed, args.out
            )
    test_index = data.test  # one index: every arch is scored on the same images, in order
    rows, scores = [], {}
    for arch in archs:
        run_args = arch_run_args(args, arch)
        start = time.perf_counter()
        # run, not main: the summary line is train's, not ours
        metrics = train_cmd.run(run_args, stop=stop, data=data)
        train_seconds = time.perf_counter() - start
        score = score_checkpoint(run_args.out, test_index, run_args, device, dist_info, stop)
        if score is None:  # a non-main rank under torchrun: it trained and scored its share
            continue
        scores[arch] = score
        m = score["metrics"]
        if abs(m["top1"] - metrics["top1"]) > 1e-9:  # cuDNN / AMP nondeterminism on a GPU
            log.warning(
                "%s: top-1 %.4f on rescoring the checkpoint, %.4f in training's metrics.json",
                arch,
                m["top1"],
                metrics["top1"],
            )
        model = build_model(arch, metrics["num_classes"])
        bench = inference_throughput(model, args.image_size, device, batch=args.bench_batch)
        correct = sum(score["correct"])
        rows.append(
            {
                "arch": arch,
                "top1": m["top1"],
                "top1_ci": list(wilson_interval(correct, m["num_test"], 1 - ALPHA)),
                "top1_correct": correct,
                "num_test": m["num_test"],
                "top5": m["top5"],
                "top5_k": m["top5_k"],
                "top5_informative": m["top5_informative"],
                "make_top1": m["make_top1"],
                "make_top1_by_id": m["make_top1_by_id"],
                "balanced_accuracy": m["balanced_accuracy"],
                "chance_top1": m["chance_top1"],
                "majority_class_top1": m["majority_class_top1"],
                "train_seconds": metrics["train_seconds_this_run"],
                "wall_seconds": train_seconds,
                "params": count_params(model),
                "gflops": gflops(model, args.image_size),
                "inference_images_per_s": bench["images_per_s"],
                "inference": bench,
                "epochs": args.epochs,
                "image_size": args.image_size,
                "device": str(device),
                "pretrained_source": metrics["pretrained_source"],
                "checkpoint": str(run_args.out),
            }
        )
    if not rows:
        return []
    tests = paired_tests(scores)
    for r in rows:
        r["vs_best"] = vs_best(tests, r["arch"])
    first = rows[0]
    majority = first["majority_class_top1"]  # None: a checkpoint without its training counts
    header = (
        f"# Architecture comparison\n\n{args.dataset} at {args.data}, {args.epochs} epochs, "
        f"{args.image_size} px, device {device}, pretrained {first['pretrained_source']}; "
        f"{first['num_test']} test images, {len(test_index.classes)} classes (chance top-1 "
        f"{first['chance_top1']:.3f}, always the training split's most frequent class "
        f"{'unknown' if majority is None else f'{majority:.3f}'}). GFLOPs count a "
        "multiply-add as 2."
    )
    table = markdown_table(rows, header) + "\n" + footnotes(rows)
    atomic_write_json(args.out / ROWS_FILE, rows)
    atomic_write_json(args.out / TESTS_FILE, tests)
    atomic_write_bytes(args.out / PREDICTIONS_FILE, predictions_csv(scores, test_index.classes))
    atomic_write_bytes(args.out / TABLE_FILE, table.encode())
    plots.compare_plot(rows, args.out / PLOT_FILE)
    print(table)
    return rows
