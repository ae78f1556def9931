"""Reliability: bad input, faults during a run, and loading files safely (docs/reliability.md).

Bad input: every case must end every rank non-zero within 30 s with one `hpc-dualbatch: error`
line that names the file, key or value and what would be valid, and no traceback. The start-up
checks are the same code on every rank (`train.setup` inside `launch.agree`), so each case's
message is checked in-process (`helpers.start_up_error`) and a few cases run as real
`mpirun -np 3 ... train` jobs to show the agreed error ends every rank with one message. The
cases already in tests/test_train.py (unknown key, world size, missing data, resolution not
staged, B_S > B_L, k < 1, a folder holding a run) are not repeated here.

Faults: a rank killed with SIGKILL, SIGTERM to every rank, two runs in one folder. Each runs
under hard timeouts (no hang can stall the suite) and ends with a `--resume` that finishes the
run with every commit 1..total logged exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_dualbatch.config import config_from_dict
from hpc_dualbatch.errors import CheckpointError, ConfigError, PlanError
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.metrics import read_metrics
from tests.helpers import (
    ROOT,
    alive,
    hdb,
    kill_job,
    rank_pids,
    start,
    start_up_error,
    tiny_config,
    wait_for,
    write_config,
)

try:
    import horovod.torch  # noqa: F401

    HAVE_HOROVOD = True
except Exception:  # noqa: BLE001 - not installed, or built without torch
    HAVE_HOROVOD = False
mpi = pytest.mark.skipif(not HAVE_HOROVOD, reason="Horovod not installed")

QUICK_S = 30  # a bad input must end every rank within this many seconds
JOB_S = 180  # hard limit for a training job (a hang fails the test, it never stalls the suite)


def one_clean_error(r: subprocess.CompletedProcess, seconds: float, *needles: str) -> str:
    """The job failed on every rank quickly, with one error line naming `needles`, no traceback."""
    err = r.stderr
    assert r.returncode != 0, r.stdout + err
    assert seconds < QUICK_S, f"took {seconds:.1f} s\n{err}"
    assert err.count("hpc-dualbatch: error") == 1, err  # one message, not one per rank
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def timed(np_: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    r = hdb(np_, *args, timeout=JOB_S)
    return r, time.time() - t0


# --- bad input ----------------------------------------------------------------------------------


def edited_copy(tmp: Path, src: str, edit) -> str:
    """A copy of the session's staged file, changed by `edit(h5py.File)`."""
    dst = tmp / "edited.h5"
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return str(dst)


def truncated_copy(tmp: Path, src: str) -> str:
    dst = tmp / "truncated.h5"
    data = Path(src).read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # a copy cut off half way (full disk, killed rsync)
    return str(dst)


def out_of_range_label(f: h5py.File) -> None:
    labels = f["train/labels"][()]
    labels[7] = int(f.attrs["num_classes"])  # one past the last class
    f["train/labels"][...] = labels


def other_version(f: h5py.File) -> None:
    f.attrs.modify("format_version", 2)


def timing_without_16(tmp: Path) -> str:
    path = tmp / "timing.json"
    doc = {
        "format": "hpc_dualbatch.timing",
        "version": 1,
        "resolutions": {"12": {"a": 1e-4, "b": 1e-3}},
    }
    path.write_text(json.dumps(doc))
    return str(path)


# Each case: (config overrides, or a function (tmp, data) -> overrides), then the texts stderr must hold.
BAD_CONFIGS = {
    "wrong-type": ({"model__width": "eight"}, ["'model.width'", "must be an integer", "'eight'"]),
    "zero-batch": (
        {"plan__large_batch": {12: 0, 16: 64}},
        ["'plan.large_batch[12]'", "in (0, 65536], got 0"],
    ),
    "negative-batch": (
        {"plan__small_batch": {12: -32, 16: 32}},
        ["'plan.small_batch[12]'", "must be in (0, 65536], got -32"],
    ),
    "n_S-above-groups": ({"workers__small": 3}, ["'workers.small' (n_S) is 3", "valid: 0..2"]),
    "negative-seed": ({"seed": -1}, ["'seed'", "-1"]),
    "h5-truncated": (
        lambda tmp, data: {"data__path": truncated_copy(tmp, data)},
        ["truncated.h5", "prepare --force"],
    ),
    "h5-other-version": (
        lambda tmp, data: {"data__path": edited_copy(tmp, data, other_version)},
        ["edited.h5", "format_version 2", "reads format_version 1", "prepare --force"],
    ),
    "h5-label-out-of-range": (
        lambda tmp, data: {"data__path": edited_copy(tmp, data, out_of_range_label)},
        ["edited.h5", "'train/labels' holds label 10", "valid labels are 0..9"],
    ),
    "timing-missing-resolution": (
        lambda tmp, data: {
            "plan__small_batch": {},
            "plan__timing": timing_without_16(tmp),
            "plan__adaptive": False,  # round_robin (the tiny config's) needs the static plan
        },
        ["timing.json", "no fit for resolution 16 px (it has: 12)", "hpc-dualbatch profile"],
    ),
}


