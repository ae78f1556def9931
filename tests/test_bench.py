"""The bench harness (exact command, atomic JSON, pairing, launcher, options) and smoke runs of
the suites at toy sizes.

No timing is asserted (timings on a shared machine are not test material); every launch runs
under a hard timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.bench.all import row as summary_row
from hpc_dualbatch.bench.all import summary_table
from hpc_dualbatch.errors import ConfigError
from tests.helpers import ROOT, hdb

needs_horovod = pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None, reason="Horovod not installed"
)


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m hpc_dualbatch bench ARGS` in one process (suites that launch their own MPI jobs)."""
    cmd = [sys.executable, "-m", "hpc_dualbatch", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert "hpc_dualbatch bench " in result["command"]  # the exact command is recorded
    assert result["machine"]["cpus"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert "params" in result
    return result


def test_result_records_the_exact_command(tmp_path, monkeypatch):
    args = H.parser("x", "doc", n=(3, "a count")).parse_args(["--n", "4"])
    out = tmp_path / "x.json"
    typed = ["/venv/bin/python", "-m", "hpc_dualbatch", "bench", "x", "--n", "4", "--out", "a b.json"]
    monkeypatch.setattr(sys, "argv", ["/pkg/__main__.py", *typed[3:]])
    monkeypatch.setattr(sys, "orig_argv", typed, raising=False)
    monkeypatch.delenv(H.LAUNCHER_ENV, raising=False)
    H.write_result(str(out), "x", args, typed[5:], extra=1)
    res = json.loads(out.read_text())
    assert res["command"] == shlex.join(typed)  # quoted so that it runs as it ran
    assert res["bench"] == "x" and res["params"]["n"] == 4 and res["extra"] == 1
    assert res["machine"]["cpus"] >= 1
    monkeypatch.setenv(H.LAUNCHER_ENV, "mpirun -np 2")  # what `launch` tells the ranks it started
    H.write_result(str(out), "x", args, typed[5:])
    assert json.loads(out.read_text())["command"] == "mpirun -np 2 " + shlex.join(typed)
    # main(argv) called in-process (argv is not this process's): the equivalent command
    H.write_result(str(out), "x", args, ["--n", "5"])
    assert json.loads(out.read_text())["command"] == "python -m hpc_dualbatch bench x --n 5"


def test_result_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "x.json"
    out.write_text('{"old": true}')
    args = H.parser("x", "doc").parse_args([])
    with pytest.raises(TypeError):
        H.write_result(str(out), "x", args, [], bad=object())  # fails half-way through the JSON
    assert json.loads(out.read_text()) == {"old": True} and os.listdir(tmp_path) == ["x.json"]


def test_median_ratio_of_pairs():
    assert H.median_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 2.0]) == 2.0  # ratios 2, 1.5, 5
    assert H.median_ratio([1.0, 3.0], [1.0, 1.0]) == 2.0


@pytest.mark.job
def test_options_quick_sizes_and_positive_counts():
    p = H.parser(
        "x", "doc", n=(3, "count"), rate=(0.5, "s"), tag=("a", "t"), flag=(False, "f"), set=([], "kv")
    )
    args = H.start(p, ["--set", "a=1", "--set", "b=2"], "n", n=7)
    assert (args.n, args.rate, args.tag, args.flag, args.set, args.quick) == (
        3,
        0.5,
        "a",
        False,
        ["a=1", "b=2"],
        False,
    )
    assert args.out == os.path.join("results", "bench", "x.json")
    assert H.start(p, ["--quick"], "n", n=7).n == 7
    with pytest.raises(ConfigError, match=r"--n 0: must be >= 1"):
        H.start(p, ["--n", "0"], "n")


