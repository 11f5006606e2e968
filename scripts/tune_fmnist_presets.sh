#!/usr/bin/env bash
# The learning-rate × damping grids behind the `tuned` presets of the Fashion-MNIST autoencoder
# (`curvlab list`): the thesis's values were tuned on MNIST and most of them diverge on
# Fashion-MNIST within a few dozen steps. Each grid point trains 2 epochs on the full 60,000
# training images (batch 1000, warm start as in the thesis, seed 0, 2 threads); the preset is
# the point with the smallest final full-training-set loss among the runs that stayed finite.
# Results: results/tune-fmnist/report.md (every point; copied with the selection, printed at the
# end, to docs/results/tune-fmnist/). A point whose record exists is not run again.
# Usage: bash scripts/tune_fmnist_presets.sh [optimizer ...]   (default: all grids below)
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/tune-fmnist
declare -A GRID=(
  [kfac]="0.003,0.01,0.03,0.1,0.3 1,3,10,30"
  [kfac-ef]="0.003,0.01,0.03,0.1,0.3 1,3,10,30"
  [kbfgs]="0.003,0.01,0.03 0.3,1,3"
  [kbfgs-l]="0.003,0.01,0.03 0.3,1,3"
  [tnt]="0.00001,0.00003,0.0001 0.1,0.3,1"
  [sgd-m]="0.001,0.003,0.01 -"
  [adam]="0.0001,0.0003,0.001,0.003 -"
)
declare -A EXTRA=([adam]="--set eps=0.0001")  # Adam's ε as the thesis's (Table 3.5)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(kfac kfac-ef kbfgs kbfgs-l tnt sgd-m adam)
for o in "${names[@]}"; do
  read -r lrs dampings <<<"${GRID[$o]}"
  for lr in ${lrs//,/ }; do
    for lam in ${dampings//,/ }; do  # "-": a first-order method (no damping, no warm start)
      label="${o}_lr${lr}"
      if [ "$lam" = - ]; then args=(); else
        label="${label}_damping${lam}"; args=(--set damping="$lam" --set warm_start=true); fi
      [ -f "$out/fmnist-autoencoder/$label/seed0.json" ] && continue  # done in an earlier call
      .venv/bin/curvlab bench --problem fmnist-autoencoder --optimizer "$o" --set lr="$lr" \
        "${args[@]}" ${EXTRA[$o]:-} --label "$label" --epochs 2 --threads 2 --seed 0 \
        --out "$out" --no-progress 2>&1 | tail -n 1
    done
  done
done
rm -rf "$out-best"
.venv/bin/python scripts/select_tuned.py "$out" "$out-best" >"$out/selection.txt"
.venv/bin/curvlab report "$out" >/dev/null
.venv/bin/curvlab report "$out-best" >/dev/null
docs=docs/results/tune-fmnist
mkdir -p "$docs/plots"
{
  printf '# The grids behind the `tuned` presets of the Fashion-MNIST autoencoder\n\n'
  printf 'Written by `bash scripts/tune_fmnist_presets.sh` (every grid point: 2 epochs on the 60,000\n'
  printf 'training images, batch 1000, seed 0, 2 threads, curvature methods warm-started). Selection:\n'
  printf 'the smallest final training loss among runs that stayed finite ([selection.txt](selection.txt)).\n\n'
  grep -v "(plots/fmnist-autoencoder.png)" "$out/report.md" | sed 's/^# curvlab benchmark report/## Every grid point/'
} >"$docs/report.md"
cp "$out/selection.txt" "$docs/selection.txt"
cp "$out-best/plots/fmnist-autoencoder.png" "$docs/plots/best.png"
printf '\n## The selected points\n\n![best](plots/best.png)\n' >>"$docs/report.md"
grep -v '^  ' "$docs/selection.txt"
