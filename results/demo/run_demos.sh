#!/usr/bin/env bash
# `make demo` N times in a row in one checkout, each profiling afresh, and what each gave.
#
#   results/demo/run_demos.sh OUT_DIR [N] [PROFILE_ARGS]
#
# Run from the root of a fresh clone (the README's way: `make demo`). Each run i keeps its
# timing file, plan, metrics, status and log in OUT_DIR/run-i/; a run already there is skipped,
# so an interrupted series continues. PROFILE_ARGS go to `profile` (e.g. "--batches 48,64,96,128",
# which on a CPU whose per-sample time rises past 48-96 samples measures a negative b).
# Summarise with: python results/demo/summary.py OUT_DIR
set -euo pipefail
out=${1:?OUT_DIR}
n=${2:-5}
profile_args=${3:-}
mkdir -p "$out"
git rev-parse HEAD > "$out/code.txt"
for i in $(seq 1 "$n"); do
  dest="$out/run-$i"
  [ -f "$dest/status.json" ] && { echo "run $i: done already"; continue; }
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  echo "== run $i ($(date -u +%FT%TZ))"
  cmd=(make demo DEMO_OUT=runs/demo-series PROFILE_ARGS="$profile_args")
  printf '%q ' "${cmd[@]}" > "$dest.tmp/command.txt"; echo >> "$dest.tmp/command.txt"
  { time "${cmd[@]}"; } > "$dest.tmp/make-demo.log" 2>&1
  cp runs/demo-series-timing.json "$dest.tmp/timing.json"
  for f in plan.json metrics.jsonl status.json config.yaml command.txt; do
    cp "runs/demo-series/$f" "$dest.tmp/${f/command.txt/train-command.txt}"
  done
  mv "$dest.tmp" "$dest"
  tail -3 "$dest/make-demo.log"
done
