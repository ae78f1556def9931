"""`hpc-dualbatch bench all`: every suite in turn, then one summary table (`make bench`).

    python -m hpc_dualbatch bench all [--only exchange,overhead] [--quick] [--out-dir results/bench]

Each suite runs as its own process (the MPI suites under `scripts/mpirun_local.sh`), so one
suite's threads, memory or crash cannot touch the next; each writes <out-dir>/<suite>.json,
from which the summary takes its headline numbers. A suite that fails or runs past its time
limit is reported as such and the others still run. Every number is a ratio measured side by
side inside one suite's run: absolute times on a shared machine drift, such ratios much less.
--quick runs every suite at toy sizes (a smoke test of the harness, not a measurement).

Also home of the helpers the suites share (machine description, atomic JSON, median ratio).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_json

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = str(ROOT / "scripts" / "mpirun_local.sh")
DEFAULT_DATA = ROOT / "data" / "fashion-mnist.h5"


# --- helpers shared by the suites ------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where a result was measured: host, cores, torch threads, versions, load at the time."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other engineers' jobs share this machine
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip().rstrip("\x00")
        info["mpi_ranks"] = MPI.COMM_WORLD.Get_size()
    return info


def exit_on_sigterm() -> None:
    """SIGTERM (a `bench all` timeout) -> SystemExit, so temporary folders are removed on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def write_result(path: str, result: dict[str, Any]) -> None:
    """Write JSON atomically (temporary name + os.replace) and say where."""
    write_json(path, result)
    print(f"wrote {path}")


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i (pairs measured next to each other)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def mpirun(np_: int, args: list[str], timeout: float, mpi_args: tuple[str, ...] = ()) -> str:
    """`scripts/mpirun_local.sh -np N [MPI_ARGS] python -m hpc_dualbatch ARGS` under a hard timeout;
    returns stdout. A failure raises RuntimeError with the tail of the job's output."""
    cmd = [MPIRUN, "-np", str(np_), *mpi_args, sys.executable, "-m", "hpc_dualbatch", *args]
    return run_command(cmd, timeout)


