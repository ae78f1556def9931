from __future__ import annotations

import subprocess
import sys

import pytest

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