def test_launcher_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HDB_MPIRUN", "srun --mpi=pmix")
    assert H.launcher() == ["srun", "--mpi=pmix"]
    cmd, env = H.command_for(["bench", "exchange"], 2)
    assert cmd[:4] == ["srun", "--mpi=pmix", "-np", "2"] and env == {H.LAUNCHER_ENV: "srun --mpi=pmix -np 2"}
    monkeypatch.delenv("HDB_MPIRUN")
    monkeypatch.chdir(ROOT)
    assert H.launcher() == [str(ROOT / "scripts" / "mpirun_local.sh")]
    monkeypatch.chdir(tmp_path)  # not a checkout, and no mpirun on PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"no MPI launcher: set HDB_MPIRUN.*mpirun.*scripts/mpirun_local.sh"
    ):
        H.launcher()
    assert H.command_for(["info"])[0] == [sys.executable, "-m", "hpc_dualbatch", "info"]  # no MPI needed


def test_table_and_summary_rows():
    assert H.table("<name|v:.2f", [["a", 1.0], ["bcd", None]]).splitlines() == [
        "name    v",
        "a    1.00",
        "bcd     -",
    ]
    assert [summary_row("m", v, g)["met"] for v, g in ((0.9, ">= 0.8"), (1.2, "<= 1.10"), (1.0, "-"))] == [
        True,
        False,
        None,
    ]
    entry = {
        "suite": "plan",
        "status": "ok",
        "seconds": 7.0,
        "load": [1.0, 2.0],
        "rows": [summary_row("worst", 0.01, "<= 0.05")],
    }
    failed = {
        "suite": "loader",
        "status": "failed",
        "error": "boom\nlast line",
        "seconds": 1.0,
        "load": [2.0, 2.0],
    }
    lines = summary_table([entry, failed]).splitlines()
    assert lines[1].split() == ["plan", "worst", "0.010", "<=", "0.05", "met", "7", "1.0->2.0"]
    assert "FAILED" in lines[2] and lines[-1] == "loader: last line"


