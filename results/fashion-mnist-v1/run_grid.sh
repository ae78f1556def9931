#!/usr/bin/env bash
# ARCHIVED: the script as it ran at commit 1f01eaf, when this grid lived in results/fashion-mnist
# and the server's only behaviour was the method's (today: server.merge=paper, server.bn=average,
# server.push_every=0). Run at HEAD it would use today's defaults and write into
# results/fashion-mnist; check out 1f01eaf to regenerate these numbers.
# Regenerate results/fashion-mnist: every configuration of the grid for every seed, then the report.
#
#   bash results/fashion-mnist/run_grid.sh            # SEEDS="1 2" by default
#
# Each run's exact command is in its folder (command.txt), with its resolved config
# (config.yaml), plan (plan.json), metrics (metrics.jsonl) and status.json. Finished runs are
# skipped, so an interrupted grid continues where it stopped. Seeds run in the outer loop: if
# time runs out, every configuration has its first seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"1 2"}
OUT=results/fashion-mnist
RUNS=$OUT/runs
DATA=${DATA:-data/fashion-mnist.h5}
PY=.venv/bin/python
[ -f "$DATA" ] || $PY -m hpc_dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out "$DATA"
mkdir -p "$RUNS"

# Common to every run: the demo config (width-16 CIFAR ResNet-18, 20/24/28 px, 6 epochs, LR 0.05 ->
# 0.005 after epoch 3 with a 1-epoch warm-up, B_L 128/96/64, B_S planned from the shipped timing
# file) with 4 worker groups as in the paper, epochs of 18,000 samples drawn from the whole train
# split (so 18 runs fit in about an hour on 2 cores), no intermediate checkpoints (a checkpoint
# is a barrier; the paper's runs have none), data staged once.
COMMON=(--config hpc_dualbatch/configs/fashion_mnist.yaml --set "data.path=$DATA"
        --set "workers.groups=[1, 1, 1, 1]" --set plan.samples_per_epoch=18000
        --set checkpoint.every_epochs=0)

run() {  # run NAME NP SEED overrides...
  local name=$1 np=$2 seed=$3; shift 3
  local dir=$RUNS/$name-s$seed
  if [ -f "$dir/status.json" ] && grep -q '"state": "done"' "$dir/status.json"; then return; fi
  rm -rf "$dir"
  echo "== $name seed $seed"
  scripts/mpirun_local.sh -np "$np" $PY -m hpc_dualbatch train "${COMMON[@]}" --set "seed=$seed" \
    --set "out=$dir" "$@" > "$RUNS/$name-s$seed.log" 2>&1
  tail -n 1 "$RUNS/$name-s$seed.log"
}

for seed in $SEEDS; do
  # Conventional synchronous data-parallel training: 4 ranks in one Horovod group, B_L per rank.
  run sync 4 "$seed" --set mode=sync --set "workers.groups=[4]" --set workers.small=0 --set plan.k=1.0 \
    --set schedule.resolution_mode=fixed
  # The paper's baseline: parameter server, all groups large (n_S = 0, k = 1), full resolution.
  run ps-base 5 "$seed" --set workers.small=0 --set plan.k=1.0 --set schedule.resolution_mode=fixed
  for ns in 1 2 3; do
    # Dual-batch only (k = 1.05), full resolution.
    run dual-ns$ns 5 "$seed" --set workers.small=$ns --set schedule.resolution_mode=fixed
    # Hybrid: dual-batch + cyclic progressive resolution 20 -> 24 -> 28 px in each LR stage.
    run hybrid-ns$ns 5 "$seed" --set workers.small=$ns
  done
  # Contribution-factor ablation: f = 1 for the small groups instead of d_S/d_L.
  run hybrid-ns2-nofactor 5 "$seed" --set workers.small=2 --set plan.factor=none
done

order=(sync ps-base dual-ns1 dual-ns2 dual-ns3 hybrid-ns1 hybrid-ns2 hybrid-ns3 hybrid-ns2-nofactor)
dirs=()
for name in "${order[@]}"; do
  for seed in $SEEDS; do
    [ -f "$RUNS/$name-s$seed/status.json" ] && dirs+=("$RUNS/$name-s$seed")
  done
done
$PY -m hpc_dualbatch report "${dirs[@]}" --baseline ps-base --out "$OUT"
