"""``compare``: train and evaluate several architectures on the same data; the seed's table.

Accuracy (top-1, top-5, make top-1) next to cost (training time, parameters, GFLOPs at the crop
size, inference images/s on this machine), as compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training import plots
from training import train as train_cmd
from training.checkpoint import atomic_write_bytes, atomic_write_json
from training.cli import BadArgumentError, positive_int
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter
from training.distributed import DistInfo, barrier, cleanup, init_distributed
from training.models import ARCHS, UnknownArchError, build_model

log = logging.getLogger(__name__)

# the worker's max_batch is at most 4096 (worker/settings.py), so no larger batch ever reaches a
# deployed engine; 40960 images at 224 px would be a 23 GiB input tensor before the first layer
MAX_BENCH_BATCH = 4096


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def inference_images_per_s(
    model: nn.Module, image_size: int, device: torch.device, batch: int = 16, iters: int = 5
) -> float:
    """Forward throughput on random input (after one warm-up batch)."""
    model = model.eval().to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


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


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| arch | top-1 | top-5 | make top-1 | train time (s) | params (M) | GFLOPs "
        "| inference img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['make_top1']:.4f} | "
            f"{r['train_seconds']:.1f} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | "
            f"{r['inference_images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


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


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and measure each arch; return the table's rows (rank 0) or [] (other ranks)."""
    archs = parse_archs(args.archs)
    if args.bench_batch > MAX_BENCH_BATCH:  # refused now, not after every arch has trained
        raise BadArgumentError(f"--bench-batch {args.bench_batch}: must be <= {MAX_BENCH_BATCH}")
    train_cmd.check_train_args(args)  # so is a bad --image-size or --batch-size
    # every arch's --out is checked before the first one trains, not after it
    for arch in archs:
        train_cmd.check_no_checkpoint_in_out(arch_run_args(args, arch), can_resume=False)
    dist_info = init_distributed()  # one process group for all the runs (under torchrun)
    try:
        rows = _compare(args, archs, dist_info)
        barrier(dist_info)  # the other ranks wait while rank 0 measures and writes the table
        return rows
    finally:
        cleanup(dist_info)


def _compare(
    args: argparse.Namespace, archs: list[str], dist_info: DistInfo
) -> list[dict[str, Any]]:
    device = train_cmd.resolve_device(args.device, dist_info)
    rows = []
    for arch in archs:
        run_args = arch_run_args(args, arch)
        start = time.perf_counter()
        metrics = train_cmd.main(run_args)
        train_seconds = time.perf_counter() - start
        if not metrics:  # a non-main rank under torchrun: it trained its share; rank 0 reports
            continue
        model = build_model(arch, metrics["num_classes"])
        rows.append(
            {
                "arch": arch,
                "top1": metrics["top1"],
                "top5": metrics["top5"],
                "make_top1": metrics["make_top1"],
                "train_seconds": metrics["train_seconds_this_run"],
                "wall_seconds": train_seconds,
                "params": count_params(model),
                "gflops": gflops(model, args.image_size),
                "inference_images_per_s": inference_images_per_s(
                    model, args.image_size, device, batch=args.bench_batch
                ),
                "epochs": args.epochs,
                "image_size": args.image_size,
                "device": str(device),
                "pretrained_source": metrics["pretrained_source"],
                "checkpoint": str(run_args.out),
            }
        )
    if not rows:
        return []
    header = (
        f"# Architecture comparison\n\n{args.dataset} at {args.data}, {args.epochs} epochs, "
        f"{args.image_size} px, device {device}, pretrained {rows[0]['pretrained_source']}. "
        "GFLOPs count a multiply-add as 2."
    )
    atomic_write_json(args.out / "compare.json", rows)
    atomic_write_bytes(args.out / "compare.md", markdown_table(rows, header).encode())
    plots.compare_plot(rows, args.out / "compare.png")
    print(markdown_table(rows, header))
    return rows