@pytest.mark.job
def test_exchange_two_ranks(tmp_path):
    out = tmp_path / "exchange.json"
    argv = ["--floats", "50000", "--iters", "2", "--repeats", "2", "--out", str(out)]
    r = hdb(2, "bench", "exchange", *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    res = load(out)
    assert res["command"].endswith(shlex.join(["-m", "hpc_dualbatch", "bench", "exchange", *argv]))
    assert res["machine"]["mpi_ranks"] == 2
    assert [row["variant"] for row in res["rows"]] == ["raw", "wire", "delta", "paper", "nomerge"]
    for row in res["rows"]:
        assert row["mb_per_s"] > 0 and len(row["seconds_per_trip_all"]) == 2
    assert all(res[f"ratio_{v}"] > 0 for v in ("delta", "paper", "nomerge", "wire"))
    assert res["merge_ms_delta"] >= 0 and res["merge_ms_paper"] >= 0
    assert "delta / raw" in r.stdout


@pytest.mark.job
def test_exchange_refuses_a_single_rank(tmp_path):
    r = bench("exchange", "--floats", "10", "--out", str(tmp_path / "x.json"), timeout=120)
    assert r.returncode != 0 and "needs exactly 2 MPI ranks" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.job
@needs_horovod
def test_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    # the variant job: ps with one key changed (here the run's length, which its records show)
    r = bench("overhead", "--quick", "--out", str(out), "--variant", "schedule.epochs=1", timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    res = load(out)
    assert len(res["ps_runs"]) == len(res["overlap_runs"]) == len(res["limit_runs"]) == 1
    (va,) = res["variant_runs"]
    assert (va["samples"], va["commits"]) == (512, 2) and res["variant"] == ["schedule.epochs=1"]
    assert res["jobs"]["variant"] == "(ps) --set schedule.epochs=1" and 0 < res["duty_cycle_variant"] <= 1.01
    ps, ov, limit = res["ps_runs"][0], res["overlap_runs"][0], res["limit_runs"][0]
    assert ps["samples"] == ov["samples"] == limit["samples"] == 2 * 512  # the same work: epochs x d
    assert ps["commits"] == ov["commits"] == 2 * 2
    assert res["ratio"] > 0 and res["ratio_overlap"] > 0 and 0 <= res["server_cpu_per_wall"] < 1
    for key in ("duty_cycle", "duty_cycle_overlap"):  # training share of the workers' time
        assert 0 < res[key] <= 1.01, key  # (clock rounding: <= 1.01)
    for key in ("tail", "tail_limit", "final_eval"):  # shares of the run at its end
        assert 0 <= res[key] < 1, key


def test_overhead_run_end_shares():
    """Group 0 idles from its last commit (5 s) to group 1's (6 s), then the final evaluation
    takes to 7 s; the server served 8 s: idle 1 s of 2 x 8 group-seconds, evaluation 1 s of 8."""
    from hpc_dualbatch.bench.overhead import run_end

    recs = [
        {"type": "commit", "group": 0, "wall": 2.0},
        {"type": "commit", "group": 1, "wall": 3.0},
        {"type": "eval", "group": 1, "wall": 3.5},
        {"type": "commit", "group": 0, "wall": 5.0},
        {"type": "commit", "group": 1, "wall": 6.0},
        {"type": "eval", "group": 1, "wall": 7.0},
        {"type": "end", "wall": 7.1},
    ]
    assert run_end(recs, 8.0) == {"tail": 1 / 16, "final_eval": 1 / 8}


@pytest.mark.job
@needs_horovod
def test_allreduce_quick(tmp_path):
    out = tmp_path / "allreduce.json"
    r = bench("allreduce", "--quick", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = load(out)
    assert [run["ranks"] for run in res["runs"]["horovod"]] == [2]
    assert [run["ranks"] for run in res["runs"]["single"]] == [1]
    assert (
        res["runs"]["horovod"][0]["threads_per_rank"] == 1
        and res["runs"]["single"][0]["threads_per_rank"] == 2
    )
    assert res["ratio"] > 0


@pytest.mark.job
def test_all_runs_suites_and_summarises(tmp_path):
    r = bench("all", "--quick", "--only", "resolution,exchange", "--out-dir", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = load(tmp_path / "all.json")
    assert summary["command"].endswith(f"bench all --quick --only resolution,exchange --out-dir {tmp_path}")
    assert [s["suite"] for s in summary["suites"]] == ["resolution", "exchange"]
    for s in summary["suites"]:
        assert s["status"] == "ok" and s["rows"] and Path(s["json"]).exists()
        assert all({"metric", "value", "goal", "met"} <= set(row) for row in s["rows"])
        assert load(Path(s["json"]))["command"] == s["command"]  # the suite's JSON: the command all ran
    assert summary["suites"][1]["command"].startswith(str(ROOT / "scripts" / "mpirun_local.sh") + " -np 2 ")
    res = load(tmp_path / "resolution.json")
    assert [row["resolution"] for row in res["rows"]] == [12, 16]
    top = res["rows"][-1]
    assert top["time_ratio"] == 1.0 and top["pixel_ratio"] == 1.0
    assert res["rows"][0]["pixel_ratio"] == pytest.approx(144 / 256)
    worst = res["worst_excess"]
    assert worst == max(row["excess"] for row in res["rows"])
    assert f"epoch-time ratio / pixel ratio, worst res {worst:.3f}" in " ".join(r.stdout.split())
    assert "PS push+pull / raw Send+Recv throughput" in r.stdout


@pytest.mark.job
def test_all_rejects_an_unknown_suite(tmp_path):
    r = bench("all", "--only", "nonesuch", "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode != 0 and "unknown suite" in r.stderr


def test_promise_summary_of_a_job() -> None:
    """bench promise's numbers of one job, from hand-made records: 2 groups (0 large, 1 small),
    4 epochs of d = 1000 samples."""
    from hpc_dualbatch.bench.promise import (
        epoch_rates,
        epoch_seconds,
        job_summary,
        rate_epoch_seconds,
        spread,
    )

    def commit(i: int, wall: float, small: bool, seconds: float, batch: int, predicted=None) -> dict:
        rec = {"type": "commit", "commit": i, "wall": wall, "small": small, "seconds": seconds,
               "group": int(small), "samples": 450 if small else 550, "batch": batch,
               "resolution": 28}  # fmt: skip
        return rec if predicted is None else {**rec, "predicted": predicted}

    recs = [
        commit(1, 5.0, False, 4.0, 64), commit(2, 6.0, True, 5.0, 20),  # epoch 1: not timed
        commit(3, 10.0, True, 4.0, 24, 4.4), commit(4, 11.0, False, 4.0, 64, 4.0),
        {"type": "plan"},
        commit(5, 14.0, True, 4.2, 25, 4.2), commit(6, 15.5, False, 4.4, 64, 4.4),
        commit(7, 20.0, True, 4.0, 25, 4.0), commit(8, 23.5, False, 4.4, 64, 4.4),
    ]  # fmt: skip
    assert epoch_seconds([r for r in recs if r["type"] == "commit"], 2) == [5.0, 4.5, 8.0]
    plan = {"n_small": 1, "d_S": 450, "resolutions": {"28": {"t_small": 4.0, "t_large": 4.0}}}
    s = job_summary(recs, plan, 2, 1000)
    # group cycles from the end of epoch 1: large 11.0, 15.5, 23.5 -> median 6.25 s; small 6.0,
    # 10.0, 14.0, 20.0 -> 4.0 s; epoch at those rates: 2 / (1/6.25 + 1/4)
    assert rate_epoch_seconds([r for r in recs if r["type"] == "commit"], 2) == pytest.approx(2 / 0.41)
    assert s["epoch_s_rate"] == pytest.approx(2 / 0.41, abs=1e-3)
    assert rate_epoch_seconds([r for r in recs if r["type"] == "commit"][:3], 2) is None  # one commit of g0
    assert s["small_over_large"] == pytest.approx(4.0 / 4.4, abs=1e-4)
    assert s["small_idle_share"] == pytest.approx(1 - 4.0 / 4.4, abs=1e-4)
    # per epoch end after epoch 1 (walls 11.0, 15.5, 23.5), the cycle each group is in then:
    # (large 6, small 4), (4.5, 6); at 23.5 the small group commits no more: left out
    rates = [2 / (1 / 6 + 1 / 4), 2 / (1 / 4.5 + 1 / 6)]
    assert epoch_rates([r for r in recs if r["type"] == "commit"], 2) == pytest.approx(rates)
    assert s["epoch_s_rates"] == pytest.approx(rates, abs=1e-3)
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == 1.0 and spread([1.0]) == 0.0
    assert s["small_sample_share"] == 0.45 and s["planned_small_share"] == 0.45
    assert s["batches_small"] == [24, 25] and s["plan_changes"] == 1
    assert s["predicted_abs_err_median"] == pytest.approx(0.0)  # errors 0.1, 0, 0, 0, 0, 0
    static = job_summary([{k: v for k, v in r.items() if k != "predicted"} for r in recs], plan, 2, 1000)
    # static: the plan's 4.0 s against 4.0, 4.0, 4.2, 4.4, 4.0, 4.4
    assert static["predicted_abs_err_median"] == pytest.approx((1 - 4.0 / 4.2 + 0) / 2, abs=1e-4)


@pytest.mark.job
def test_promise_refuses_an_impossible_n_s(tmp_path):
    r = bench("promise", "--small", "3", "--out", str(tmp_path / "p.json"), timeout=60)
    assert r.returncode != 0 and "n_S must be in 1..2" in (r.stdout + r.stderr)


@pytest.mark.job
def test_batchfloor_quick_and_its_rule(tmp_path):
    """The floor is the smallest batch from which every larger one ends within tol of B_L's
    continuation on its worst seed (a batch that trains well below a failing one does not count)."""
    from hpc_dualbatch.bench.batchfloor import _floor

    assert _floor([1, 4, 16, 64], {1: -60.0, 4: -9.0, 16: -1.2, 64: 0.0}, 2.0) == 16
    assert _floor([1, 4, 16, 64], {1: -60.0, 4: 0.5, 16: -3.0, 64: 0.0}, 2.0) == 64
    assert _floor([8, 64], {8: 1.0, 64: 0.0}, 2.0) == 8
    out = tmp_path / "batchfloor.json"
    r = bench("batchfloor", "--quick", "--out", str(out), timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    res = load(out)
    assert set(res["rows"]) == {"2", "8"} and res["floor"] in (2, 8, None)
    assert all(0.0 <= row["acc"] <= 100.0 for rows in res["rows"].values() for row in rows)
