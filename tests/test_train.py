"""The trainer end to end: real `mpirun` jobs on tiny synthetic data, each under a hard timeout.

What these jobs add to the in-process tests of the loops (tests/mpi/test_loops.py): the real
trainer learns under Horovod, is deterministic and resumes exactly after a SIGKILL, signals
reach every rank, the profiler runs as a job, and a few bad starts end every rank."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_dualbatch.runtime.metrics import evaluations, read_metrics
from hpc_dualbatch.runtime.model import build_model
from tests.helpers import (
    final_weights,
    hdb,
    kill_job,
    rank_pids,
    read_events,
    start,
    start_up_error,
    tiny_config,
    write_config,
)

pytest.importorskip("horovod.torch", reason="Horovod not installed")  # skips this module without it


def train(tmp: Path, data: str, np_: int = 3, name: str = "run", **over):
    out = tmp / name
    cfg = write_config(tmp / f"{name}.yaml", tiny_config(data, out, **over))
    return hdb(np_, "train", "--config", cfg), out


def commits_and_evals(out: Path) -> tuple[list[int], list[float]]:
    recs = read_metrics(str(out / "metrics.jsonl"))
    return [r["commit"] for r in recs if r["type"] == "commit"], [
        r["epoch"] for r in recs if r["type"] == "eval"
    ]


def kill_after_first_checkpoint(cfg: str, out: Path, np_: int = 3) -> None:
    """Start a run and SIGKILL the whole job as soon as its first checkpoint exists."""
    job = start(np_, "train", "--config", cfg)
    ckdir = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckdir.exists() and any(ckdir.glob("ckpt-*.npz"))):
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)


@pytest.mark.job
def test_hybrid_run_with_a_two_rank_group_learns(tmp_path, synthetic_h5):
    """1 server + a 2-rank Horovod group (large batch) + a 1-rank group (small batch), arrival order."""
    r, out = train(tmp_path, synthetic_h5, 4, workers__groups=[2, 1], server__order="arrival")
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["commits"] == 8
    assert status["final_test_acc"] > 0.5  # 10 classes: chance is 0.1
    commits, evals = commits_and_evals(out)
    assert commits == list(range(1, 9))
    assert sorted(evals) == [1.0, 2.0, 3.0, 4.0]  # (two groups' evaluations may end out of order)
    recs = read_metrics(str(out / "metrics.jsonl"))
    last = evaluations(recs)[-1]
    assert status["final_test_acc"] == last["test_acc"] and last["epoch"] == 4
    small = {r["batch"] for r in recs if r["type"] == "commit" and r["small"]}
    large = {r["batch"] for r in recs if r["type"] == "commit" and not r["small"]}
    assert small == {32} and large == {64}
    end = recs[-1]
    # The server sleeps while it waits: its CPU time is a small part of its wall time.
    assert end["server_cpu_seconds"] < 0.25 * end["server_serve_seconds"], end


@pytest.mark.job
def test_round_robin_runs_are_bit_identical_and_resume_exactly(tmp_path, synthetic_h5):
    """The killed run's part before its checkpoint ran in another process than run a's, so equal
    final weights show both that round-robin runs repeat bit for bit and that a resume is exact."""
    r1, out1 = train(tmp_path, synthetic_h5, name="a")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    w1 = final_weights(out1)

    # Kill (SIGKILL, the whole job) as soon as a checkpoint exists, then resume.
    cfg = write_config(tmp_path / "c.yaml", tiny_config(synthetic_h5, tmp_path / "c"))
    kill_after_first_checkpoint(cfg, tmp_path / "c")
    assert not (tmp_path / "c" / "status.json").exists(), "the run finished before it could be killed"
    r3 = hdb(3, "train", "--resume", str(tmp_path / "c"))
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert np.array_equal(w1, final_weights(tmp_path / "c"))
    commits, evals = commits_and_evals(tmp_path / "c")
    assert commits == list(range(1, 9)), "a commit was lost or repeated across the resume"
    assert evals == [float(e) for e in range(1, 5)]
    # The TensorBoard event file (metrics.tensorboard: auto) holds the metrics file's records,
    # across the kill and resume each step once: test at the commit count of each epoch.
    ev, recs = read_events(tmp_path / "c" / "tb"), read_metrics(str(tmp_path / "c" / "metrics.jsonl"))
    assert sorted(ev) == sorted(read_events(out1 / "tb"))
    assert [s for s, _, _ in ev["test/acc"]] == [2, 4, 6, 8]
    assert [round(v, 5) for _, v, _ in ev["test/acc"]] == [
        round(r["test_acc"], 5) for r in recs if r["type"] == "eval"
    ]
    for g in (0, 1):
        pushes = [r for r in recs if r.get("group") == g and r["type"] in ("commit", "merge")]
        assert [s for s, _, _ in ev[f"train/loss/group{g}"]] == [r["commit"] for r in pushes if "commit" in r]
        assert [s for s, _, _ in ev[f"server/staleness/group{g}"]] == [r["merge"] for r in pushes]
    assert {"B_S/trained/group1/12px", "B_S/trained/group1/16px"} <= set(ev)


@pytest.mark.job
def test_the_methods_server_learns(tmp_path, synthetic_h5):
    """The paper-faithful server (merge: paper, bn: average, one push per task) with the real
    trainer. Every server mode's merge rule, and a signalled run's bit-identical resume, are
    checked through the real loops in tests/mpi/test_loops.py."""
    over = dict(server__merge="paper", server__bn="average", server__push_every=0)
    r, out = train(tmp_path, synthetic_h5, **over)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((out / "status.json").read_text())["final_test_acc"] > 0.5  # chance: 0.1
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert not [r for r in recs if r["type"] == "merge"]  # one push per task: commits only
    assert all(e["bn"] == "average" for e in recs if e["type"] == "eval")


@pytest.mark.job
def test_profile_as_an_mpi_job_fits_each_role(tmp_path, synthetic_h5):
    """`profile` under mpirun: train's ranks (server + a large and a small group), real staged
    batches through the worker's loop; a fit per resolution for each role."""
    from hpc_dualbatch.method.timing import load_timing, load_timing_meta

    cfg = write_config(tmp_path / "p.yaml", tiny_config(synthetic_h5, tmp_path / "p"))
    out = tmp_path / "timing.json"
    args = ["profile", "--config", cfg, "--batches", "8,16,32", "--repeats", "2", "--steps", "2"]
    r = hdb(3, *args, "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    large, small = load_timing(str(out), [12, 16]), load_timing(str(out), [12, 16], role="small")
    for fits in (large, small):
        assert sorted(fits) == [12, 16]
        for f in fits.values():  # one point per batch size of the role's one group
            assert [x for x, _ in f.points] == [8, 16, 32] and all(t > 0 for _, t in f.points)
    meta = load_timing_meta(str(out))
    assert meta["mode"].startswith("mpi job") and meta["points"]["1"]["16"]
    # a world that does not fit the config ends every rank with one message
    r = hdb(2, *args, "--out", str(tmp_path / "t2.json"), timeout=60)
    assert r.returncode != 0 and "ranks" in (r.stdout + r.stderr)


@pytest.mark.job
def test_sigterm_to_a_non_leader_rank_checkpoints_and_stops_the_run(tmp_path, synthetic_h5):
    """Only a group's leader talks to the server; a signal that reaches another rank of the
    group (a node-local kill, an out-of-memory watchdog) must still stop the run cleanly."""
    cfg = write_config(
        tmp_path / "t.yaml",
        tiny_config(
            synthetic_h5,
            tmp_path / "t",
            schedule__epochs=8,  # (still running when the first commit is seen: see the crash test)
            checkpoint__every_epochs=0,
            workers__groups=[2, 1],
        ),
    )
    job = start(4, "train", "--config", cfg)
    try:
        pids = rank_pids(job, 4)
        metrics = tmp_path / "t" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and '"commit"' in metrics.read_text()):
            time.sleep(0.05)
        os.kill(pids[2], signal.SIGTERM)  # world rank 2: the second rank of group 0, not its leader
        out, _ = job.communicate(timeout=120)
    except BaseException:
        kill_job(job)
        raise
    assert job.returncode == 0, out
    status = json.loads((tmp_path / "t" / "status.json").read_text())
    assert status["state"] == "preempted" and status["commits"] < 16, status
    r = hdb(4, "train", "--resume", str(tmp_path / "t"))
    assert r.returncode == 0, r.stdout + r.stderr
    commits, _ = commits_and_evals(tmp_path / "t")
    assert commits == list(range(1, 17))


