#!/usr/bin/env bash
# The README's first command: set everything up on a fresh machine, then compare the curvature
# methods with SGD-m and Adam on the CURVES autoencoder (generated data, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/curvlab compare --problem curves-autoencoder --seconds "${SECONDS_PER_METHOD:-15}" \
  --threads 2 --out results/quickstart "$@"
