#!/usr/bin/env bash
# `simulate check` where no core is shared by two training processes: one and two single-rank
# groups beside the server on a 2-core machine (2 and 3 ranks; the server sleeps between
# requests), the Fashion-MNIST server part's configuration and defaults (width-8 ResNet-18,
# B = 64 at 28 px, push every 4 steps) at 4 epochs of 7,500 samples, 3 seeds; then the check,
# replaying each run with the wake-ups it recorded. The grid's runs put 5 ranks on the 2 cores
# (docs/scaling.md, "Checked against runs", compares both). Finished runs are skipped. The link
# and merge costs: `bench exchange --floats 180000 --iters 32` on the same machine kind (Intel Xeon).
#
#   bash results/simulate/run_quiet.sh        # SEEDS="1 2 3"
#   NAME=waited bash results/simulate/run_quiet.sh   # runs in runs-waited/, check-waited.*
#   NAME=waited NGROUPS="1 2 4" bash ...          # and 4 groups: the grid's 5 ranks on the 2 cores
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/fashion-mnist.h5}
NAME=${NAME:-quiet}  # the first series (59a6f5f) is runs/ and check-quiet.*
OUT=results/simulate/runs; [ "$NAME" = quiet ] || OUT=results/simulate/runs-$NAME
[ -f "$DATA" ] || $PY -m hpc_dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out "$DATA"
for seed in ${SEEDS:-1 2 3}; do
  for g in ${NGROUPS:-1 2}; do
    dir=$OUT/groups$g-s$seed
    if [ -f "$dir/status.json" ] && grep -q '"state": "done"' "$dir/status.json"; then continue; fi
    rm -rf "$dir"; mkdir -p "$dir"
    { git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/changed: /'; } > "$dir/code.txt"
    { grep -m1 'model name' /proc/cpuinfo; nproc; hostname; } > "$dir/machine.txt"
    groups=$($PY -c "print([1] * $g)")
    echo "== $dir ($(date +%H:%M:%S))"
    scripts/mpirun_local.sh -np $((g + 1)) $PY -m hpc_dualbatch train \
      --config hpc_dualbatch/configs/fashion_mnist.yaml --set "data.path=$DATA" --set model.width=8 \
      --set "workers.groups=$groups" --set workers.small=0 --set plan.k=1.0 \
      --set "plan.large_batch={20: 128, 24: 96, 28: 64}" --set schedule.resolution_mode=fixed \
      --set plan.samples_per_epoch=7500 --set schedule.epochs=4 --set "schedule.milestones=[3]" \
      --set "schedule.lr=[0.1, 0.01]" --set checkpoint.every_epochs=0 --set "seed=$seed" \
      --set "out=$dir" > "$dir.log" 2>&1
    rm -rf "$dir/checkpoints"
    tail -n 1 "$dir.log"
  done
done
$PY -m hpc_dualbatch simulate check "$OUT"/groups*-s[0-9] --exchange results/bench/exchange-small-intel.json \
  --floats 180000 --out "results/simulate/check-$NAME.json" | tee "results/simulate/check-$NAME.txt"
