#!/usr/bin/env bash
# The Fashion-MNIST grid, round two of the statistics: can the parameter server reach synchronous
# Horovod at the same epochs, and do small-batch groups then add accuracy? Round one is in
# results/fashion-mnist-v3/ (same parts, same budget). Two parts (results/README.md says why each
# is built so):
#
#   server     B_L = 128/96/64 at 20/24/28 px, fixed 28 px, all groups large: sync, ps-base (the
#              package's defaults), a push_every sweep (1, 2, 4, 8; 16 is ps-base), the new server
#              options each alone (outer momentum at every push and delayed; push period per LR
#              stage), and two controls: rounds (every push answered once all groups pushed:
#              barrier-synchronous local SGD, no asynchrony) and single (one 4-rank group through
#              the server: the server without several groups).
#   dualbatch  B_L = 512/384/256, a regime where all-large training loses to small batches at this
#              budget: sync at B_L and at the planned B_S, ps-base, dual-batch and hybrid at
#              n_S = 2 and 3 (the paper's best n_S at k = 1.05), the ablations that say which
#              server option lets the small groups help (push period, nova, the small groups'
#              rate), and other epoch budgets for an accuracy-vs-wall-time frontier.
#
#   PARTS=dualbatch bash results/fashion-mnist/run_grid.sh   # one part, SEEDS="1 2 3"
#   bash results/fashion-mnist/run_grid.sh                   # both parts
#   PARTS=server SEEDS="1" bash results/fashion-mnist/run_grid.sh
#   PARTS=server SEEDS="4 5" ONLY="sync-r4 ps-base-mom08-pull" bash ...   # only these configurations
#
# Finished runs are skipped, so the grid continues across sittings; seeds run in the outer loop,
# so every configuration has its first seed before any has its second. Each run's exact command
# is in its folder (command.txt), with config.yaml, plan.json, metrics.jsonl and status.json.
# Run nothing else heavy beside it: the wall times are part of the result.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"1 2 3"}
PARTS=${PARTS:-"server dualbatch"}
OUT=results/fashion-mnist
DATA=${DATA:-data/fashion-mnist.h5}
PY=.venv/bin/python
[ -f "$DATA" ] || $PY -m hpc_dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out "$DATA"

# Common to every run: the demo config with a width-8 CIFAR ResNet-18 (0.18 M weights, a third
# of width 16's time per sample here, so 45 runs fit in a few sittings), 4 worker groups as in
# the paper, 8 epochs of 30,000 samples drawn from the whole train split (4 passes), LR 0.1 with
# a 1-epoch warm-up, 0.01 for the last 3 (so the cyclic schedule of the hybrid runs climbs
# 20 -> 24 -> 28 px in both stages and ends at 28 px), no intermediate checkpoints (a checkpoint is a
# barrier; the paper's runs have none). Why this budget: results/README.md ("Budget").
COMMON=(--config hpc_dualbatch/configs/fashion_mnist.yaml --set "data.path=$DATA"
        --set model.width=8 --set "workers.groups=[1, 1, 1, 1]" --set plan.samples_per_epoch=30000
        --set schedule.epochs=8 --set "schedule.milestones=[5]" --set "schedule.lr=[0.1, 0.01]"
        --set checkpoint.every_epochs=0
        --set schedule.small_lr=same --set schedule.warmup_ramp=task  # the defaults round two ran at
        --set optim.ps_momentum=0.9)  # (before this key the groups took optim.momentum)
SYNC=(--set mode=sync --set "workers.groups=[4]" --set workers.small=0 --set plan.k=1.0)
ALL_LARGE=(--set workers.small=0 --set plan.k=1.0)
FIXED=(--set schedule.resolution_mode=fixed)