@pytest.mark.job
@mpi
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_input_fails_fast_with_one_message(tmp_path, synthetic_h5, case):
    over, needles = BAD_CONFIGS[case]
    if callable(over):
        over = over(tmp_path, synthetic_h5)
    cfg = write_config(tmp_path / "bad.yaml", tiny_config(synthetic_h5, tmp_path / "run", **over))
    if case == "h5-truncated":  # a real job for one case; the same checks in-process for all
        r, seconds = timed(3, "train", "--config", cfg)
        one_clean_error(r, seconds, *needles)
    else:
        err = start_up_error(["--config", cfg])
        assert all(n in err for n in needles), (needles, err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started


def fake_run_folder(out: Path, data: str, saved_config: dict) -> str:
    """A run folder with one checkpoint made with `saved_config` (no training needed)."""
    out.mkdir()
    write_config(out / "config.yaml", tiny_config(data, out))
    cfg = config_from_dict(saved_config)
    return C.save(
        str(out),
        C.Checkpoint(
            np.zeros(4, np.float32),
            C.Momenta.of([np.zeros(4, np.float32)] * 2, 4),
            2,
            [1, 1],
            1.0,
            0,
            cfg.to_dict(),
        ),
    )


def test_resume_with_another_config_is_refused(tmp_path, synthetic_h5):
    out = tmp_path / "run"
    path = fake_run_folder(out, synthetic_h5, tiny_config(synthetic_h5, out, model__width=16))
    err = start_up_error(["--resume", str(out)])
    for needle in (
        path,
        "another config",
        "model.width: checkpoint 16, now 8",
        "resume with the same config",
    ):
        assert needle in err, err


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path, synthetic_h5):
    out = tmp_path / "run"
    path = fake_run_folder(out, synthetic_h5, tiny_config(synthetic_h5, out))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # partially written (e.g. copied off a full disk)
    err = start_up_error(["--resume", str(out)])
    for needle in (path, "corrupt or partially written", "delete it to resume from the one before"):
        assert needle in err, err


def test_resume_needs_a_run_folder(tmp_path, synthetic_h5):
    """Start-up checks of `train` that need no MPI job (rank 0 runs them inside `agree`)."""
    from hpc_dualbatch.commands import train as T

    def args(resume: Path) -> argparse.Namespace:
        return argparse.Namespace(config=None, resume=str(resume), set=None)

    with pytest.raises(ConfigError, match=r"--resume .*empty: no config.yaml and no checkpoint there"):
        T._config(args(tmp_path / "empty"))
    # config.yaml deleted but checkpoints kept: every checkpoint holds its config (a requeue works)
    saved = tiny_config(synthetic_h5, tmp_path / "elsewhere", seed=7)
    fake_run_folder(tmp_path / "kept", synthetic_h5, saved)
    (tmp_path / "kept" / "config.yaml").unlink()
    cfg = T._config(args(tmp_path / "kept"))
    assert cfg.seed == 7 and cfg.out == str(tmp_path / "kept")
    # A run folder without a checkpoint is not refused: the run starts at commit 0 (issue 15,
    # tests/test_input_and_run_folders.py::test_resume_of_a_folder_without_any_checkpoint_starts_at_commit_0).


def test_group_with_more_ranks_than_its_batch_is_refused(synthetic_h5, tmp_path):
    from hpc_dualbatch.commands.train import group_specs
    from hpc_dualbatch.method.plan import plan_from_config

    raw = tiny_config(synthetic_h5, tmp_path, workers__groups=[1, 4], plan__small_batch={12: 2, 16: 2})
    cfg = config_from_dict(raw)
    with pytest.raises(ConfigError, match="group 1 has 4 ranks but its batch at 12px is 2.*fewer ranks"):
        group_specs(cfg, plan_from_config(cfg, 2000))


