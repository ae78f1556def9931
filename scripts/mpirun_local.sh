#!/usr/bin/env bash
# mpirun for a workstation or a CI machine: adds what a laptop-sized run needs and a cluster
# does not (keep these out of the Slurm templates):
#  - Open MPI refuses to run as root without OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM);
#  - more ranks than cores need --oversubscribe (Open MPI 4) / --map-by :OVERSUBSCRIBE (5);
#  - mpi_yield_when_idle: a rank blocked in MPI yields its core instead of spinning on it;
#  - --bind-to none: Open MPI 4 pins each rank to a core for np <= 2 and not beyond, which makes
#    runs of different sizes share a busy machine differently.
# Usage: scripts/mpirun_local.sh -np 4 hpc-dualbatch train --config ...
set -euo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
extra=()
version=$(mpirun --version 2>/dev/null | head -n1 || true)
case $version in
  *"Open MPI"*" 5."* | *"Open MPI) 5."*) extra=(--map-by :OVERSUBSCRIBE) ;;
  *"Open MPI"*) extra=(--oversubscribe) ;;
esac
exec mpirun --bind-to none "${extra[@]}" "$@"
