from __future__ import annotations

import os
import subprocess
import sys

import pytest

if "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMI_RANK" not in os.environ:
    # Serial run: importing a package module must not make this process an MPI singleton,
    # whose environment would leak into the mpirun jobs the tests launch and make them fail.
    import mpi4py

    mpi4py.rc.initialize = False

from .helpers import ROOT


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