# --- faults during a run ------------------------------------------------------------------------


def commits_and_evals(out: Path) -> tuple[list[int], list[float]]:
    recs = read_metrics(str(out / "metrics.jsonl"))
    commits = [r["commit"] for r in recs if r["type"] == "commit"]
    return commits, [r["epoch"] for r in recs if r["type"] == "eval"]


def n_checkpoints(out: Path) -> int:
    return len(list((out / "checkpoints").glob("ckpt-*.npz"))) if (out / "checkpoints").exists() else 0


def n_commits(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count('"type":"commit"') if metrics.exists() else 0


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def resume_to_done(out: Path, epochs: int, groups: int = 2) -> None:
    """`--resume` finishes the run from its newest checkpoint; every commit is logged exactly once."""
    newest = C.latest(str(out))
    assert newest is not None, "no checkpoint to resume from"
    done_before = C.load(newest).commits
    r = hdb(3, "train", "--resume", str(out), timeout=JOB_S)
    assert r.returncode == 0, r.stdout + r.stderr
    total = epochs * groups
    st = status(out)
    assert st["state"] == "done" and st["commits"] == total, st
    commits, evals = commits_and_evals(out)
    assert commits == list(range(1, total + 1)), "a commit was lost or repeated across the resume"
    # every epoch evaluated once, in order, except an evaluation a left-out group never sent
    # (a gap record names it; the weights it was asked to evaluate no longer exist)
    lost = [
        float(re.search(r"epoch (\S+) lost", r["reason"]).group(1))
        for r in read_metrics(str(out / "metrics.jsonl"))
        if r["type"] == "gap" and "evaluation" in r["reason"]
    ]
    assert evals == [float(e) for e in range(1, epochs + 1) if e not in lost] and len(lost) <= 1
    # The resumed job started from the newest checkpoint, not from the beginning.
    first = re.search(r"commit (\d+)/", r.stdout)
    assert first and int(first.group(1)) == done_before + 1, r.stdout


def start_run(tmp: Path, data: str, epochs: int, **over) -> tuple[subprocess.Popen, Path]:
    out = tmp / "run"
    milestones = [epochs - 1]
    cfg = tiny_config(data, out, schedule__epochs=epochs, schedule__milestones=milestones, **over)
    return start(3, "train", "--config", write_config(tmp / "run.yaml", cfg)), out


def ends_within(job: subprocess.Popen, seconds: float) -> str:
    """The job's output once it has ended; kills it and fails the test if it is still running."""
    try:
        out, _ = job.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_job(job)
        out, _ = job.communicate()
        raise AssertionError(f"the job hung: still running {seconds:.0f} s after the fault\n{out}") from None
    return out


@pytest.mark.job
@mpi
@pytest.mark.parametrize("victim", [2, 0], ids=["worker", "server"])
def test_killed_rank_ends_the_job_and_the_run_resumes(tmp_path, synthetic_h5, victim):
    """SIGKILL of one rank (a worker group's leader, or the server) mid-run: no rank may wait for it."""
    epochs = 4
    job, out = start_run(tmp_path, synthetic_h5, epochs)
    try:
        ranks = rank_pids(job, 3)
        wait_for(lambda: n_checkpoints(out) >= 1 or job.poll() is not None, JOB_S, "a first checkpoint")
        assert job.poll() is None, "the run ended before the fault"
        os.kill(ranks[victim], signal.SIGKILL)
        t0 = time.time()
        log = ends_within(job, QUICK_S)
        assert job.returncode != 0, log
        assert time.time() - t0 < QUICK_S
    finally:
        if job.poll() is None:
            kill_job(job)
    wait_for(lambda: not any(alive(p) for p in ranks.values()), 10, "every rank to be gone")
    assert not (out / "status.json").exists(), "the run finished before it could be killed"
    if victim == 0:
        # What a crash inside `checkpoint.save` leaves behind: a temporary file. The resume ignores it.
        (out / "checkpoints" / "ckpt-000000009.npz.tmp4242").write_bytes(b"PK\x03\x04 half a checkpoint")
    resume_to_done(out, epochs)


@pytest.mark.job
@mpi
def test_sigterm_to_every_rank_checkpoints_and_resumes(tmp_path, synthetic_h5):
    """SIGTERM (not through mpirun: to each rank, as a node's shutdown does) stops the run cleanly."""
    epochs = 4
    job, out = start_run(tmp_path, synthetic_h5, epochs)
    try:
        ranks = rank_pids(job, 3)
        wait_for(lambda: n_commits(out) >= 2 or job.poll() is not None, JOB_S, "two commits")
        assert job.poll() is None, "the run ended before the signal"
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)
        log = ends_within(job, 60)
    finally:
        if job.poll() is None:
            kill_job(job)
    assert job.returncode == 0, log
    st = status(out)
    assert st["state"] == "preempted" and st["commits"] < 2 * epochs, st
    assert C.load(C.latest(str(out))).commits == st["commits"]  # the server checkpointed at the barrier
    resume_to_done(out, epochs)


