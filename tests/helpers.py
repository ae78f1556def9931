"""Shared by the tests that launch real MPI jobs: every launch runs under a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = str(ROOT / "scripts" / "mpirun_local.sh")


def hdb(np_: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`mpirun -np N python -m hpc_dualbatch ARGS` with a hard timeout (a hang fails, never stalls)."""
    cmd = [MPIRUN, "-np", str(np_), sys.executable, "-m", "hpc_dualbatch", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def start(np_: int, *args: str) -> subprocess.Popen:
    """Start a job in its own process group (so a test can signal or kill all of it)."""
    cmd = [MPIRUN, "-np", str(np_), sys.executable, "-m", "hpc_dualbatch", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def final_weights(out: Path) -> np.ndarray:
    from hpc_dualbatch.runtime import checkpoint

    return checkpoint.load(checkpoint.latest(str(out))).weights


def tiny_config(data: str, out: Path, **over) -> dict:
    """A synthetic-data config that trains in seconds: width-8 ResNet-18, 12/16 px, 4 epochs."""
    raw = {
        "mode": "ps",
        "seed": 0,
        "out": str(out),
        "device": "cpu",
        "threads": 1,
        "data": {"path": data},
        "model": {"arch": "resnet18_cifar", "width": 8},
        "workers": {"groups": [1, 1], "small": 1},
        "plan": {"k": 1.05, "large_batch": {12: 64, 16: 64}, "small_batch": {12: 32, 16: 32}},
        "schedule": {
            "epochs": 4,
            "lr": [0.1, 0.01],
            "milestones": [3],
            "resolutions": [12, 16],
            "dropout": {12: 0.0, 16: 0.1},
        },
        "server": {"order": "round_robin", "push_every": 4},  # ~16 large steps a task: 4 pushes
        "checkpoint": {"every_epochs": 1},
    }
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return raw


def wait_for(pred, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `pred()` until it is true; past `timeout` seconds fail the test, naming `what`."""
    import time

    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def rank_pids(job: subprocess.Popen, n: int, timeout: float = 60) -> dict[int, int]:
    """World rank -> pid of each rank process of a job from `start()`.

    Open MPI gives every rank a process group of its own (so `pgrep -g <mpirun's pgid>` finds
    only mpirun), but the ranks stay in mpirun's session, which `start()` made new: the ranks
    are the processes of that session whose environment holds OMPI_COMM_WORLD_RANK. A rank's
    own children inherit that environment (each rank runs a short-lived `uname -p` at start-up,
    platform.processor's): a rank is the one whose parent is not a process of the same rank (a
    CI run once signalled such a helper after it had exited).
    """
    found: dict[int, int] = {}

    def scan() -> bool:
        procs: dict[int, dict[int, int]] = {}  # rank -> {pid: parent pid}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getsid(int(entry)) != job.pid:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            for var in env:
                if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                    procs.setdefault(int(var.split(b"=", 1)[1]), {})[int(entry)] = ppid
        for rank, pids in procs.items():
            roots = [pid for pid, ppid in pids.items() if ppid not in pids]
            if len(roots) == 1:
                found[rank] = roots[0]
        return len(found) >= n

    wait_for(scan, timeout, f"{n} rank processes of job {job.pid}", poll=0.2)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL every process of a job from `start()`: mpirun and its ranks (each in its own
    process group, all in mpirun's session), so a failed test leaves nothing running."""
    import signal

    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == job.pid:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    job.communicate()


def start_up_error(args: list[str], np_: int = 3) -> str:
    """The message `mpirun -np NP_ hpc-dualbatch train ARGS` stops with at start-up, found
    in-process: the checks every rank runs inside `launch.agree` (`train.setup`), as rank 0 of
    an NP_-rank job. Fails unless they raise the package's own error (no traceback: a bug would
    carry one). That one agreed error ends every rank with one message is checked by a few real
    jobs (tests/test_train.py, test_reliability*.py)."""
    from hpc_dualbatch.cli import build_parser
    from hpc_dualbatch.commands.train import setup
    from hpc_dualbatch.runtime.launch import AgreedError, agree

    class World:  # the two questions setup asks of COMM_WORLD
        def Get_size(self) -> int:
            return np_

        def Get_rank(self) -> int:
            return 0

    parsed = build_parser().parse_args(["train", *args])
    try:
        agree(None, lambda: setup(parsed, World()))
    except AgreedError as e:
        assert "Traceback" not in str(e), str(e)
        return str(e)
    raise AssertionError(f"train {' '.join(args)} started")


def read_events(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of the TensorBoard event files in `folder`, read with TensorBoard's own reader:
    tag -> [(step, value, wall time)] in the order the reader keeps them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {t: [(e.step, e.value, e.wall_time) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
