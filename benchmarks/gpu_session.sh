#!/usr/bin/env bash
# Run ON a lent GPU machine through the device tool, after benchmarks/device_kit.sh here:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devkit"], timeout_s=540)
# Installs the kit's wheels into /tmp/site, puts the kit's redis-server on PATH, and runs the GPU
# GPU-only tests and the GPU rows of every benchmark, each under its own time limit so one hang cannot eat the lease:
# model-only (torch-cuda FP16, with CUDA graphs, TensorRT where installed, ONNX Runtime), decode
# (nvJPEG batches beside PIL), end to end (torch-cuda + GPU decode, overlap auto), and the
# serial against the overlapped loop and one process against two on the GPU (limits sum to 520 s).
# Each step writes straight into $OUT/gpu_results/<step>/ (benchmarks/results/ layout) as it
# finishes, so a session cut off at the device tool's limit still brings back every step done;
# the log is $OUT/gpu_session.log.
#
# The broker and redis-server a benchmark starts (worker/stack.py) run in sessions of their own,
# so `timeout` killing a step's process group misses them: every step runs with TMPDIR under
# $STEP_TMP, and after each step (and on exit or a signal) any stack whose pid files are left
# there is stopped with `python -m worker stack down --state-dir DIR`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
RES="$OUT/gpu_results"
rm -rf "$RES" && mkdir -p "$RES"
STEP_TMP=${STEP_TMP:-/tmp/gpu-session-tmp}
rm -rf "$STEP_TMP" && mkdir -p "$STEP_TMP"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
KIT=${KIT:-.devkit}
if [ -d "$KIT/whl" ]; then
  rm -rf /tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$KIT"/whl/*.whl || { echo "gpu_session: wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
[ -x "$KIT/redis/redis-server" ] && export PATH="$(readlink -f "$KIT")/redis:$PATH"
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" - <<'PY'
import sys, torch, torchvision, PIL, onnxruntime, kafka, redis, pydantic
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "torchvision", torchvision.__version__, "pillow", PIL.__version__, "ort", onnxruntime.__version__)
try:
    import tensorrt; print("tensorrt", tensorrt.__version__)
except ImportError:
    print("tensorrt: not installed")
PY
redis-server --version || echo "gpu_session: no redis-server: the e2e steps will fail"

stacks_down() {  # stop every local stack a killed step left behind (pid files under STEP_TMP)
  local dir
  while IFS= read -r dir; do
    [ -n "$dir" ] || continue
    echo "gpu_session: stopping the stack left in $dir"
    timeout -k 5 30 "$PY" -m worker stack down --state-dir "$dir" || true
  done < <(find "$STEP_TMP" -name '*.pid' -printf '%h\n' 2>/dev/null | sort -u)
  rm -rf "${STEP_TMP:?}"/* 2>/dev/null || true
}
trap 'stacks_down' EXIT
trap 'stacks_down; exit 143' INT TERM

step() {  # step NAME SECONDS COMMAND...: a benchmark under its own limit, its exit code logged
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  mkdir -p "$STEP_TMP/$name"
  TMPDIR="$STEP_TMP/$name" timeout -k 10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  stacks_down
}
# a dry run on a CPU machine (by hand, ~2 min; KIT=/nonexistent PY=.venv/bin/python): BACKEND=onnxruntime GPU_DECODE= POSTS=48
# MODEL="--arch resnet18 --image-size 32 --num-classes 8" SECONDS_SCALE=0.1
BACKEND=${BACKEND:-torch-cuda}
GPU_DECODE=${GPU_DECODE---gpu-decode}
# 2,000 posts of ~210 KB per run: producing them costs more than the GPU worker's consuming
POSTS=${POSTS:-2000}
# the per-message peer is the slowest e2e run (one post per engine call and per round trip) and
# the e2e step's fixed cost (bundle, model-only, start-ups) is ~61 s of its 140: fewer posts
PEER_POSTS=${PEER_POSTS:-$((POSTS < 400 ? POSTS : 400))}
read -r -a MODEL <<<"${MODEL:-}"
S=${SECONDS_SCALE:-1}
sec() { "$PY" -c "print(round(max(0.05, $1 * $S), 3))"; }
# the GPU-only tests first (torch-cuda engine, CUDA graphs, nvJPEG): they skip everywhere else
step gpu-tests 60 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/engine_build/test_runtime.py \
  tests/worker/test_gpu_preprocess.py
step model 110 "$PY" benchmarks/model_throughput.py "${MODEL[@]}" --batches 1,8,32,64,128 \
  --min-seconds "$(sec 1)" --no-int8 --out-dir "$RES/model"
step decode 60 "$PY" benchmarks/decode_throughput.py --seconds "$(sec 0.6)" --rounds 1 \
  --threads 1,8,16 --out-dir "$RES/decode"
step e2e 140 "$PY" benchmarks/e2e_throughput.py "${MODEL[@]}" --backend "$BACKEND" $GPU_DECODE \
  --posts "$POSTS" --peer-posts "$PEER_POSTS" --decode-threads 8 --load-seconds "$(sec 4)" \
  --model-only-seconds "$(sec 1)" --out-dir "$RES/e2e"
# serial vs overlapped loop, and one process vs two sharing the GPU (--processes: each with
# half the decode threads), one round each: a timed-out step records nothing
step loops 150 "$PY" benchmarks/worker_ab.py "${MODEL[@]}" --backend "$BACKEND" $GPU_DECODE \
  --posts "$POSTS" --decode-threads 8 --reps 1 --model-only-seconds "$(sec 1)" \
  --config serial:CARSTREAM_OVERLAP=off \
  --config overlapped:CARSTREAM_OVERLAP=on \
  --config two-processes:CARSTREAM_OVERLAP=on,CARSTREAM_PROCESSES=2,CARSTREAM_DECODE_THREADS=4 \
  --baseline overlapped --out-dir "$RES/loops"
echo "gpu_session: done; results in $RES"
