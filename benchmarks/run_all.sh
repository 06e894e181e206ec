#!/usr/bin/env bash
# `make bench`: every benchmark, each writing benchmarks/results/<name>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/model_throughput.py "$@"
"$PY" benchmarks/train_throughput.py
"$PY" benchmarks/decode_throughput.py
"$PY" benchmarks/e2e_throughput.py
# defaults against their neighbours, and the peer, with CPU time per post by thread
"$PY" benchmarks/worker_ab.py --reps 3 --config default: \
  --config decode-1:CARSTREAM_DECODE_THREADS=1 --config batch-16:CARSTREAM_MAX_BATCH=16 \
  --config batch-64:CARSTREAM_MAX_BATCH=64 --config peer:CMD=peer