run() {  # run PART NAME NP SEED overrides...
  local part=$1 name=$2 np=$3 seed=$4; shift 4
  local dir=$OUT/runs/$part/$name-s$seed
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -f "$dir/status.json" ] && grep -q '"state": "done"' "$dir/status.json"; then return; fi
  rm -rf "$dir"
  mkdir -p "$OUT/runs/$part"
  echo "== $part/$name seed $seed ($(date +%H:%M:%S))"
  mkdir -p "$dir"  # the code that ran: commit, and whether the checkout had local changes
  { git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/changed: /'; } \
    > "$dir/code.txt" 2>/dev/null || true
  # The machine it ran on: wall times compare only between runs of one machine kind.
  { grep -m1 'model name' /proc/cpuinfo; nproc; hostname; } > "$dir/machine.txt" 2>/dev/null || true
  scripts/mpirun_local.sh -np "$np" $PY -m hpc_dualbatch train "${COMMON[@]}" --set "seed=$seed" \
    --set "out=$dir" "$@" > "$dir.log" 2>&1
  rm -rf "$dir/checkpoints"  # the training state (MBs a run), not a result: metrics.jsonl holds those
  tail -n 1 "$dir.log"
}

server_part() {  # server_part SEED
  local s=$1 P=(--set "plan.large_batch={20: 128, 24: 96, 28: 64}")
  local PS=(5 "$s" "${P[@]}" "${ALL_LARGE[@]}" "${FIXED[@]}")
  run server sync 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base "${PS[@]}"
  for every in 4 1 2 8; do run server ps-base-push$every "${PS[@]}" --set server.push_every=$every; done
  run server ps-base-nesterov "${PS[@]}" --set server.outer=nesterov
  run server ps-base-delayed "${PS[@]}" --set server.outer=delayed
  run server ps-base-pushlr "${PS[@]}" --set "server.push_every_by_lr=[1, 16]"  # post-local SGD
  run server ps-rounds "${PS[@]}" --set server.order=rounds
  # one group of 4 ranks at 4 x 64 per step, as sync: B_L is a group's batch
  run server ps-single 5 "$s" --set "plan.large_batch={20: 512, 24: 384, 28: 256}" "${ALL_LARGE[@]}" \
    "${FIXED[@]}" --set "workers.groups=[4]"
  # the warm-up ramped per step (schedule.warmup_ramp: step) instead of per task, one key changed
  # against ps-base-push4 and ps-single (both ran when the default push period was 16)
  run server ps-base-rampstep "${PS[@]}" --set server.push_every=4 --set schedule.warmup_ramp=step
  run server ps-single-rampstep 5 "$s" --set "plan.large_batch={20: 512, 24: 384, 28: 256}" \
    "${ALL_LARGE[@]}" "${FIXED[@]}" --set "workers.groups=[4]" --set server.push_every=16 \
    --set schedule.warmup_ramp=step
  # a group trains on while its push inside a task travels (server.overlap), against ps-base-push4
  run server ps-base-overlap "${PS[@]}" --set server.push_every=4 --set server.overlap=true
  # frequent pushes once a push no longer copies the model tensor by tensor (FlatModel, from
  # 937f0af on), with the step ramp; `sync` again in the same sitting, one seed before them,
  # so that their wall time is compared with a sync run made beside them
  run server sync-r2 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  for every in 1 2; do
    run server ps-base-push$every-rampstep "${PS[@]}" --set server.push_every=$every --set schedule.warmup_ramp=step
  done
  # outer momentum at SlowMo's values (Wang et al. 2020, arXiv 1910.00643; fairscale's SlowMo
  # wrapper defaults to slow lr 1.0, slow momentum 0.5) instead of DiLoCo's 0.7 / 0.9, which
  # assume an AdamW inner optimiser and diverged here (ps-base-nesterov, ps-base-delayed): the
  # momentum step once per round of n pushes (delayed), at the default push period and ramp;
  # `sync` and the default again beside it (this sitting's machine)
  local DEF=(--set server.push_every=4 --set schedule.warmup_ramp=step)
  run server sync-r3 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-rampstep-r3 "${PS[@]}" "${DEF[@]}"
  run server ps-base-slowmo "${PS[@]}" "${DEF[@]}" --set server.outer=delayed --set server.outer_lr=1.0 \
    --set server.outer_momentum=0.5
  # the control behind the defaults' gap: barrier-synchronous rounds (every group pushes, the
  # server merges them all, then answers) at the default period and at every step, beside
  # ps-base-rampstep-r3 on the same machine: rounds at 4 separate asynchrony from 4 local steps,
  # rounds at 1 are synchronous SGD through the server (the server path without either)
  for every in 4 1; do
    run server ps-rounds-push$every "${PS[@]}" "${DEF[@]}" --set server.push_every=$every --set server.order=rounds
  done
  # less SGD momentum in the groups: asynchrony itself acts as momentum (Mitliagkas et al. 2016,
  # arXiv 1605.09774: about 1 - 1/M with M asynchronous workers; Liu et al. 2018, arXiv
  # 1806.01660: an asynchronous momentum SGD needs less momentum than a synchronous one), so
  # 0.9 on top of 4 asynchronous groups may be too much; sync again beside them (-r4). (These
  # ran at e6a8e05 with optim.momentum=$mom, which then set the groups' momentum too.)
  run server sync-r4 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  for mom in 0.8 0.6; do
    run server ps-base-mom${mom/./} "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=$mom
  done
  # the package's defaults since: momentum 0.8 in the groups (optim.ps_momentum) and the
  # evaluating group's pull after its evaluation (from cee326a on)
  run server ps-base-mom08-pull "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8
  # and 0.9 on the same code, the pair the default rests on (seeds 4-5 of these three:
  # SEEDS="4 5" ONLY="sync-r4 ps-base-mom08-pull ps-base-mom09-pull")
  run server ps-base-mom09-pull "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.9
  # the defaults with the final evaluation shared by every group (ps/evaluation.py; before, the
  # closing group made it alone while the others idled), beside sync again (-r5)
  run server sync-r5 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-shared "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8
  # the rounds control at today's defaults (the groups' momentum 0.8, the shared final
  # evaluation): does barrier-synchronous local SGD through the server reach sync where the
  # asynchronous defaults end 0.25 below it? Beside sync again (-r6)
  run server sync-r6 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-rounds-mom08 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 --set server.order=rounds
  # the defaults with the server expecting each push (server.poll_predict, from 5ff83b7 on):
  # the groups' exchange waits inside tasks against ps-base-mom08-shared's, beside sync (-r7)
  run server sync-r7 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-predict "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8
  # the same defaults with code that records the wake-ups its waits met (Request.sleeps, late;
  # status.json's wake_late_ms), for `simulate check`, beside sync again (-r10)
  run server sync-r10 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-wake "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8
  # the defaults pushing every step once the rate has decayed (server.push_every_by_lr [4, 1]):
  # the defaults' gap to sync and to rounds opens after the decay (per-epoch means of the runs
  # above); after the runs beside sync-r10, the same sitting
  run server ps-base-mom08-push41 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.push_every_by_lr=[4, 1]"
  # the defaults asynchronous while the rate is high, barrier-synchronous rounds after the decay
  # (server.order_by_lr [arrival, rounds]): rounds throughout reach sync (ps-rounds-mom08) and the
  # defaults' gap opens after the decay; the rounds' waits paid only in the last stage. Beside
  # sync again (-r11)
  run server sync-r11 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-roundslate "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.order_by_lr=[arrival, rounds]"
  # the defaults with a push of an earlier learning-rate stage, merged once the newest task is in
  # a later one, scaled to the newest stage's rate (server.stale_lr: rescale, from its commit
  # on): under arrival order a slow group's whole last task at lr 0.1 lands after the others
  # began training at 0.01, and the defaults' gap to sync opens at the decay. Beside sync (-r12)
  run server sync-r12 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-stalelr "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set server.stale_lr=rescale
  # rescaled, the defaults fell further behind after the decay (the stale pushes of the old
  # rate were progress, not noise): the stage a task trains in from the commits merged when it
  # is handed out (server.stage_by: commit, the method's), which moves the server's decay later
  # instead, after the same sync-r12 runs
  run server ps-base-mom08-stagecommit "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set server.stage_by=commit
  # sync evaluated with the server's BN treatment (sync.bn: recalibrate, from its commit on):
  # statistics recomputed before every evaluation instead of Horovod's running ones. Training
  # never reads them, so its weights are sync's (sync is deterministic on one machine kind) and
  # the difference is the BN treatment alone: what the comparisons above leave in the server's
  # favour (results/fashion-mnist/bn-probe/: the same final weights both ways)
  run server sync-bnrecal 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" --set sync.bn=recalibrate
  # tail averaging (schedule.average: last_stage, from its commit on): the mean of the weights
  # over the last rate stage evaluated and saved instead of the last iterate, after every step
  # of sync and every merge of the server (the same rate here). With the same BN statistics the
  # defaults lead sync before the decay and trail after it; the mean damps the iterates' noise
  # at the low rate, asynchronous merges' included. Both get it: sync-avg trains as sync-bnrecal
  # (sync is deterministic on one machine kind), so it differs from it by the average alone
  run server sync-avg 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" --set sync.bn=recalibrate \
    --set schedule.average=last_stage
  run server ps-base-mom08-avg "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set schedule.average=last_stage
  # the mean from the decay on lowered both (3 seeds: the model still improves through the low-rate
  # stage, and the mean keeps its first weights). The two options that each moved the defaults
  # toward sync after the decay, together: asynchronous while the rate is high, synchronous SGD
  # through the server after it (barrier-synchronous rounds with a push every step:
  # server.order_by_lr [arrival, rounds], server.push_every_by_lr [4, 1]). Rounds after the decay
  # at 4 steps ended 0.10 below sync (6 seeds); rounds at every step throughout 0.36 above
  # sync-r3 (3 seeds) at 1.03x its wall time. Beside sync again (-r13)
  run server sync-r13 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-synclate "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.order_by_lr=[arrival, rounds]" --set "server.push_every_by_lr=[4, 1]"
  # 3 seeds: -0.24 against sync, as the defaults. Per-epoch means over seeds 1-3: across the decay
  # rounds gain more than arrival (epoch 5 -> 6: rounds at 4 steps +1.61 at momentum 0.9, +1.10 at
  # 0.8; the defaults +0.65), and at 0.8 the groups' steps after the decay are half a synchronous
  # run's (lr / (1 - momentum): 0.05 against 0.1). The groups' momentum is lowered because
  # asynchrony adds momentum of its own, which barrier-synchronous rounds do not: the same with the
  # synchronous run's momentum in the rounds (optim.ps_momentum_by_lr [0.8, 0.9], from its commit
  # on), after the sync-r13 runs of the same sitting
  run server ps-base-mom08-synclate-mom09 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.order_by_lr=[arrival, rounds]" --set "server.push_every_by_lr=[4, 1]" \
    --set "optim.ps_momentum_by_lr=[0.8, 0.9]"
  # 3 seeds: -0.22 against sync. Nothing after the decay closes the gap (arrival, rounds at 4 or
  # every step, at either momentum), where rounds throughout reach sync (ps-rounds-push4,
  # ps-rounds-mom08): the reverse, rounds while the rate is high and the defaults after it
  # (post-local SGD's order, Lin et al. 2020, arXiv 1808.07217), at the synchronous momentum in
  # the rounds; after the runs above, the same sitting
  run server ps-base-roundsearly "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.order_by_lr=[rounds, arrival]" --set "optim.ps_momentum_by_lr=[0.9, 0.8]"
  # (3 seeds: -0.57 against sync; level with ps-rounds-push4 at the decay, 0.5 below it after:
  # asynchrony after the decay costs too. Only rounds throughout reach sync.)
  # The rounds control on today's code at the synchronous momentum (no asynchrony to add
  # momentum of its own; ps-rounds-push4 ran so on 7b18af9, 3 seeds, -0.05 against sync-r3;
  # ps-rounds-mom08 at 0.8, 6 seeds, -0.19), beside sync again (-r14)
  run server sync-r14 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-rounds-mom09 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.9 --set server.order=rounds
  # (6 seeds: -0.17 against sync at 1.06-1.28x its wall time: rounds at 4 steps do not reach it
  # either; only rounds at every step did, ps-rounds-push1, 3 seeds)
  # Two questions left, beside sync again (-r15), 6 seeds: (1) pushes more often while the rate
  # is high and every 4 steps after it (server.push_every_by_lr [1, 4]: the local period growing
  # as the rate falls, after post-local SGD, Lin et al. 2020, and the quadratic synchronisation
  # rule, Gu et al. 2023, arXiv 2310.14423), at the defaults otherwise: the per-epoch means differ
  # most before the decay; (2) the one control that reached sync, synchronous SGD through the
  # server (rounds, a push every step: ps-rounds-push1, 3 seeds on 7b18af9), on today's code
  run server sync-r15 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run server ps-base-mom08-push14 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.8 \
    --set "server.push_every_by_lr=[1, 4]"
  run server ps-rounds-mom09-push1 "${PS[@]}" "${DEF[@]}" --set optim.ps_momentum=0.9 \
    --set server.order=rounds --set server.push_every=1
  # (6 seeds: [1, 4] -0.16 against sync, within the band of every asynchronous run; the rounds
  # every step +0.26 at a median 1.08x its wall time, as on earlier code)
}

