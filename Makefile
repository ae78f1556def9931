# The README's commands. Each installs what is missing first (scripts/setup_env.sh) and reuses
# what is there.
#   make demo    stage Fashion-MNIST, then a short hybrid run: 1 server + 3 worker groups (1 small)
#   make test    lint, serial tests, MPI tests at 2, 3 and 4 ranks; one combined pass/fail
#   make bench   all benchmark suites, one summary table
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PY := $(VENV)/bin/python
MPIRUN := scripts/mpirun_local.sh
DATA ?= data/fashion-mnist.h5
DEMO_OUT ?= runs/demo
PROFILE_ARGS ?=
# Hard limits (seconds): a hang fails the run instead of stalling it.
SERIAL_TIMEOUT ?= 2400
MPI_TIMEOUT ?= 600

.PHONY: setup demo test lint test-serial test-mpi bench clean

setup:
	bash scripts/setup_env.sh

$(DATA): | setup
	$(PY) -m hpc_dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out $(DATA)

# The demo plans B_S from a time model measured here first (~20 s): step times differ between
# machines of the same kind, so a timing file made elsewhere would plan wrong batches.
# PROFILE_ARGS: extra options of `profile` (e.g. --batches 48,64,96,128 for a degenerate fit).
demo: setup $(DATA)
	rm -rf $(DEMO_OUT) $(DEMO_OUT)-timing.json
	$(PY) -m hpc_dualbatch profile --config hpc_dualbatch/configs/fashion_mnist.yaml --set data.path=$(DATA) \
	  --clock cpu --inputs staged $(PROFILE_ARGS) --out $(DEMO_OUT)-timing.json
	$(MPIRUN) -np 4 $(PY) -m hpc_dualbatch train --config hpc_dualbatch/configs/fashion_mnist.yaml \
	  --set data.path=$(DATA) --set out=$(DEMO_OUT) --set plan.timing=$(DEMO_OUT)-timing.json

lint: setup
	$(VENV)/bin/ruff check hpc_dualbatch tests
	$(VENV)/bin/ruff format --check hpc_dualbatch tests

# HDB_REQUIRE_GROUPS=1: a test skipped for want of Horovod or mpi4py, or of a Slurm that was
# installed before the run, counts as failed (tests/conftest.py): "all passed" means every group ran.
# Three layers, each timed by pytest: unit tests (one process, milliseconds to seconds), the real
# jobs (marked `job`: mpirun, the command line, Slurm), then the in-process MPI tests (test-mpi).
test-serial: setup
	@set -e; \
	echo "== unit tests"; \
	HDB_REQUIRE_GROUPS=1 timeout -k 10 $(SERIAL_TIMEOUT) $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi -m "not job"; \
	echo "== real jobs"; \
	HDB_REQUIRE_GROUPS=1 timeout -k 10 $(SERIAL_TIMEOUT) $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi -m job

test-mpi: setup
	@set -e; for np in 2 3 4; do \
	  echo "== MPI tests on $$np ranks"; \
	  HDB_REQUIRE_GROUPS=1 timeout -k 10 $(MPI_TIMEOUT) $(MPIRUN) -np $$np $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi; \
	done

test: setup
	@fail=0; \
	$(MAKE) --no-print-directory lint || fail=1; \
	$(MAKE) --no-print-directory test-serial || fail=1; \
	$(MAKE) --no-print-directory test-mpi || fail=1; \
	if [ $$fail = 0 ]; then echo "make test: all passed"; else echo "make test: FAILED"; fi; exit $$fail

bench: setup
	$(PY) -m hpc_dualbatch bench all

clean:
	rm -rf runs .pytest_cache
