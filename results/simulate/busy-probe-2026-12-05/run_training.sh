#!/bin/bash
# bench exchange at 180k floats with N real training processes (single-rank sync runs of the grid's model) beside it
cd /work/main
for n in 1 3 1 3; do
  pids=()
  for i in $(seq 1 $n); do
    setsid scripts/mpirun_local.sh -np 1 .venv/bin/python -m hpc_dualbatch train --config hpc_dualbatch/configs/fashion_mnist.yaml \
      --set data.path=data/fashion-mnist.h5 --set model.width=8 --set mode=sync --set "workers.groups=[1]" --set workers.small=0 \
      --set plan.k=1.0 --set "plan.large_batch={20: 128, 24: 96, 28: 64}" --set schedule.resolution_mode=fixed \
      --set plan.samples_per_epoch=30000 --set schedule.epochs=8 --set checkpoint.every_epochs=0 --set out=/tmp/busy-train-$n-$i > /tmp/busy-train-$n-$i.log 2>&1 &
    pids+=($!)
  done
  sleep 25
  scripts/mpirun_local.sh -np 2 .venv/bin/python -m hpc_dualbatch bench exchange --floats 180000 --iters 32 --out results/simulate/busy-probe-2026-12-05/ext-$n-$(date +%s).json > /tmp/logt-$n.txt 2>&1
  echo "train busy $n"; grep -A7 "variant" /tmp/logt-$n.txt | head -9; tail -2 /tmp/busy-train-$n-1.log
  for p in "${pids[@]}"; do kill -- -$p 2>/dev/null; done; sleep 3; pkill -f "out=/tmp/busy-train" ; sleep 2
  rm -rf /tmp/busy-train-$n-[0-9]  # (run folders; the logs stay)
done
