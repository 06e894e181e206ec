#!/usr/bin/env bash
# `make bench`: every benchmark, each writing benchmarks/results/<name>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/model_throughput.py "$@"
"$PY" benchmarks/train_throughput.py
"$PY" benchmarks/decode_throughput.py
"$PY" benchmarks/e2e_throughput.py
