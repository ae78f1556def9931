from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

if "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMI_RANK" not in os.environ:
    # Serial run: importing a package module must not make this process an MPI singleton,
    # whose environment would leak into the mpirun jobs the tests launch and make them fail.
    import mpi4py

    mpi4py.rc.initialize = False

from tests.helpers import ROOT

# Groups of tests a machine prepared by `make setup` must run. Under `make test`
# (HDB_REQUIRE_GROUPS=1) a test skipped because its group cannot run is reported as failed,
# so "all passed" cannot hide a group that never ran: Horovod, mpi4py and tensorboard (setup
# installs them), and Slurm where it was installed before the session (tests/test_slurm.py installs
# it on a fresh machine where it can, and may then skip if the local cluster cannot start).
# A group is known by its skip reason.
REQUIRED = ["horovod", "mpi4py", "tensorboard"] + (["slurm"] if shutil.which("slurmctld") else [])


def _require(report):
    if os.environ.get("HDB_REQUIRE_GROUPS") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return report
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    group = next((g for g in REQUIRED if g in reason.lower()), None)
    if group is not None:
        report.outcome = "failed"
        report.longrepr = f"a {group} test was skipped on a machine that must run it ({reason})"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _require((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _require((yield))  # a module skipped at import (pytest.importorskip)


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory) -> str:
    """A small staged synthetic data set (10 classes, 3 channels, 12 and 16 px), made once per session."""
    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_dualbatch",
            "prepare",
            "--source",
            "synthetic",
            "--resolutions",
            "12,16",
            "--out",
            str(path),
            "--synthetic-samples",
            "2000",
            "--synthetic-test-samples",
            "400",
            "--synthetic-size",
            "16",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    return str(path)