@pytest.mark.job
def test_sync_baseline_learns_with_the_same_metrics(tmp_path, synthetic_h5):
    r, out = train(
        tmp_path,
        synthetic_h5,
        2,
        mode="sync",
        workers__groups=[2],
        workers__small=0,
        plan__k=1.0,
        plan__small_batch={},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["final_test_acc"] > 0.5
    commits, evals = commits_and_evals(out)
    assert commits == [1, 2, 3, 4] and evals == [1.0, 2.0, 3.0, 4.0]
    ev = read_events(out / "tb")  # one commit per epoch; no server, so no staleness or B_S
    assert sorted(ev) == [
        "test/acc",
        "test/loss",
        "train/acc/group0",
        "train/images_per_s/group0",
        "train/loss/group0",
    ]
    assert [s for s, _, _ in ev["test/acc"]] == [s for s, _, _ in ev["train/loss/group0"]] == [1, 2, 3, 4]


@pytest.mark.job
def test_sync_recalibrated_bn_and_tail_average_change_the_evaluations_not_the_training(
    tmp_path, synthetic_h5
):
    """sync.bn: recalibrate recomputes the statistics before each evaluation (as the server does)
    and records it; schedule.average: last_stage evaluates and saves the mean of the last stage's
    iterates (lr 0.01 in epochs 3-4). Training reads neither, so the same seed trains the same
    weights: the same train losses, the same evaluations before the last stage. A resume from the
    checkpoint inside the stage (epoch 3's) ends with the same model, bit for bit (every rank
    takes the checkpoint's momentum: before, ranks other than 0 restarted from zero and the
    replicas drifted apart)."""
    import shutil

    from hpc_dualbatch.runtime import checkpoint as C

    runs = {}
    for name, extra in (
        ("running", {"bn": "running"}),
        ("recalibrate", {"bn": "recalibrate"}),
        ("average", {"bn": "recalibrate", "average": "last_stage"}),
    ):
        out = tmp_path / name
        raw = tiny_config(
            synthetic_h5, out, mode="sync", workers__groups=[2], workers__small=0, plan__k=1.0,
            schedule__milestones=[2],
        )  # fmt: skip
        raw["sync"] = {"bn": extra["bn"]}
        raw["schedule"]["average"] = extra.get("average", "none")
        r = hdb(2, "train", "--config", write_config(tmp_path / f"{name}.yaml", raw))
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = (read_metrics(str(out / "metrics.jsonl")), final_weights(out))
    (recs_run, w_run), (recs_cal, w_cal), (recs_avg, w_avg) = runs.values()
    loss = [
        [r["train_loss"] for r in recs if r["type"] == "commit"] for recs in (recs_run, recs_cal, recs_avg)
    ]
    assert len(loss[0]) == 4 and loss[0] == loss[1] == loss[2]
    ev_run, ev_cal, ev_avg = evaluations(recs_run), evaluations(recs_cal), evaluations(recs_avg)
    assert [e["bn"] for e in ev_run] == ["running"] * 4 and all("bn_seconds" not in e for e in ev_run)
    assert [e["bn"] for e in ev_cal] == ["recalibrate"] * 4 and all(e["bn_seconds"] > 0 for e in ev_cal)
    model = build_model("resnet18_cifar", 10, 3, 8)  # the synthetic set: 10 classes, RGB
    n_params = sum(p.numel() for p in model.parameters())
    assert np.array_equal(w_run[:n_params], w_cal[:n_params])  # the same weights ...
    assert not np.array_equal(w_run[n_params:], w_cal[n_params:])  # ... other statistics
    steps = [e["averaged"] for e in ev_avg]
    assert steps[:2] == [0, 0] and 1 < steps[2] and steps[3] == 2 * steps[2]  # every step of 2 epochs
    assert [e["test_loss"] for e in ev_avg][:2] == [e["test_loss"] for e in ev_cal][:2]
    assert all(a["test_loss"] != c["test_loss"] for a, c in zip(ev_avg[2:], ev_cal[2:]))  # the mean
    assert not np.array_equal(w_avg[:n_params], w_cal[:n_params])  # and the model saved

    again = tmp_path / "again"  # the finished run's folder without its final checkpoint
    shutil.copytree(tmp_path / "average", again)
    Path(C.latest(str(again))).unlink()
    assert C.load(C.latest(str(again))).extra["average_count"] == steps[2]  # epoch 3's
    r = hdb(2, "train", "--resume", str(again))
    assert r.returncode == 0, r.stdout + r.stderr
    assert final_weights(again).tobytes() == w_avg.tobytes()


@pytest.mark.job
def test_server_tail_average_changes_the_evaluations_not_the_training_and_resumes_exactly(
    tmp_path, synthetic_h5
):
    """schedule.average: last_stage on the round-robin server (lr 0.01 from epoch 3 of 4): the
    same commits as without (training never reads the mean), the evaluations made on the mean
    (their records say of how many merges), and a resume from the checkpoint inside that stage
    (epoch 3's) ends with the same model, bit for bit."""
    import shutil

    from hpc_dualbatch.runtime import checkpoint as C

    over = {"schedule__milestones": [2]}
    r, plain = train(tmp_path, synthetic_h5, name="plain", **over)
    assert r.returncode == 0, r.stdout + r.stderr
    r, avg = train(tmp_path, synthetic_h5, name="avg", schedule__average="last_stage", **over)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [read_metrics(str(out / "metrics.jsonl")) for out in (plain, avg)]
    loss = [[r["train_loss"] for r in rs if r["type"] == "commit"] for rs in recs]
    assert len(loss[0]) == 8 and loss[0] == loss[1]
    ev_plain, ev_avg = (evaluations(rs) for rs in recs)
    # (epoch 2's evaluation already holds merges of task 4, at the new rate: under round_robin
    # group 0 trains it while group 1 finishes epoch 2)
    assert ev_avg[0]["averaged"] == 0 and all(e["averaged"] > 0 for e in ev_avg[1:])
    assert ev_avg[0]["test_loss"] == ev_plain[0]["test_loss"]
    assert all(a["test_loss"] != p["test_loss"] for a, p in zip(ev_avg[1:], ev_plain[1:]))
    ck = C.load(C.latest(str(avg)))
    assert ck.commits == 8 and ck.extra["average_count"] == ev_avg[3]["averaged"]
    assert np.array_equal(ck.weights[: ck.average.size], ck.average)  # the model saved: the mean

    again = tmp_path / "again"  # the finished run's folder without its final checkpoint
    shutil.copytree(avg, again)
    Path(C.latest(str(again))).unlink()
    assert C.load(C.latest(str(again))).extra["average_count"] > 0  # epoch 3's: inside the stage
    r = hdb(3, "train", "--resume", str(again))
    assert r.returncode == 0, r.stdout + r.stderr
    assert final_weights(again).tobytes() == final_weights(avg).tobytes()


@pytest.mark.job
@pytest.mark.parametrize(
    "over, np_, needle",
    [
        ({"bogus_key": 1}, 3, "unknown config key 'bogus_key'"),
        ({}, 4, "world size is 4 but the config needs 3"),
        ({"data__path": "/nonexistent/x.h5"}, 3, "/nonexistent/x.h5"),
        (
            {
                "schedule__resolutions": [12, 20],
                "plan__large_batch": {12: 64, 20: 64},
                "plan__small_batch": {12: 32, 20: 32},
            },
            3,
            "resolution 20 px is not staged in",
        ),
        ({"plan__small_batch": {12: 128, 16: 32}}, 3, "B_S"),
        ({"plan__k": 0.9}, 3, "plan.k"),
    ],
    ids=["unknown-key", "world-size", "missing-data", "resolution-not-staged", "bs-above-bl", "k-below-1"],
)
def test_bad_input_ends_every_rank_quickly_with_one_message(tmp_path, synthetic_h5, over, np_, needle):
    if np_ == 4 or "bogus_key" in over:  # a real job for two cases; the same checks in-process for all
        t0 = time.time()
        r, _ = train(tmp_path, synthetic_h5, np_, **over)
        assert r.returncode != 0
        assert time.time() - t0 < 30
        err = r.stderr
        assert err.count("hpc-dualbatch: error") == 1, err  # one message, not one per rank
        assert "Traceback" not in err, err
    else:
        cfg = write_config(tmp_path / "run.yaml", tiny_config(synthetic_h5, tmp_path / "run", **over))
        err = start_up_error(["--config", cfg], np_)
    assert needle in err, err


def test_existing_run_folder_is_refused_and_resume_checks_the_config(tmp_path, synthetic_h5):
    """Start-up checks on rank 0 (the run folder), in-process: a job's ending on them is
    tests/test_input_and_run_folders.py's [out-is-a-file] job."""
    from tests.test_reliability import fake_run_folder

    out = tmp_path / "x"
    fake_run_folder(out, synthetic_h5, tiny_config(synthetic_h5, out))
    (out / "metrics.jsonl").write_text('{"type": "commit", "commit": 1}\n')
    cfg = write_config(tmp_path / "x.yaml", tiny_config(synthetic_h5, out))
    assert "already holds a run" in start_up_error(["--config", cfg])
    err = start_up_error(["--resume", str(out), "--set", "optim.momentum=0.5"])
    assert "another config" in err and "optim.momentum" in err


def test_threads_are_never_more_than_the_cores_this_process_may_use():
    """threads=1000 on a 2-core machine made no progress in 150 s: it is bounded by the cores."""
    import os
    from types import SimpleNamespace

    from hpc_dualbatch.runtime.topology import threads_per_rank

    cores = len(os.sched_getaffinity(0))
    one_rank, two_ranks = SimpleNamespace(local_size=1), SimpleNamespace(local_size=2)
    assert threads_per_rank(one_rank, 1000) == cores
    assert threads_per_rank(one_rank, 1) == 1
    assert threads_per_rank(two_ranks, 0) == max(1, cores // 2)  # 0: the node's cores shared