def run_command(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, own_group: bool = False
) -> str:
    """Run `cmd` under a hard timeout; returns stdout, raises RuntimeError with the output's tail.

    Past the timeout the child gets SIGTERM (mpirun passes it on to its ranks), then SIGKILL.
    own_group: the child leads a new process group and the signals go to the whole group (the
    suite and the mpirun jobs it launched), so no stray rank keeps loading the machine.
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=full_env,
        start_new_session=own_group,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _stop(proc, own_group)
        proc.communicate()
        raise RuntimeError(f"{shlex.join(cmd)}: no result after {timeout:.0f} s (stopped)") from None
    if proc.returncode != 0:
        tail = "\n".join((out + err).strip().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return out


def _stop(proc: subprocess.Popen, group: bool) -> None:
    """SIGTERM, up to 10 s to finish (mpirun stops its ranks), then SIGKILL what is left."""

    def alive() -> bool:
        if not group:
            return proc.poll() is None
        try:
            os.killpg(proc.pid, 0)  # the group this module created, and nothing else
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            break
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that its exit is seen
            time.sleep(0.1)


# --- the summary -----------------------------------------------------------------------------------


def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _plan_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    worst = r["max_abs_rel_error"]
    return [("|predicted/measured - 1|, worst", worst, "<= 0.05", worst <= 0.05)]


def _loader_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    mem = min(row["ratio"] for row in r["rows"])
    stream = min(row["ratio_stream"] for row in r["rows"])
    return [
        ("loader / train img/s (memory), worst res", mem, ">= 5", mem >= 5),
        ("loader / train img/s (streamed), worst res", stream, ">= 5", stream >= 5),
    ]


def _exchange_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    return [
        ("PS push+pull / raw Send+Recv throughput", r["ratio_ps"], ">= 0.8", r["ratio_ps"] >= 0.8),
        ("  same, merge excluded", r["ratio_ps_nomerge"], "-", None),
    ]


def _overhead_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    return [
        ("PS run / no-server img/s", r["ratio"], ">= 0.95", r["ratio"] >= 0.95),
        (
            "  training share of PS workers' time (in-run)",
            r["duty_cycle"],
            ">= 0.95",
            r["duty_cycle"] >= 0.95,
        ),
        ("server CPU s per wall s", r["server_cpu_per_wall"], "<= 0.05", r["server_cpu_per_wall"] <= 0.05),
    ]


def _allreduce_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    return [("Horovod 2x1 thread / 1 process x 2 threads img/s", r["ratio"], "-", None)]


def _resolution_rows(r: dict) -> list[tuple[str, float, str, bool | None]]:
    worst = r["worst_excess"]
    return [("epoch-time ratio / pixel ratio, worst res", worst, "<= 1.10", worst <= 1.10)]


_LOADER_QUICK = "--source synthetic --resolutions 12,16 --batches 4 --steps 1 --width 8 --batch 32".split()

# suite -> (MPI ranks or 0 for a plain process, options, --quick options, timeout s, headline rows).
# Seconds seen on the 2-core machine, quiet / shared with other jobs (load ~4): plan 75 / 150
# (d = 30,000: half of Fashion-MNIST, to keep `make bench` inside its 15 min), loader 10 / 20,
# exchange 5 / 20, overhead 140 / 300, allreduce 100 / 240, resolution 30 / 35.
SUITES: dict[str, tuple[int, list[str], list[str], float, Callable[[dict], list]]] = {
    "plan": (0, ["--samples", "30000"], ["--samples", "512", "--warmup", "1"], 300, _plan_rows),
    "loader": (0, [], _LOADER_QUICK, 180, _loader_rows),
    "exchange": (2, [], ["--floats", "100000", "--iters", "2", "--repeats", "2"], 120, _exchange_rows),
    "overhead": (0, [], ["--quick"], 420, _overhead_rows),
    "allreduce": (0, [], ["--quick"], 360, _allreduce_rows),
    "resolution": (0, [], ["--quick"], 180, _resolution_rows),
}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpc-dualbatch bench all", description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated suites (default: all of {', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the harness, measures nothing")
    p.add_argument("--out-dir", default="results/bench", help="where each suite's JSON and all.json go")
    p.add_argument(
        "--budget-s",
        type=float,
        default=840,
        help="seconds for all suites; a suite gets at most what is left",
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from ..errors import ConfigError

    args = _parse(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ConfigError(f"bench all --only: unknown suite(s) {unknown}; valid: {', '.join(SUITES)}")
    out_dir = os.path.abspath(args.out_dir)
    summary: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in names:
        np_, opts, quick, timeout, headline = SUITES[name]
        out = os.path.join(out_dir, f"{name}.json")
        opts = list(quick if args.quick else opts)
        if name == "loader" and not args.quick and DEFAULT_DATA.exists():
            opts += ["--file", str(DEFAULT_DATA)]  # staged by `make demo`: no re-staging
        opts += ["--out", out]
        cmd = [sys.executable, "-m", "hpc_dualbatch", "bench", name, *opts]
        if np_:
            cmd = [MPIRUN, "-np", str(np_), *cmd]
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        entry: dict[str, Any] = {"suite": name, "command": shlex.join(cmd), "json": out}
        left = args.budget_s - (t0 - t_all)
        try:
            if os.path.exists(out):
                os.remove(out)  # a stale file must not pass for this run's result
            if left < 30:
                raise RuntimeError(f"not run: {left:.0f} s left of --budget-s {args.budget_s:.0f}")
            print(f"== {name}: {shlex.join(cmd)}", flush=True)
            stdout = run_command(cmd, min(timeout, left), own_group=True)
            print(stdout.rstrip(), flush=True)
            entry["rows"] = [
                {"metric": m, "value": v, "goal": g, "met": ok} for m, v, g, ok in headline(_load(out))
            ]
            entry["status"] = "ok"
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            entry["status"], entry["error"] = "failed", str(e)
            print(f"{name}: FAILED\n{e}", flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        # Other people's jobs on this machine: the 1-minute load average before and after the suite.
        entry["load"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
        summary.append(entry)
    total = time.perf_counter() - t_all
    print()
    print(_summary_table(summary))
    note = " (--quick: toy sizes, not measurements)" if args.quick else ""
    print(f"{len(names)} suites in {total:.0f} s{note}")
    write_result(
        os.path.join(out_dir, "all.json"),
        {
            "bench": "all",
            "command": "python -m hpc_dualbatch bench all " + " ".join(argv),
            "params": vars(args),
            "machine": machine(),
            "seconds": round(total, 1),
            "suites": summary,
        },
    )
    return 0 if all(e["status"] == "ok" for e in summary) else 1


def _summary_table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'suite':<11} {'metric':<50} {'value':>8} {'goal':>8} {'':>6} {'s':>5} {'load':>9}"]
    failures = []
    for e in summary:
        load, secs = "{:.1f}->{:.1f}".format(*e["load"]), f"{e['seconds']:.0f}"
        if e["status"] != "ok":
            lines.append(
                f"{e['suite']:<11} {'FAILED (below)':<50} {'':>8} {'':>8} {'':>6} {secs:>5} {load:>9}"
            )
            last = [ln for ln in e["error"].splitlines() if ln.strip()][-1:] or [""]
            failures.append(f"{e['suite']}: {last[0]}")
            continue
        for i, row in enumerate(e["rows"]):
            met = {True: "met", False: "MISSED", None: ""}[row["met"]]
            first = i == 0
            lines.append(
                f"{e['suite'] if first else '':<11} {row['metric']:<50} {row['value']:8.3f} {row['goal']:>8} "
                f"{met:>6} {secs if first else '':>5} {load if first else '':>9}"
            )
    return "\n".join(lines + failures)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