@pytest.mark.job
@mpi
@pytest.mark.parametrize("fault", ["stall", "preempt"])
def test_a_stopped_rank_is_named_and_the_run_checkpoints_without_it_then_resumes(
    tmp_path, synthetic_h5, fault
):
    """SIGSTOP of a worker rank (group 1's only rank): nothing would ever hear from it again.
    stall: the server notices within the stall bound (server.stall_s, or 4x the longest silence);
    preempt: SIGTERM to every rank still ends with a checkpoint, within server.preempt_wait_s.
    Either way one message names the group and its rank, the checkpoint says it lacks the group,
    and the run resumes to the end with every commit once."""
    epochs = 6
    over = {"server__stall_s": 8.0} if fault == "stall" else {"server__preempt_wait_s": 6.0}
    job, out = start_run(tmp_path, synthetic_h5, epochs, **over)
    try:
        ranks = rank_pids(job, 3)
        wait_for(lambda: n_commits(out) >= 3 or job.poll() is not None, JOB_S, "three commits")
        assert job.poll() is None, "the run ended before the fault"
        os.kill(ranks[2], signal.SIGSTOP)
        t0 = time.time()
        if fault == "preempt":
            time.sleep(1.0)
            for pid in ranks.values():
                with contextlib.suppress(ProcessLookupError):  # group 0's ranks may have finished
                    os.kill(pid, signal.SIGTERM)  # every task handed out and exited
        log = ends_within(job, 60)
        took = time.time() - t0
    finally:
        if alive(ranks[2]):
            os.kill(ranks[2], signal.SIGCONT)
        if job.poll() is None:
            kill_job(job)
    assert job.returncode != 0, log
    assert log.count("hpc-dualbatch: error") == 1 and "Traceback" not in log, log
    assert "group 1 (rank 2, silent for" in log and "--resume" in log, log
    assert took < 30, f"ended {took:.0f} s after the fault"
    st = status(out)
    assert st["state"] == ("stalled" if fault == "stall" else "preempted"), st
    ck = C.load(C.latest(str(out)))
    # (under round robin the stopped group also held group 0 back, which may then miss the cutoff)
    assert 1 in ck.extra["missing_groups"] and ck.commits == st["commits"] < 2 * epochs
    wait_for(lambda: not any(alive(p) for p in ranks.values()), 10, "every rank to be gone")
    resume_to_done(out, epochs)


@pytest.mark.job
@mpi
def test_second_run_in_the_same_folder_is_refused_while_the_first_completes(tmp_path, synthetic_h5):
    # long enough that the first run is still going when it is stopped (4 epochs of this tiny
    # config once ended between taking the lock and the SIGSTOP)
    epochs = 12
    job, out = start_run(tmp_path, synthetic_h5, epochs)
    ranks: dict[int, int] = {}
    try:
        ranks = rank_pids(job, 3)
        # command.txt is written after rank 0 took the folder's lock.
        wait_for(lambda: (out / "command.txt").exists() or job.poll() is not None, JOB_S, "the lock")
        for pid in ranks.values():  # hold the first run where it is (lock taken) while the second starts
            os.kill(pid, signal.SIGSTOP)
        r, seconds = timed(3, "train", "--config", str(tmp_path / "run.yaml"))
        one_clean_error(r, seconds, str(out), "is in use by another run", ".lock")
        for pid in ranks.values():
            os.kill(pid, signal.SIGCONT)
        log = ends_within(job, JOB_S)
    finally:
        if job.poll() is None:
            kill_job(job)  # SIGKILL ends stopped processes too
    assert job.returncode == 0, log
    assert status(out)["state"] == "done"
    commits, evals = commits_and_evals(out)
    assert commits == list(range(1, 2 * epochs + 1)) and evals == [float(e) for e in range(1, epochs + 1)]
    assert len((out / "command.txt").read_text().splitlines()) == 1  # the refused run wrote nothing


