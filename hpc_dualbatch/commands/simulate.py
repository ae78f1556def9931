"""`hpc-dualbatch simulate`: the parameter server's discrete-event model (`ps/simulate.py`).

    hpc-dualbatch simulate check RUN_DIR... --exchange results/bench/exchange-small.json [--wake-ms W]
    hpc-dualbatch simulate scale [--out docs/scaling-sim.md]

`check` replays real runs: each group's measured task times (commit records: training seconds,
the exchanges excluded), its pushes per task (merge records), the evaluations' seconds, the
model's size, and the exchange's costs from a `bench exchange` result (raw round trip -> link
bandwidth, the delta merge's ms -> seconds per weight); it prints the measured and predicted
seconds per push inside a task (what commit records' `wait` sums) and commits per second, and
their relative errors (goal: within 15 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.ps.simulate import Link, SimGroup, SimInput, SimTask, simulate


def link_from_bench(path: str) -> tuple[Link, int]:
    """The link and merge costs a `bench exchange` result measured, and the floats it moved."""
    from hpc_dualbatch.atomic import read_json

    r = read_json(path, "bench exchange result", ConfigError, "give a result of `bench exchange --out FILE`")
    try:
        floats = int(r["params"]["floats"])
        raw = next(row for row in r["rows"] if row["variant"] == "raw")["seconds_per_trip"]
        merge_ms = float(r["merge_ms_delta"])
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise ConfigError(
            f"{path} is not a result of this version's `bench exchange` (no {e}): run "
            "`mpirun -np 2 hpc-dualbatch bench exchange --out FILE` and give that FILE"
        ) from None
    # a raw round trip moves the floats there and back, one after the other
    return Link(bandwidth=2 * 4 * floats / raw, merge_s_per_float=merge_ms / 1e3 / floats), floats


def model_floats(cfg: Any) -> int:
    """Weights a push carries for the run's model (parameters and BN buffers)."""
    from hpc_dualbatch.data.staged import open_staged
    from hpc_dualbatch.runtime.flat import FlatModel
    from hpc_dualbatch.runtime.model import build_model

    staged = open_staged(cfg.data.path)
    return FlatModel(
        build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width)
    ).n_weights


def replay(run: str, link: Link, wake: float, floats: int | None = None) -> tuple[dict[str, float], SimInput]:
    """A run's measured trace as a model input, and what the run measured."""
    from hpc_dualbatch.config import load_config
    from hpc_dualbatch.runtime.metrics import read_metrics

    cfg = load_config(os.path.join(run, "config.yaml"))
    if cfg.mode != "ps":
        raise ConfigError(f"{run}: mode {cfg.mode}: only parameter-server runs have a server to model")
    recs = read_metrics(os.path.join(run, "metrics.jsonl"))
    commits = [r for r in recs if r["type"] == "commit"]
    merges = [r for r in recs if r["type"] == "merge"]
    evals = sorted((r for r in recs if r["type"] == "eval"), key=lambda r: r["epoch"])
    if not commits:
        raise ConfigError(f"{run}: metrics.jsonl holds no commits")
    mid = {}
    for m in merges:
        mid[(m["group"], m["round"])] = mid.get((m["group"], m["round"]), 0) + 1
    groups = [
        SimGroup(
            ranks,
            [
                SimTask(c["seconds"], 1 + mid.get((g, c["round"]), 0), c["samples"])
                for c in commits
                if c["group"] == g
            ],
        )
        for g, ranks in enumerate(cfg.workers.groups)
    ]
    sim = SimInput(
        groups, floats or model_floats(cfg), link, len(commits), poll_min=cfg.server.poll_min_s,
        poll_max=cfg.server.poll_max_s, wake=wake,
        evals=[e["seconds"] + e.get("bn_seconds", 0.0) for e in evals],
    )  # fmt: skip
    measured = {
        "mid_exchange_per_push": sum(c.get("wait", 0.0) for c in commits) / max(len(merges), 1),
        "commits_per_s": len(commits) / max(c["wall"] for c in commits),
    }
    return measured, sim


def check(args: argparse.Namespace) -> int:
    link, _ = link_from_bench(args.exchange)
    rows, errors = [], []
    for run in args.runs:
        measured, sim = replay(run, link, args.wake_ms / 1e3, args.floats)
        out = simulate(sim)
        pred = {"mid_exchange_per_push": out.mid_exchange_per_push, "commits_per_s": out.commits_per_s}
        err = {k: pred[k] / measured[k] - 1 if measured[k] else float("nan") for k in pred}
        errors.append(err)
        rows.append(
            {"run": run, "measured": measured, "predicted": pred, "error": err, "busy_share": out.busy_share}
        )
        ms = {k: 1e3 * v["mid_exchange_per_push"] for k, v in (("m", measured), ("p", pred))}
        print(
            f"{run}: exchange per push inside a task {ms['m']:.2f} ms measured, {ms['p']:.2f} predicted "
            f"({100 * err['mid_exchange_per_push']:+.0f} %); commits/s {measured['commits_per_s']:.3f} / "
            f"{pred['commits_per_s']:.3f} ({100 * err['commits_per_s']:+.0f} %); "
            f"server busy {100 * out.busy_share:.1f} %"
        )
    worst = {k: max(abs(e[k]) for e in errors) for k in errors[0]}
    print(
        f"worst |error| over {len(rows)} runs: exchange per push {100 * worst['mid_exchange_per_push']:.0f} "
        f"%, commits/s {100 * worst['commits_per_s']:.0f} % (goal: within 15 %)"
    )
    if args.out:
        from hpc_dualbatch.atomic import write_json

        write_json(
            args.out,
            {"exchange": args.exchange, "wake_ms": args.wake_ms, "rows": rows, "worst": worst,
             "median_abs_error": {k: statistics.median(abs(e[k]) for e in errors) for k in errors[0]}},
        )  # fmt: skip
        print(f"wrote {args.out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="the parameter server's discrete-event model: check it, or scale it up"
    )
    s = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = s.add_parser(
        "check", help="replay real runs and compare predicted with measured exchange time and commits/s"
    )
    c.add_argument("runs", nargs="+", help="parameter-server run folders")
    c.add_argument("--exchange", required=True, help="a `bench exchange` result (JSON): link and merge costs")
    c.add_argument(
        "--wake-ms", type=float, default=0.0, help="delay from a wake-up to running, ms (a loaded node)"
    )
    c.add_argument(
        "--floats", type=int, default=None, help="weights per push (default: from the run's model)"
    )
    c.add_argument("--out", default=None, help="write the comparison as JSON")
    c.set_defaults(func=check)
