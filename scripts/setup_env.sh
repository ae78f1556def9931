#!/usr/bin/env bash
# Set up everything hpc_dualbatch needs, reusing whatever is already there.
#
#   scripts/setup_env.sh            # venv in ./.venv (or $HDB_VENV)
#
# Steps, each skipped when its result is already present:
#   1. system packages (Open MPI, cmake, Fashion-MNIST) from Debian when apt is usable;
#      on a cluster without root: load an MPI module first, the script says what is missing
#   2. a virtual environment with torch + torchvision and the Python packages (TensorBoard too)
#   3. Horovod 0.28.1 built from its source release against this torch and this MPI,
#      cached as a wheel in $HDB_CACHE (default ~/.cache/hpc_dualbatch) so it builds once
# Why the Horovod build is patched: its CMakeLists pin C++14, torch >= 2.1 headers need
# C++17 and torch 2.14 headers need C++20 (see README, "Installing").
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HDB_VENV:-$here/.venv}
CACHE=${HDB_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hpc_dualbatch}
PYTHON=${PYTHON:-python3}
# The pair that gives torch + torchvision + Horovod together on the CPU machines we test on;
# on a cluster set HDB_TORCH_SPEC to the build that matches your CUDA (any torch >= 2.1).
TORCH_SPEC=${HDB_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HOROVOD_VERSION=0.28.1
WITH_SLURM=${HDB_WITH_SLURM:-0}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. system packages -----------------------------------------------------
apt_usable() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_missing=()
command -v mpirun >/dev/null 2>&1 || apt_missing+=(openmpi-bin libopenmpi-dev)
command -v mpicxx >/dev/null 2>&1 || apt_missing+=(libopenmpi-dev)
command -v cmake >/dev/null 2>&1 || apt_missing+=(cmake)
command -v g++ >/dev/null 2>&1 || apt_missing+=(g++)
[ -d /usr/share/datasets/fashion-mnist ] || apt_missing+=(dataset-fashion-mnist)
if [ "$WITH_SLURM" = 1 ] && ! command -v slurmctld >/dev/null 2>&1; then
  apt_missing+=(slurm-wlm munge)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  if apt_usable; then
    say "installing from Debian: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
  else
    for p in "${apt_missing[@]}"; do
      case $p in
        dataset-fashion-mnist) say "note: Fashion-MNIST not found in /usr/share/datasets; use --input for prepare" ;;
        slurm-wlm|munge) say "note: Slurm not installed; the Slurm tests will be skipped" ;;
        *) die "missing $p and apt is not usable here (not root?). On a cluster: 'module load' an MPI with mpicxx, and cmake >= 3.13 and g++, then rerun." ;;
      esac
    done
  fi
fi
command -v mpicxx >/dev/null 2>&1 || die "mpicxx not found: Horovod is compiled against the MPI in PATH; load or install an MPI with its compiler wrappers"

# --- 2. virtual environment -------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$py" -c 'import torch, torchvision' >/dev/null 2>&1; then
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_q $TORCH_SPEC
fi
# The package itself (editable) with its test, plot and TensorBoard extras; pulls numpy, h5py,
# mpi4py, pyyaml, pytest, tensorboard...
if ! "$py" -c 'import hpc_dualbatch, mpi4py, h5py, pytest, pytest_mpi, yaml, matplotlib, ruff, tensorboard' >/dev/null 2>&1; then
  say "installing hpc_dualbatch[test,plot,tensorboard] (editable)"
  pip_q wheel setuptools
  pip_q -e "$here[test,plot,tensorboard]"
fi

# --- 3. Horovod with PyTorch + MPI ----------------------------------------
hvd_ok() {
  "$py" - <<'PY' >/dev/null 2>&1
import horovod.torch as hvd
assert hvd.mpi_built()
PY
}
if hvd_ok; then
  say "Horovod with PyTorch and MPI is installed"
  exit 0
fi

torch_ver=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "cpu")')
mpi_ver=$(mpirun --version 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9.\n' '_' | tr -d '\n')
pyver=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key="horovod-${HOROVOD_VERSION}_torch-${torch_ver}-${torch_cuda}_${mpi_ver}_${pyver}_gpu-${HOROVOD_GPU_OPERATIONS:-none}"
wheel_dir="$CACHE/wheels/$key"

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  # The C++ standard the installed torch headers require: 20 when they refuse anything older.
  # ATen.h states the standard it requires: "#error C++NN or later compatible compiler is required".
  cxx_std=$("$py" - <<'PY'
import os, re, torch
aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
m = re.search(r"#error C\+\+(\d+) or later", open(aten, errors="ignore").read())
print(m.group(1) if m else 17)
PY
)
  say "building Horovod $HOROVOD_VERSION for torch $torch_ver ($torch_cuda) with C++$cxx_std (about 5 minutes)"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
  tar -xzf "$build"/horovod-*.tar.gz -C "$build"
  src=$(ls -d "$build"/horovod-*/)
  sed -i -E "s/CMAKE_CXX_STANDARD [0-9]+/CMAKE_CXX_STANDARD $cxx_std/" \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD $cxx_std" "$src/horovod/torch/CMakeLists.txt" \
    || die "could not set the C++ standard in Horovod's CMakeLists (layout changed?)"
  # A CUDA build of torch makes Horovod's cmake look for the CUDA toolkit.
  if [ "$torch_cuda" != cpu ]; then
    for c in "${CUDA_HOME:-}" /usr/local/cuda-"$torch_cuda" /usr/local/cuda; do
      if [ -n "$c" ] && [ -x "$c/bin/nvcc" ]; then
        export CUDA_HOME=$c CUDAToolkit_ROOT=$c PATH=$c/bin:$PATH; break
      fi
    done
    [ -n "${CUDA_HOME:-}" ] || say "warning: torch is a CUDA build but no CUDA toolkit was found; the build may fail"
  fi
  pip_q packaging psutil pyyaml cloudpickle
  mkdir -p "$wheel_dir"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)" \
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$build/out" "$src"
  mv "$build"/out/horovod-*.whl "$wheel_dir"/
fi
say "installing Horovod from $wheel_dir"
pip_q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
pip_q packaging psutil pyyaml cloudpickle
hvd_ok || die "Horovod installed but not built with PyTorch and MPI; see 'hpc-dualbatch info'"
say "Horovod with PyTorch and MPI is installed"
