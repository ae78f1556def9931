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

from .helpers import ROOT

# Groups of tests a machine prepared by `make setup` must run. Under `make test`
# (HDB_REQUIRE_GROUPS=1) a test of such a group that is skipped fails the session, so
# "all passed" cannot hide a group that never ran. Horovod and mpi4py are installed by
# setup; Slurm where tests/test_slurm.py can install and start it (root with apt-get, or
# already installed). A group is known by its skip reason.
REQUIRED = {
    "Horovod": lambda: True,
    "mpi4py": lambda: True,
    "Slurm": lambda: bool(shutil.which("slurmctld")) or (os.geteuid() == 0 and bool(shutil.which("apt-get"))),
}
_required_skips: list[str] = []


def _note_skip(report) -> None:
    if os.environ.get("HDB_REQUIRE_GROUPS") != "1" or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    for group, should_have in REQUIRED.items():
        if group.lower() in reason.lower() and should_have():
            _required_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)  # a module skipped at import (pytest.importorskip)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _required_skips:
        print("\nrequired tests were skipped on a machine that should run them:", file=sys.stderr)
        for line in _required_skips:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