TIMING=$OUT/runs/dualbatch/timing.json
dualbatch_part() {  # dualbatch_part SEED
  local s=$1 P=(--set "plan.large_batch={20: 512, 24: 384, 28: 256}" --set "plan.timing=$TIMING")
  if [ ! -f "$TIMING" ]; then  # the time model of this machine, measured once for the whole part
    # Fitted over 8-64 samples per step, where B_S lies: on these CPUs the time per sample
    # rises again past ~64-128 (cache), a U the linear model t(x) = a*x + b cannot follow (fits
    # up to 512, and once up to 128, gave b < 0 at 20 or 28 px, which the planner refuses). The
    # large groups at B_L run in the U; adaptive planning measures them (plan.adaptive).
    mkdir -p "$(dirname "$TIMING")"
    $PY -m hpc_dualbatch profile "${COMMON[@]}" "${P[@]}" --batches 8,12,16,24,32,48,64 \
      --repeats 9 --warmup 2 --clock cpu --inputs staged --out "$TIMING"
  fi
  # B_S the planner gives n_S = 2 at k = 1.05: the small batch synchronous training is compared at.
  local plan=$OUT/runs/dualbatch/plan-ns2.json
  [ -f "$plan" ] || $PY -m hpc_dualbatch plan "${COMMON[@]}" "${P[@]}" --set workers.small=2 --out "$plan" >/dev/null
  local bs
  bs=$($PY -c "import json,sys; r=json.load(open(sys.argv[1]))['resolutions']; \
print('{' + ', '.join(f'{k}: {v[\"B_S\"]}' for k, v in r.items()) + '}')" "$plan")
  run dualbatch sync 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch sync-small 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" --set "plan.large_batch=$bs"
  run dualbatch ps-base 5 "$s" "${P[@]}" "${ALL_LARGE[@]}" "${FIXED[@]}"
  for ns in 2 3; do
    run dualbatch dual-ns$ns 5 "$s" "${P[@]}" --set workers.small=$ns "${FIXED[@]}"
    run dualbatch hybrid-ns$ns 5 "$s" "${P[@]}" --set workers.small=$ns
  done
  # which option lets the small groups help: each changes one key of dual-ns3
  run dualbatch dual-ns3-push16 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" --set server.push_every=16
  run dualbatch dual-ns3-nova 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" --set server.merge=nova
  run dualbatch dual-ns3-lrsqrt 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" --set schedule.small_lr=sqrt
  # does the small groups' sqrt rate carry to n_S = 2 and to the hybrid (before it becomes the default)
  local SQRT=(--set schedule.small_lr=sqrt)
  run dualbatch dual-ns2-lrsqrt 5 "$s" "${P[@]}" --set workers.small=2 "${FIXED[@]}" "${SQRT[@]}"
  run dualbatch hybrid-ns3-lrsqrt 5 "$s" "${P[@]}" --set workers.small=3 "${SQRT[@]}"
  run dualbatch dual-ns3-lrsqrt-overlap 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set server.overlap=true
  # equal wall time: other epoch budgets (<name>-e<epochs>, the LR decay at the same share of the
  # run), so that report draws accuracy against wall seconds: cyclic progressive learning makes
  # an epoch ~0.67x as long, so hybrid at 12 epochs takes about sync's 8
  local E6=(--set schedule.epochs=6 --set "schedule.milestones=[4]")
  local E12=(--set schedule.epochs=12 --set "schedule.milestones=[8]")
  run dualbatch sync-e6 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" "${E6[@]}"
  run dualbatch sync-e12 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" "${E12[@]}"
  run dualbatch hybrid-ns3-e12 5 "$s" "${P[@]}" --set workers.small=3 "${E12[@]}"
  run dualbatch dual-ns3-e12 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${E12[@]}"
  run dualbatch hybrid-ns3-lrsqrt-e12 5 "$s" "${P[@]}" --set workers.small=3 "${E12[@]}" "${SQRT[@]}"
  # about sync-small's wall time (the hybrid's epoch ~0.67x sync's, sync-small 1.15x sync)
  local E14=(--set schedule.epochs=14 --set "schedule.milestones=[9]")
  run dualbatch hybrid-ns3-lrsqrt-e14 5 "$s" "${P[@]}" --set workers.small=3 "${E14[@]}" "${SQRT[@]}"
  # the three sqrt hybrids again from 86ac0a5 on (-evalfix), where a mid-run evaluation uses the
  # resolution of the epoch it evaluates; before, a cycle's first 20-px task evaluated the
  # weights just trained at 28 px (the falls of the runs above; their finals are unaffected)
  run dualbatch hybrid-ns3-lrsqrt-evalfix-e12 5 "$s" "${P[@]}" --set workers.small=3 "${E12[@]}" "${SQRT[@]}"
  run dualbatch hybrid-ns3-lrsqrt-evalfix-e14 5 "$s" "${P[@]}" --set workers.small=3 "${E14[@]}" "${SQRT[@]}"
  run dualbatch hybrid-ns3-lrsqrt-evalfix 5 "$s" "${P[@]}" --set workers.small=3 "${SQRT[@]}"
  # barrier-synchronous rounds (server.order: rounds) with small-batch groups, against the same
  # configuration asynchronous and `sync`, all three again on this sitting's machine (-r3)
  run dualbatch sync-r3 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch dual-ns3-lrsqrt-r3 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}"
  run dualbatch dual-ns3-lrsqrt-rounds 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set server.order=rounds
  # the groups' momentum 0.8 (optim.ps_momentum) and the evaluating group's pull, beside sync
  run dualbatch sync-r4 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch dual-ns3-lrsqrt-mom08-pull 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.8
  # and at 0.9 on the same code (ran after the three above, without a sync beside it)
  run dualbatch dual-ns3-lrsqrt-mom09-pull 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.9
  # the defaults with the final evaluation shared by every group, beside sync again (-r5)
  run dualbatch sync-r5 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch dual-ns3-lrsqrt-mom08-shared 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.8
  # the hybrid at this part's defaults now (sqrt rate, momentum 0.8, the shared final evaluation,
  # the server expecting each push) at 12 epochs (about sync's wall time) and 8, beside sync
  # again (-r8): the frontier target with wall times of one sitting
  run dualbatch sync-r8 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch hybrid-ns3-lrsqrt-mom08-e12 5 "$s" "${P[@]}" --set workers.small=3 "${E12[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.8
  run dualbatch hybrid-ns3-lrsqrt-mom08 5 "$s" "${P[@]}" --set workers.small=3 "${SQRT[@]}" --set optim.ps_momentum=0.8
  # and at 11 epochs, about sync's wall time on this Intel machine (12 took 1.10x), the same sitting
  local E11=(--set schedule.epochs=11 --set "schedule.milestones=[7]")
  run dualbatch hybrid-ns3-lrsqrt-mom08-e11 5 "$s" "${P[@]}" --set workers.small=3 "${E11[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.8
  # the all-large server and dual-batch at this part's settings now (sqrt rate for the small
  # groups, momentum 0.8, the shared final evaluation, the server expecting each push), beside
  # sync again (-r9): whether the small groups add accuracy through today's server
  run dualbatch sync-r9 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}"
  run dualbatch ps-base-mom08 5 "$s" "${P[@]}" "${ALL_LARGE[@]}" "${FIXED[@]}" --set optim.ps_momentum=0.8
  run dualbatch dual-ns3-lrsqrt-mom08 5 "$s" "${P[@]}" --set workers.small=3 "${FIXED[@]}" "${SQRT[@]}" \
    --set optim.ps_momentum=0.8
  # sync evaluated with the server's BN treatment (sync.bn: recalibrate), as in the server part:
  # sync's weights, the server's statistics
  run dualbatch sync-bnrecal 4 "$s" "${P[@]}" "${SYNC[@]}" "${FIXED[@]}" --set sync.bn=recalibrate
}

