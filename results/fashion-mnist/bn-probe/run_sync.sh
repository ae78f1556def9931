#!/bin/bash
# sync runs of the server part (sync-r11's command) with their final checkpoint kept
set -e
cd "$(dirname "$0")/../../.."
for s in "$@"; do
  d=$OUT/sync-s$s
  [ -f $d/status.json ] && grep -q '"state": "done"' $d/status.json && continue
  scripts/mpirun_local.sh -np 4 .venv/bin/python -m hpc_dualbatch train --config hpc_dualbatch/configs/fashion_mnist.yaml --set data.path=data/fashion-mnist.h5 --set model.width=8 --set 'workers.groups=[1, 1, 1, 1]' --set plan.samples_per_epoch=30000 --set schedule.epochs=8 --set 'schedule.milestones=[5]' --set 'schedule.lr=[0.1, 0.01]' --set checkpoint.every_epochs=0 --set schedule.small_lr=same --set schedule.warmup_ramp=task --set optim.ps_momentum=0.9 --set seed=$s --set out=$d --set 'plan.large_batch={20: 128, 24: 96, 28: 64}' --set mode=sync --set 'workers.groups=[4]' --set workers.small=0 --set plan.k=1.0 --set schedule.resolution_mode=fixed > $d.log 2>&1
  tail -n1 $d.log
done
