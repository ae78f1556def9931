"""`hpc-dualbatch bench all`: every suite in turn, then one summary table (`make bench`).

    hpc-dualbatch bench all [--only exchange,overhead] [--quick] [--out-dir results/bench]

Each suite runs as its own process (the MPI suites under the harness's launcher), so one
suite's threads, memory or crash cannot touch the next; each writes <out-dir>/<suite>.json,
from which the summary takes its headline numbers. A suite that fails or runs past its time
limit is reported as such and the others still run.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from typing import Any

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.errors import ConfigError

# suite -> (MPI ranks, 0 = a plain process; options; time limit, s). Seconds seen on the 2-core
# machine, quiet / shared with other jobs (load ~4): plan 75 / 150 (d = 30,000: half of
# Fashion-MNIST, to keep `make bench` inside its 15 min), loader 10 / 20, exchange 5 / 20,
# overhead 140 / 300, allreduce 100 / 240, resolution 30 / 35.
SUITES: dict[str, tuple[int, list[str], float]] = {
    "plan": (0, ["--samples", "30000"], 300), "loader": (0, [], 180), "exchange": (2, [], 120),
    "overhead": (0, [], 420), "allreduce": (0, [], 360), "resolution": (0, [], 180),
}  # fmt: skip


def row(metric: str, value: float, goal: str = "-") -> dict[str, Any]:
    """One summary row; a goal '>= x' or '<= x' is checked (met), '-' is none (met None)."""
    op, _, bound = goal.partition(" ")
    met = None if goal == "-" else value >= float(bound) if op == ">=" else value <= float(bound)
    return {"metric": metric, "value": value, "goal": goal, "met": met}


def headline(suite: str, r: dict) -> list[dict[str, Any]]:
    """The summary rows of one suite's result JSON."""
    if suite == "plan":
        return [row("|predicted/measured - 1|, worst", r["max_abs_rel_error"], "<= 0.05")]
    if suite == "loader":
        return [
            row(f"loader / train img/s ({what}), worst res", min(x[key] for x in r["rows"]), ">= 5")
            for what, key in (("memory", "ratio"), ("streamed", "ratio_stream"))
        ]
    if suite == "exchange":
        return [
            row("PS push+pull / raw Send+Recv throughput (delta)", r["ratio_delta"], ">= 0.9"),
            row("  same, the method's merge (paper)", r["ratio_paper"]),
            row("  same, merge excluded", r["ratio_nomerge"]),
        ]
    if suite == "overhead":
        return [
            row("PS run / no-server img/s", r["ratio"], ">= 0.95"),
            row("  training share of PS workers' time (in-run)", r["duty_cycle"], ">= 0.95"),
            row("server CPU s per wall s", r["server_cpu_per_wall"], "<= 0.05"),
        ]
    if suite == "allreduce":
        return [row("Horovod 2x1 thread / 1 process x 2 threads img/s", r["ratio"])]
    return [row("epoch-time ratio / pixel ratio, worst res", r["worst_excess"], "<= 1.10")]


def main(argv: list[str]) -> int:
    p = H.parser("all", __doc__, out=False, only=("", f"comma-separated suites of {', '.join(SUITES)}"))
    p.add_argument("--out-dir", default=os.path.join("results", "bench"), help="each suite's JSON, all.json")
    p.add_argument("--budget-s", type=float, default=840, help="s for all suites; each gets at most the rest")
    args = H.start(p, argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ConfigError(f"bench all --only: unknown suite(s) {unknown}; valid: {', '.join(SUITES)}")
    out_dir, summary, t_all = os.path.abspath(args.out_dir), [], time.perf_counter()
    for name in names:
        ranks, opts, limit = SUITES[name]
        out = os.path.join(out_dir, f"{name}.json")
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        left = args.budget_s - (t0 - t_all)
        entry: dict[str, Any] = {"suite": name, "command": "", "json": out}
        try:
            if os.path.exists(out):
                os.remove(out)  # a stale file must not pass for this run's result
            suite_args = ["--quick"] if args.quick else opts
            cmd, env = H.command_for(["bench", name, *suite_args, "--out", out], ranks)
            entry["command"] = shlex.join(cmd)
            if left < 30:
                raise RuntimeError(f"not run: {left:.0f} s left of --budget-s {args.budget_s:.0f}")
            print(f"== {name}: {entry['command']}", flush=True)
            print(H.run(cmd, env, min(limit, left), own_group=True).rstrip(), flush=True)
            with open(out, encoding="utf-8") as f:
                entry.update(rows=headline(name, json.load(f)), status="ok")
        except (RuntimeError, OSError, KeyError, ValueError, ConfigError) as e:
            entry.update(status="failed", error=str(e))
            print(f"{name}: FAILED\n{e}", flush=True)
        # Other people's jobs on this machine: the 1-minute load average before and after the suite.
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["load"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
        summary.append(entry)
    total = time.perf_counter() - t_all
    print(f"\n{summary_table(summary)}\n{len(names)} suites in {total:.0f} s", end="")
    print(" (--quick: toy sizes, not measurements)" if args.quick else "")
    H.write_result(
        os.path.join(out_dir, "all.json"), "all", args, argv, seconds=round(total, 1), suites=summary
    )
    return 0 if all(e["status"] == "ok" for e in summary) else 1


def summary_table(summary: list[dict[str, Any]]) -> str:
    """One line per headline row (suite, seconds and load on its first), then the failures' last lines."""
    rows, failures = [], []
    for e in summary:
        secs, load = f"{e['seconds']:.0f}", "{:.1f}->{:.1f}".format(*e["load"])
        if e["status"] != "ok":
            rows.append([e["suite"], "FAILED (below)", None, "", "", secs, load])
            failures.append(
                f"{e['suite']}: " + ([ln for ln in e["error"].splitlines() if ln.strip()] or [""])[-1]
            )
        for i, r in enumerate(e.get("rows", [])):
            met = {True: "met", False: "MISSED", None: ""}[r["met"]]
            once = [e["suite"], secs, load] if i == 0 else ["", "", ""]  # on the first row only
            rows.append([once[0], r["metric"], r["value"], r["goal"], met, *once[1:]])
    return "\n".join([H.table("<suite|<metric|value:.3f|goal||s|load", rows), *failures])