for seed in $SEEDS; do
  for part in $PARTS; do "${part}_part" "$seed"; done
done

# One report per part, from every finished run of it, configurations in this order.
ORDER_server="sync ps-base ps-base-push1 ps-base-push2 ps-base-push4 ps-base-push8 ps-base-nesterov
              ps-base-delayed ps-base-pushlr ps-rounds ps-single ps-base-rampstep ps-single-rampstep
              ps-base-overlap sync-r2 ps-base-push1-rampstep ps-base-push2-rampstep sync-r3
              ps-base-rampstep-r3 ps-base-slowmo ps-rounds-push4 ps-rounds-push1 sync-r4 ps-base-mom08
              ps-base-mom06 ps-base-mom08-pull ps-base-mom09-pull sync-r5 ps-base-mom08-shared
              sync-r6 ps-rounds-mom08 sync-r7 ps-base-mom08-predict sync-r10 ps-base-mom08-wake
              ps-base-mom08-push41 sync-r11 ps-base-mom08-roundslate sync-r12 ps-base-mom08-stalelr
              ps-base-mom08-stagecommit sync-bnrecal sync-avg ps-base-mom08-avg
              sync-r13 ps-base-mom08-synclate ps-base-mom08-synclate-mom09 ps-base-roundsearly
              sync-r14 ps-rounds-mom09 sync-r15 ps-base-mom08-push14 ps-rounds-mom09-push1"
