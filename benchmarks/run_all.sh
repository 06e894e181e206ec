#!/usr/bin/env bash
# `make bench`: every benchmark, each writing benchmarks/results/<name>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/model_throughput.py "$@"
"$PY" benchmarks/train_throughput.py
"$PY" benchmarks/decode_throughput.py
"$PY" benchmarks/e2e_throughput.py
"$PY" benchmarks/trends_read.py
# defaults against their neighbours, and the peer, with CPU time per post by thread
"$PY" benchmarks/worker_ab.py --reps 3 --config default: \
  --config decode-1:CARSTREAM_DECODE_THREADS=1 --config batch-16:CARSTREAM_MAX_BATCH=16 \
  --config batch-64:CARSTREAM_MAX_BATCH=64 --config peer:CMD=peer --baseline peer
# the GPU regime on any machine: benchmarks/sim_engine.py's stand-in engine, small posts
"$PY" benchmarks/e2e_throughput.py --arch resnet18 --sim-engine 10,2 --images thumb --posts 2000 \
  --load-seconds 20 --out-dir benchmarks/results/sim_gpu_e2e
"$PY" benchmarks/worker_ab.py --arch resnet18 --images thumb --sim-engine 4,3 --reps 3 \
  --posts 2000 --config serial:CARSTREAM_OVERLAP=off --config overlapped:CARSTREAM_OVERLAP=on \
  --out-dir benchmarks/results/overlap_sim_gpu
# CPUs with AMX or AVX-512 BF16: the torch-cpu bfloat16 worker against the ONNX Runtime one
if "$PY" -c 'import sys; from engine_build.runtime.torch_cpu import native_bf16; sys.exit(native_bf16() is None)'; then
  "$PY" benchmarks/worker_ab.py --backend torch-cpu --engine-instances 2 --threads 1 --reps 3 \
    --posts 480 --config worker: --config onnxruntime:CARSTREAM_BACKEND=onnxruntime \
    --config peer:CMD=peer --baseline peer --out-dir benchmarks/results/amx_bf16/run_all
fi
