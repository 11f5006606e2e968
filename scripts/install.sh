#!/usr/bin/env bash
# Install curvlab into ./.venv on a fresh machine: the CPU build of torch 2.13.0 first (an
# unpinned torch pulls a multi-GB CUDA build), then the package with its extras, then, where
# apt is available and we are root, the Debian Fashion-MNIST package (optional: CURVES needs no data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[bench,test,lint]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST problems will be unavailable"
fi
