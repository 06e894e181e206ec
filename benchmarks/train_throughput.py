"""Training throughput (images/s: forward + backward + SGD step) of ResNets on this machine.

Synthetic in-memory batches, so the number is the model's training cost without JPEG decoding;
it bounds what ``python -m training train`` can reach here. Writes
benchmarks/results/train_throughput.{json,md} with the command, machine, date and versions.

    .venv/bin/python benchmarks/train_throughput.py --archs resnet18,resnet50 --image-size 224
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch
import torchvision
from report import cpu_model, write_results
from torch import nn

from training.cli_help import DefaultsHelpFormatter
from training.engine import train_one_epoch
from training.models import build_model

RESULTS = Path(__file__).parent / "results"


def measure(arch: str, image_size: int, batch: int, iters: int, classes: int) -> dict:
    """Images/s over ``iters`` timed steps after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(arch, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, classes, (batch,))
    device = torch.device("cpu")
    train_one_epoch(model, crit, opt, [(x, y)], device, 0)  # warm-up
    stats = train_one_epoch(model, crit, opt, [(x, y)] * iters, device, 0)
    return {
        "arch": arch,
        "image_size": image_size,
        "batch_size": batch,
        "timed_steps": iters,
        "images_per_s": round(stats["images_per_s"], 2),
        "seconds_per_step": round(stats["seconds"] / iters, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--classes", type=int, default=431, help="CompCars split models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure(a, args.image_size, args.batch_size, args.iters, args.classes)
        for a in args.archs.split(",")
    ]
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "torch_threads": args.threads, "gpu": "none"},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "note": "synthetic in-memory batches; forward+backward+SGD step; FP32 on CPU",
        "results": rows,
    }
    lines = [
        "# Training throughput",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']['cpu']}, {args.threads} torch threads, no GPU",
        f"- date: {meta['date']}",
        f"- versions: torch {torch.__version__}, torchvision {torchvision.__version__}",
        f"- {meta['note']}; {args.classes}-class head",
        "",
        "| arch | image size | batch | images/s | s/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['arch']} | {r['image_size']} | {r['batch_size']} | {r['images_per_s']} | "
        f"{r['seconds_per_step']} |"
        for r in rows
    ]
    write_results(args.out_dir, "train_throughput", meta, "\n".join(lines))


if __name__ == "__main__":
    main()
