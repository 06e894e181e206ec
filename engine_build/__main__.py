"""``python -m engine_build``: build a verified model bundle from a training checkpoint.

Exit codes: 0 built, 2 bad input or a failed parity gate (one line on stderr, no traceback),
1 an unexpected failure (export/TensorRT), with its traceback in the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine_build.build import (
    BUILD_BACKENDS,
    FP32_MAX_PROB_DIFF,
    MAX_BATCH,
    PRECISIONS,
    THREADS_PER_CPU,
    BuildError,
    ParityGateError,
    build_bundle,
    failed_report_path,
    max_threads,
)
from engine_build.bundle import BundleError
from engine_build.decode_parity import GPU_DECODE_AGREEMENT
from engine_build.onnx_export import MAX_OPSET, MIN_OPSET
from training.cli import BadArgumentError, check_out_dir, check_utf8_path
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter

log = logging.getLogger("engine_build")


def comma_list(choices: tuple[str, ...]):
    """argparse type for 'a,b' lists whose items must be in ``choices``."""

    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid value {value!r}; choose a comma list of {', '.join(choices)}"
            )
        return items

    return parse


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m engine_build",
        description="Checkpoint -> model bundle (ONNX, TensorRT FP16 plan, parity report)",
        formatter_class=DefaultsHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument(
        "--checkpoint",
        type=path_arg,
        required=True,
        help="training checkpoint directory (or its checkpoint.pt)",
    )
    parser.add_argument("--out", type=path_arg, required=True, help="bundle directory to create")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing bundle (never a directory that is not a bundle, nor one "
        "holding the checkpoint)",
    )
    parser.add_argument(
        "--precision",
        type=comma_list(PRECISIONS),
        default="fp16,fp32",
        help="comma list: fp32 (ONNX, always built), fp16 (TensorRT plan), int8 (ONNX Runtime "
        "QDQ), bf16 (check model.pt in bfloat16 for the torch-cpu backend; needs a CPU with AMX or "
        "AVX-512 BF16)",
    )
    parser.add_argument(
        "--backends",
        type=comma_list(BUILD_BACKENDS),
        default="auto",
        help="auto builds TensorRT only where it can; tensorrt demands it",
    )
    parser.add_argument("--min-batch", type=int, default=1, help="TensorRT profile minimum")
    parser.add_argument(
        "--opt-batch",
        type=int,
        default=None,
        help="TensorRT profile optimum; default 32, clamped into [--min-batch, --max-batch]",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help=f"largest batch any engine takes, at most {MAX_BATCH} (the worker's largest "
        "max_batch)",
    )
    parity_source = parser.add_mutually_exclusive_group()
    parity_source.add_argument(
        "--parity-data",
        type=path_arg,
        default=None,
        help="images for parity (class folders label them); default: the "
        "checkpoint's held-out split",
    )
    parity_source.add_argument(
        "--data",
        type=path_arg,
        default=None,
        help="where the checkpoint's dataset is now, when it has moved or is mounted "
        "elsewhere (a container): its held-out split is read there instead of at the path "
        "recorded at training",
    )
    parser.add_argument(
        "--parity-images",
        type=int,
        default=256,
        help="at most this many parity images, evenly spread",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=128,
        help="int8 calibration images, taken from the parity images (at most half of them: int8 "
        "is scored on the rest)",
    )
    parser.add_argument(
        "--workspace-gb", type=float, default=4.0, help="TensorRT workspace (GiB, > 0)"
    )
    parser.add_argument(
        "--timing-cache",
        type=path_arg,
        default=None,
        help="TensorRT timing cache file, loaded if present and saved after",
    )
    parser.add_argument(
        "--fp32-agreement",
        type=float,
        default=0.999,
        help="min top-1 agreement of the FP32 ONNX model with PyTorch",
    )
    parser.add_argument(
        "--fp16-agreement",
        type=float,
        default=0.995,
        help="min top-1 agreement of the TensorRT FP16 plan",
    )
    parser.add_argument(
        "--int8-agreement",
        type=float,
        default=0.0,
        help="min top-1 agreement of the int8 model (0 = report only)",
    )
    parser.add_argument(
        "--bf16-agreement",
        type=float,
        default=0.98,
        help="min top-1 agreement of torch-cpu bfloat16 (--precision bf16)",
    )
    parser.add_argument(
        "--max-prob-diff",
        type=float,
        default=None,
        help="largest |difference| of any softmax probability from PyTorch's, over every parity "
        "image and class (batched and at batch 1), in [0, 1]; default "
        f"{FP32_MAX_PROB_DIFF} for the FP32 artifacts and not checked for fp16/int8/bf16 (top-1 "
        "agreement only); given, it applies to every artifact",
    )
    parser.add_argument(
        "--gpu-decode-agreement",
        type=float,
        default=GPU_DECODE_AGREEMENT,
        help="min top-1 agreement of the FP32 model on the GPU workers' decode path "
        "(CARSTREAM_GPU_DECODE: nvJPEG, block-average draft, torch resize) with the CPU path, on "
        "the baseline-JPEG parity images; a top-1 flip between two classes the CPU path's logits "
        "hold within 1%% of each other (a near tie, as for batch 1) is recorded but not counted. "
        "It fails only a bundle meant for GPU workers (--backends tensorrt, or a build on CUDA); "
        "for others a miss is a WARNING (0 = record only)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        help="recorded in the manifest and results; not blank, at most 128 characters, no "
        "control characters; "
        "default: carstream-<arch>",
    )
    parser.add_argument(
        "--model-version",
        default=None,
        help="recorded in the manifest and results; not blank, at most 128 characters, no "
        "control characters; "
        "default: epoch<N>",
    )
    parser.add_argument(
        "--opset", type=int, default=17, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the parity runs (ONNX Runtime, torch-cpu bf16), >= 1 and at most "
        f"{THREADS_PER_CPU} per CPU this process may use ({max_threads()} here)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: INFO)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        check_out_dir(args.out)
        check_utf8_path(args.out)  # the ONNX exporter needs it as text
    except BadArgumentError as exc:
        print(f"python -m engine_build: error: {exc}", file=sys.stderr)
        return 2
    try:
        out = build_bundle(
            args.checkpoint,
            args.out,
            precisions=args.precision,
            backends=args.backends,
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            parity_data=args.parity_data,
            data_dir=args.data,
            parity_images=args.parity_images,
            calibration_images=args.calibration_images,
            workspace_gb=args.workspace_gb,
            timing_cache=args.timing_cache,
            fp32_agreement=args.fp32_agreement,
            fp16_agreement=args.fp16_agreement,
            int8_agreement=args.int8_agreement,
            bf16_agreement=args.bf16_agreement,
            gpu_decode_agreement=args.gpu_decode_agreement,
            max_prob_diff=args.max_prob_diff,
            model_name=args.model_name,
            model_version=args.model_version,
            opset=args.opset,
            threads=args.threads,
            overwrite=args.force,
        )
    except (BuildError, BundleError) as exc:
        print(f"python -m engine_build: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # an --out or --timing-cache the user cannot write (a read-only filesystem, a full disk,
        # a file in the way): the message names the path
        print(f"python -m engine_build: error: {exc}", file=sys.stderr)
        return 2
    except ParityGateError as exc:
        report = failed_report_path(args.out)  # `--out .` has no name of its own
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(exc.report, indent=2) + "\n")
        print(
            f"python -m engine_build: error: {exc}; no bundle written, report in {report}",
            file=sys.stderr,
        )
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