# --- loading files safely -----------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a folder: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("where", ["weights", "meta"])
def test_checkpoint_holding_a_pickle_is_refused_without_running_it(tmp_path, where):
    marker = tmp_path / "code-ran"
    arrays = {
        "weights": np.zeros(3, np.float32),
        "momentum": np.zeros((1, 3), np.float32),
        "meta": np.array(json.dumps({"format": C.FORMAT})),
    }
    arrays[where] = np.array([_Payload(str(marker))], dtype=object)
    path = tmp_path / "checkpoints" / "ckpt-000000001.npz"
    path.parent.mkdir()
    np.savez(path, **arrays)  # np.savez pickles object arrays
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is corrupt.*Object arrays cannot"):
        C.load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("meta", [{"format": C.FORMAT}, [1]], ids=["fields-missing", "not-an-object"])
def test_checkpoint_with_crafted_metadata_is_refused_with_a_message(tmp_path, meta):
    path = tmp_path / "ckpt-000000001.npz"
    np.savez(
        path,
        weights=np.zeros(3, np.float32),
        momentum=np.zeros((1, 3), np.float32),  # (format 1's layout)
        meta=np.array(json.dumps(meta)),
    )
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        C.load(str(path))


def test_leftover_temporary_checkpoint_is_never_picked(tmp_path):
    ck = C.Checkpoint(
        np.zeros(3, np.float32), C.Momenta.of([np.zeros(3, np.float32)] * 1, 3), 4, [4], 0.0, 0, {}
    )
    good = C.save(str(tmp_path), ck)
    (tmp_path / "checkpoints" / "ckpt-000000005.npz.tmp99").write_bytes(b"half")
    assert C.latest(str(tmp_path)) == good


def test_timing_and_plan_files_are_plain_json(tmp_path):
    from hpc_dualbatch.method.plan import plan_dual_batch
    from hpc_dualbatch.method.plan_record import load_plan, save_plan
    from hpc_dualbatch.method.timing import TimeFit, load_timing, save_timing

    timing, plan_path = tmp_path / "timing.json", tmp_path / "plan.json"
    save_timing(str(timing), {12: TimeFit(1e-4, 1e-3, 1.0)}, {"device": "test"})
    save_plan(plan_dual_batch({}, {12: 64}, 2, 0, 1.0, 1000), str(plan_path))
    for path in (timing, plan_path):
        json.loads(path.read_text())  # plain JSON, readable and editable by hand
    marker = tmp_path / "code-ran"
    timing.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(PlanError, match="timing.json' is not readable JSON"):
        load_timing(str(timing), [12])
    plan_path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=0))  # a text pickle (binary: below)
    with pytest.raises(PlanError, match="plan.json' is not readable JSON"):
        load_plan(str(plan_path))
    assert not marker.exists()


def test_binary_plan_file_is_refused_with_a_message(tmp_path):
    from hpc_dualbatch.method.plan_record import load_plan

    path = tmp_path / "plan.json"
    path.write_bytes(pickle.dumps(_Payload(str(tmp_path / "code-ran"))))
    with pytest.raises(PlanError, match="plan.json' is not readable JSON"):
        load_plan(str(path))


UNSAFE_CALLS = [
    (r"shell\s*=\s*True", "a shell"),
    (r"\bos\.(system|popen|exec\w*|spawn\w*)\(", "a shell or exec"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
    (r"\byaml\.(load|unsafe_load|full_load)\(", "a YAML loader that builds objects"),
    (r"\btorch\.load\(|\bpickle\.loads?\(|allow_pickle\s*=\s*True", "an unrestricted unpickler"),
]


def test_package_never_hands_paths_to_a_shell_or_an_unpickler():
    """A static check over the package: no shell, no eval, no object-building loader.

    Config values (paths included) reach the OS only as arguments of open/h5py/np.load;
    the one subprocess call (`bench/_harness.py`) takes an argument list.
    """
    found = []
    for path in sorted((ROOT / "hpc_dualbatch").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in UNSAFE_CALLS:
                if re.search(pattern, code):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
