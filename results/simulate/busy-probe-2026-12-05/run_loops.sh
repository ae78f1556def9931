#!/bin/bash
# bench exchange at 180k floats with N training-like processes beside it
cd /work/main
for n in 0 1 3 0 1 3; do
  pids=()
  for i in $(seq 1 $n); do .venv/bin/python results/simulate/busy-probe-2026-12-05/busy.py & pids+=($!); done
  sleep 2
  scripts/mpirun_local.sh -np 2 .venv/bin/python -m hpc_dualbatch bench exchange --floats 180000 --iters 32 --out results/simulate/busy-probe-2026-12-05/ex-$n-$(date +%s).json > /tmp/log-$n.txt 2>&1
  echo "busy $n"; grep -A7 "variant" /tmp/log-$n.txt | head -9
  for p in "${pids[@]}"; do kill $p; done; wait 2>/dev/null
done
