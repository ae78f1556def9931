#!/usr/bin/env bash
# Does a server of two shards train as one does? The demo's configuration (3 single-rank groups,
# one small; Fashion-MNIST, 6 epochs) under `server.order: arrival`, one server rank against two,
# seeds 1-3, with the example timing file and a static plan (plan.adaptive: false) so both
# train the same batches. The issue's target: the two-shard runs end within the seed spread of
# the one-server runs.
#
#   bash results/shards/run.sh            # from the repository root, after `make setup`
#   .venv/bin/python -m hpc_dualbatch report results/shards/runs/shards*-s[123] --baseline shards1 --out results/shards
#
# Finished runs are skipped. Each run folder holds command.txt, config.yaml, metrics.jsonl and
# status.json (its "server" entry: each shard's busy share and peak memory).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/shards/runs
DATA=${DATA:-data/fashion-mnist.h5}
PY=.venv/bin/python
[ -f "$DATA" ] || $PY -m hpc_dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out "$DATA"
for seed in ${SEEDS:-1 2 3}; do
  for shards in 1 2; do
    dir=$OUT/shards$shards-s$seed
    if [ -f "$dir/status.json" ] && grep -q '"state": "done"' "$dir/status.json"; then continue; fi
    rm -rf "$dir" && mkdir -p "$dir"
    git rev-parse HEAD > "$dir/code.txt"
    echo "== shards $shards seed $seed ($(date +%H:%M:%S))"
    scripts/mpirun_local.sh -np $((3 + shards)) $PY -m hpc_dualbatch train \
      --config hpc_dualbatch/configs/fashion_mnist.yaml --set "data.path=$DATA" --set plan.adaptive=false \
      --set "server.shards=$shards" --set "seed=$seed" --set "out=$dir" > "$dir.log" 2>&1
    rm -rf "$dir/checkpoints"
    tail -n 1 "$dir.log"
  done
done
