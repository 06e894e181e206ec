#!/usr/bin/env bash
# Run ON a lent GPU machine through the device tool, after benchmarks/device_kit.sh here:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devkit"], timeout_s=540)
# Installs the kit's wheels into /tmp/site, puts the kit's redis-server on PATH, and runs the GPU
# GPU-only tests and the GPU rows of every benchmark, each under its own time limit so one hang cannot eat the lease:
# model-only (torch-cuda FP16, with CUDA graphs, TensorRT where installed, ONNX Runtime), decode
# (nvJPEG batches beside PIL), end to end (torch-cuda + GPU decode, overlap auto), and the
# serial against the overlapped loop and one process against two on the GPU (limits sum to 520 s). Results land in $OUT/gpu_results.tgz
# (benchmarks/results/ layout: one folder per benchmark) and $OUT/gpu_session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
RES=/tmp/gpu-results
rm -rf "$RES" && mkdir -p "$RES"
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

step() {  # step NAME SECONDS COMMAND...: a benchmark under its own limit, its exit code logged
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
}
# a dry run on a CPU machine (by hand, ~2 min; KIT=/nonexistent PY=.venv/bin/python): BACKEND=onnxruntime GPU_DECODE= POSTS=48
# MODEL="--arch resnet18 --image-size 32 --num-classes 8" SECONDS_SCALE=0.1
BACKEND=${BACKEND:-torch-cuda}
GPU_DECODE=${GPU_DECODE---gpu-decode}
# 2,000 posts of ~210 KB per run: producing them costs more than the GPU worker's consuming
POSTS=${POSTS:-2000}
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
  --posts "$POSTS" --decode-threads 8 --load-seconds "$(sec 4)" --model-only-seconds "$(sec 1)" \
  --out-dir "$RES/e2e"
# serial vs overlapped loop, and one process vs two sharing the GPU (--processes: each with
# half the decode threads), one round each: a timed-out step records nothing
step loops 150 "$PY" benchmarks/worker_ab.py "${MODEL[@]}" --backend "$BACKEND" $GPU_DECODE \
  --posts "$POSTS" --decode-threads 8 --reps 1 --model-only-seconds "$(sec 1)" \
  --config serial:CARSTREAM_OVERLAP=off \
  --config overlapped:CARSTREAM_OVERLAP=on \
  --config two-processes:CARSTREAM_OVERLAP=on,CARSTREAM_PROCESSES=2,CARSTREAM_DECODE_THREADS=4 \
  --baseline overlapped --out-dir "$RES/loops"
tar -C "$RES" -czf "$OUT/gpu_results.tgz" .
echo "gpu_session: done; results in gpu_results.tgz"
