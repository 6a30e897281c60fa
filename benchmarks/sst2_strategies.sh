#!/usr/bin/env bash
# Train SST-2 / all-MiniLM-L6-v2 recipes one after another, each in its own process, and
# record each run in benchmarks/results/sst2_<kind>.json.
# Usage: PEFTLAB_DATA=../shared/data bash benchmarks/sst2_strategies.sh [kinds...]
# SST2_TRAIN_SAMPLES=20000 trains on a seeded 20k subset of train (recorded in the result).
set -euo pipefail
cd "$(dirname "$0")/.."
kinds=${*:-full lora head dora freeze gradual}
subset=${SST2_TRAIN_SAMPLES:-}
for kind in $kinds; do
  out=runs/sst2/$kind
  recipe=recipes/minilm_sst2_$kind.yaml
  extra=()
  [ -n "$subset" ] && extra=("data.max_train_samples=$subset")
  peftlab train "$recipe" "${extra[@]}" --output-dir "$out" --overwrite
  python benchmarks/collect_run.py "$out" "sst2_$kind" "$recipe" "${extra[@]}"
done
