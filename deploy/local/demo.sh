#!/usr/bin/env bash
# `make demo`: the whole pipeline on one machine, CPU is enough.
# Starts the local stack (Tansu + redis-server on loopback), makes the sample data set,
# trains a small ResNet-18, builds its bundle, runs two worker replicas, produces every
# sample image (training and test splits alike) as posts from a few cities, waits until
# Redis has counted every post, prints the live top makes and models, then stops the
# replicas and the stack (also on failure or Ctrl-C).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
KAFKA_PORT=${DEMO_KAFKA_PORT:-19092}
REDIS_PORT=${DEMO_REDIS_PORT:-16380}
EPOCHS=${DEMO_EPOCHS:-8}
WAIT_S=${DEMO_WAIT_S:-300}
CITIES=(Paris Lyon Berlin Madrid)

STACK=("$PY" -m worker stack --state-dir "$DEMO_DIR/stack" --kafka-port "$KAFKA_PORT" --redis-port "$REDIS_PORT")
export CARSTREAM_BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT"
export CARSTREAM_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export CARSTREAM_GROUP_ID=carstream-demo
export CARSTREAM_SESSION_TIMEOUT_MS=6000  # Tansu: the group forms within about half of it
export CARSTREAM_BACKEND=onnxruntime
METRICS_PORT=${DEMO_METRICS_PORT:-9400}

say() { printf '\n== %s\n' "$*"; }
started=$(date +%s)
replicas=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#replicas[@]})); then
        say "stopping worker replicas (SIGTERM)"
        kill -TERM "${replicas[@]}" 2>/dev/null || true
        wait "${replicas[@]}" 2>/dev/null || true
    fi
    say "stopping the stack"
    "${STACK[@]}" down || true
    if ((rc != 0)); then
        echo "demo FAILED (exit $rc); logs: $DEMO_DIR/*.log $DEMO_DIR/stack/*.log" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$DEMO_DIR"

say "local stack: Tansu on 127.0.0.1:$KAFKA_PORT, redis-server on 127.0.0.1:$REDIS_PORT"
"${STACK[@]}" up --partitions 4
"$PY" - <<EOF
import redis
redis.Redis.from_url("$CARSTREAM_REDIS_URL").flushdb()  # the demo's own Redis: start from zero
EOF

say "sample data set"
# --overwrite here and in train: a second `make demo` starts again from its own earlier files
"$PY" -m training make-sample --out "$DEMO_DIR/sample" --overwrite

say "training a small resnet18 ($EPOCHS epochs)"
"$PY" -m training train --dataset compcars --data "$DEMO_DIR/sample" --out "$DEMO_DIR/checkpoint" \
    --overwrite --arch resnet18 --pretrained none --opt adamw --lr 0.001 --head-lr-mult 1 \
    --epochs "$EPOCHS" --image-size 64 --batch-size 32 --workers 0

say "building the model bundle"
"$PY" -m engine_build --checkpoint "$DEMO_DIR/checkpoint" --out "$DEMO_DIR/bundle" --force \
    --precision fp32 --log-level WARNING

say "starting 2 worker replicas"
for i in 1 2; do
    CARSTREAM_METRICS_PORT=$((METRICS_PORT + i)) CARSTREAM_WORKER_ID="demo-$i" \
        "$PY" -m worker run --bundle "$DEMO_DIR/bundle" >"$DEMO_DIR/worker-$i.log" 2>&1 &
    replicas+=($!)
done
"$PY" - "$METRICS_PORT" "$WAIT_S" "$DEMO_DIR" "${replicas[@]}" <<'EOF'
import sys, time, urllib.request

base, wait_s, demo_dir, pids = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
deadline = time.monotonic() + wait_s


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


for i, pid in enumerate(pids, 1):
    url = f"http://127.0.0.1:{base + i}/readyz"
    while True:
        if not alive(pid):
            sys.exit(f"worker replica {i} exited during start-up; see {demo_dir}/worker-{i}.log")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    print(f"  replica {i} ready ({url})")
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"replica {i} not ready after {wait_s:.0f}s ({url})")
        time.sleep(0.5)
EOF

say "producing all the sample images (train and test splits) as posts"
city_flags=()
for c in "${CITIES[@]}"; do city_flags+=(--city "$c"); done
report=$("$PY" -m worker produce --images "$DEMO_DIR/sample/data/image" "${city_flags[@]}" --json)
echo "$report"
sent=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["sent"])' "$report")

say "waiting until Redis has counted all $sent posts (deadline ${WAIT_S}s)"
"$PY" - "$sent" "$WAIT_S" <<'EOF'
import os, sys, time
import redis
from worker.trend_windows import total
from worker.trends import TrendReader

sent, wait_s = int(sys.argv[1]), float(sys.argv[2])
reader = TrendReader(redis.Redis.from_url(os.environ["CARSTREAM_REDIS_URL"]))
deadline = time.monotonic() + wait_s
counted = -1
while time.monotonic() < deadline:
    now = total(reader.top(60, top=10**6)) + total(reader.low_confidence(60))
    if now != counted:
        counted = now
        print(f"  counted {counted}/{sent}", flush=True)
    if counted >= sent:
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"only {counted} of {sent} posts counted after {wait_s:.0f}s")
EOF

say "top makes, last 60 minutes"
"$PY" -m worker trends --window 60m --by make --top 10
low=$("$PY" -m worker trends --window 60m --by low-confidence --top 1 --json |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["total"])')
if [ "$low" != "0" ]; then
    echo "  ($low more below the confidence threshold, counted apart: trends --by low-confidence)"
fi
say "top models, last 60 minutes"
"$PY" -m worker trends --window 60m --by model --top 10
say "posts per city"
"$PY" -m worker trends --window 60m --by city
top_make=$("$PY" -m worker trends --window 60m --by make --top 1 --json |
    "$PY" -c 'import json, sys; top = json.load(sys.stdin)["top"]; print(top[0]["name"] if top else "")')
if [ -n "$top_make" ]; then
    say "where $top_make is posted, and its share of each city's posts"
    "$PY" -m worker trends --window 60m --by city --make "$top_make"
fi

say "demo done in $(($(date +%s) - started)) s"