ORDER_dualbatch="sync sync-e6 sync-e12 sync-small ps-base dual-ns2 hybrid-ns2 dual-ns3 hybrid-ns3
                 dual-ns3-push16 dual-ns3-nova dual-ns3-lrsqrt dual-ns2-lrsqrt hybrid-ns3-lrsqrt
                 dual-ns3-lrsqrt-overlap
                 hybrid-ns3-e12 hybrid-ns3-lrsqrt-e12 hybrid-ns3-lrsqrt-e14 dual-ns3-e12
                 hybrid-ns3-lrsqrt-evalfix hybrid-ns3-lrsqrt-evalfix-e12 hybrid-ns3-lrsqrt-evalfix-e14
                 sync-r3 dual-ns3-lrsqrt-r3 dual-ns3-lrsqrt-rounds sync-r4 dual-ns3-lrsqrt-mom08-pull
                 dual-ns3-lrsqrt-mom09-pull sync-r5 dual-ns3-lrsqrt-mom08-shared sync-r8
                 hybrid-ns3-lrsqrt-mom08-e12 hybrid-ns3-lrsqrt-mom08 hybrid-ns3-lrsqrt-mom08-e11
                 sync-r9 ps-base-mom08 dual-ns3-lrsqrt-mom08 sync-bnrecal"
for part in $PARTS; do
  order="ORDER_$part"
  dirs=()
  for name in ${!order}; do
    for d in "$OUT/runs/$part/$name"-s[0-9]*/; do
      [ -f "$d/status.json" ] && grep -q '"state": "done"' "$d/status.json" && dirs+=("${d%/}")
    done
  done
  targets=()  # the issue's targets for this part, judged from the runs (report.md, targets.json)
  [ -f "$OUT/targets-$part.json" ] && targets=(--targets "$OUT/targets-$part.json")
  [ ${#dirs[@]} -gt 0 ] && $PY -m hpc_dualbatch report "${dirs[@]}" --baseline sync --out "$OUT/$part" "${targets[@]}"
done
