"""Benchmark: does a dual-batch epoch take k times an all-large epoch, on this machine?

    hpc-dualbatch bench promise [--config CONFIG] [--data data/fashion-mnist.h5] [--k 1.05,1.10]
        [--small 1,2] [--epochs 4] [--samples 15000] [--slow GROUP:FACTOR]

Real `train` jobs one after another: all-large, then static and adaptive dual-batch per k and
n_S. Per job, the epoch time at the groups' steady rates after epoch 1 against all-large's
(goal: k within +-3 %). Method, and why not the wall between epochs: docs/bench.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.errors import ConfigError, DataError


def epoch_seconds(commits: list[dict], n: int) -> list[float]:
    """Wall seconds of each epoch after the first: between the commits n*e and n*(e+1)."""
    walls = {c["commit"]: c["wall"] for c in commits}
    ends = sorted(walls[c] for c in walls if c % n == 0)
    return [b - a for a, b in zip(ends, ends[1:])]


def rate_epoch_seconds(commits: list[dict], n: int) -> float | None:
    """n / sum_g 1/C_g: the commit-counted epoch at each group's median cycle C_g (wall between
    its consecutive commits) after epoch 1. None while a group has fewer than two commits there."""
    cycles = []
    for g in sorted({c["group"] for c in commits}):
        walls = sorted(c["wall"] for c in commits if c["group"] == g and c["commit"] >= n)
        if len(walls) < 2:
            return None
        cycles.append(statistics.median(b - a for a, b in zip(walls, walls[1:])))
    return n / sum(1 / c for c in cycles) if cycles and min(cycles) > 0 else None


def epoch_rates(commits: list[dict], n: int) -> list[float]:
    """The rate-based epoch time at the end of every epoch after the first: n / sum_g 1/C_g, with
    C_g the cycle (wall between consecutive commits) group g was in when the epoch's last commit
    came (the first of its cycles ending then or later). An epoch after which some group commits
    no more is left out."""
    walls: dict[int, list[float]] = {}
    for c in sorted(commits, key=lambda c: c["commit"]):
        walls.setdefault(c["group"], []).append(c["wall"])
    ends = sorted(c["wall"] for c in commits if c["commit"] % n == 0 and c["commit"] > n)
    out = []
    for t in ends:
        cycles = [next((b - a for a, b in zip(w, w[1:]) if b >= t), None) for w in walls.values()]
        if cycles and all(c is not None and c > 0 for c in cycles):
            out.append(n / sum(1 / c for c in cycles))  # type: ignore[operator]
    return out


def spread(values: list[float]) -> float:
    """Half the interquartile range (0 with fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / 2


def job_summary(recs: list[dict], plan: dict, n: int, d: int) -> dict:
    """The numbers of one job (pure: from its metrics records and plan.json)."""
    commits = [r for r in recs if r["type"] == "commit"]
    later = [c for c in commits if c["commit"] > n]  # after epoch 1
    eps = epoch_seconds(commits, n)
    rate = rate_epoch_seconds(commits, n)
    small = [c["seconds"] for c in later if c["small"]]
    large = [c["seconds"] for c in later if not c["small"]]
    s_over_l = statistics.median(small) / statistics.median(large) if small and large else None
    out: dict = {
        "epoch_s": [round(e, 3) for e in eps],
        "epoch_s_rate": round(rate, 3) if rate else None,
        "epoch_s_rates": [round(e, 3) for e in epoch_rates(commits, n)],
        "small_over_large": round(s_over_l, 4) if s_over_l else None,
        # the share of a large group's mini-epoch a small group is done early by (0: it is not):
        # with B_S at its floor a small group may finish first, and takes its next task sooner
        "small_idle_share": round(max(0.0, 1 - s_over_l), 4) if s_over_l else None,
        "small_sample_share": round(
            sum(c["samples"] for c in later if c["small"]) / max(1, sum(c["samples"] for c in later)), 4
        ),
        "planned_small_share": round(plan["n_small"] * (plan["d_S"] or 0) / d, 4),
        "batches_small": sorted({c["batch"] for c in later if c["small"]}),
        "plan_changes": sum(1 for r in recs if r["type"] == "plan"),
    }
    errs = []
    for c in later:
        pred = c.get("predicted")
        if pred is None:  # static: the plan's prediction from the timing file
            rp = plan["resolutions"][str(c["resolution"])]
            pred = rp["t_small"] if c["small"] else rp["t_large"]
        if pred and c["seconds"] > 0:
            errs.append(abs(pred / c["seconds"] - 1))
    out["predicted_abs_err_median"] = round(statistics.median(errs), 4) if errs else None
    return out


def _jobs(ks: list[float], smalls: list[int], slowed: str) -> list[tuple[str, float, str, list[str]]]:
    """(name, k, slow, overrides) of every job: all-large, then static and adaptive per k and n_S;
    all again with group G slowed F x when slowed is 'G:F'."""
    jobs = []
    for slow in [""] + [slowed] * bool(slowed):
        tag = f" slow {slow}" if slow else ""
        extra = [f"workers.slowdown={{{slow.replace(':', ': ')}}}"] if slow else []
        jobs.append((f"all-large{tag}", 1.0, slow, [*extra, "workers.small=0", "plan.k=1.0"]))
        for k in ks:
            for ns in smalls:
                for mode in ("static", "adaptive"):
                    adaptive = str(mode == "adaptive").lower()
                    over = [*extra, f"workers.small={ns}", f"plan.k={k}", f"plan.adaptive={adaptive}"]
                    jobs.append((f"{mode} k={k:g} n_S={ns}{tag}", k, slow, over))
    return jobs


def main(argv: list[str]) -> int:
    from hpc_dualbatch.config import load_config
    from hpc_dualbatch.runtime.metrics import read_metrics

    p = H.parser(
        "promise", __doc__, config=(H.CONFIG, "run config YAML (its groups, timing file, B_L)"),
        data=(H.DATA, "staged HDF5 file"), k=("1.05,1.10", "extra-time ratios, comma-separated"),
        small=("1,2", "n_S values, comma-separated"), epochs=(4, "epochs per job (the first is not timed)"),
        samples=(15000, "d, samples per epoch"), resolution=(0, "px, fixed (default: the config's highest)"),
        slow=("", "also run every job with group G slowed F x (G:F)"),
        timeout=(900.0, "seconds per job before it counts as hung"), set=([], "config override, every job"),
    )  # fmt: skip
    args = H.start(p, argv, k="1.05", small="1", epochs=3, samples=1500)
    if args.epochs < 2:
        raise ConfigError(f"bench promise --epochs is {args.epochs}; it needs >= 2 (the first is not timed)")
    cfg = load_config(args.config, args.set)
    n = cfg.n_groups
    res = args.resolution or cfg.schedule.resolutions[-1]
    ks, smalls = [float(x) for x in args.k.split(",")], [int(x) for x in args.small.split(",")]
    bad = [s for s in smalls if not 0 < s < n]
    if bad:
        raise ConfigError(
            f"bench promise --small {bad}: n_S must be in 1..{n - 1} ({n} groups in the config)"
        )
    if not os.path.isfile(args.data):
        raise DataError(
            f"bench promise: no staged data file {args.data!r}: give --data FILE, or stage it with "
            f"`hpc-dualbatch prepare --source fashion-mnist --resolutions 20,24,28 --out {args.data}`"
        )
    common = [
        *args.set, f"data.path={args.data}", "schedule.resolution_mode=fixed",
        f"schedule.resolutions=[{res}]", f"plan.large_batch={{{res}: {cfg.plan.large_batch[res]}}}",
        f"plan.samples_per_epoch={args.samples}", f"schedule.epochs={args.epochs}",
        f"schedule.milestones=[{args.epochs - 1}]", "schedule.lr=[0.1, 0.01]",
        f"schedule.dropout={{{res}: 0.0}}", "checkpoint.every_epochs=0", "server.order=arrival",
    ]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="hdb-promise-") as tmp:
        for i, (name, k, slow, over) in enumerate(_jobs(ks, smalls, args.slow)):
            out = os.path.join(tmp, f"job{i}")
            sets = [x for kv in [*common, *over, f"out={out}"] for x in ("--set", kv)]
            print(f"== {name}", flush=True)
            H.launch(sum(cfg.workers.groups) + 1, ["train", "--config", args.config, *sets], args.timeout)
            with open(os.path.join(out, "plan.json"), encoding="utf-8") as f:
                plan = json.load(f)
            summary = job_summary(read_metrics(os.path.join(out, "metrics.jsonl")), plan, n, args.samples)
            rows.append({"job": name, "k": k, "slow": slow, "overrides": over, **summary})
    base = {r["slow"]: r for r in rows if r["k"] == 1.0}
    for r in rows:
        b = base[r["slow"]]
        if r["k"] == 1.0:
            continue
        if r["epoch_s_rate"] and b["epoch_s_rate"]:
            r["ratio"] = round(r["epoch_s_rate"] / b["epoch_s_rate"], 4)
            r["ratio_over_k"] = round(r["ratio"] / r["k"] - 1, 4)
        if r["epoch_s"][1:] and b["epoch_s"][1:]:  # plain wall of every epoch after the first
            r["ratio_wall"] = round(sum(r["epoch_s"][1:]) / sum(b["epoch_s"][1:]), 4)
        # per epoch: the medians of the job's and all-large's per-epoch times, the spread of their
        # ratio from both (half-IQRs, relative, in quadrature); the promise can be judged only
        # where that spread is below k - 1
        per, ref = r["epoch_s_rates"], b["epoch_s_rates"]
        if len(per) >= 3 and len(ref) >= 3:
            mj, mb = statistics.median(per), statistics.median(ref)
            sd = mj / mb * math.hypot(spread(per) / mj, spread(ref) / mb)
            r["ratio_epochs_median"], r["ratio_epochs_spread"] = round(mj / mb, 4), round(sd, 4)
            r["judged"] = sd < r["k"] - 1
        else:
            r["judged"] = False
    keys = "job epoch_s_rate ratio ratio_over_k ratio_wall ratio_epochs_median ratio_epochs_spread judged"
    keys += (
        " small_over_large small_idle_share small_sample_share planned_small_share predicted_abs_err_median"
    )
    cells = [[r.get(k) for k in keys.split()] for r in rows]
    cols = "<job|epoch s:.2f|ratio:.3f|/k - 1:+.1%|wall:.3f|per epoch:.3f|+-:.3f|<judged|S/L:.3f|S idle:.1%"
    cols += "|S share:.3f|plan:.3f|pred err:.1%"
    print(f"\n{H.table(cols, cells)}\ngoals: ratio within +-3 % of k; S/L (small/large mini-epoch s) near 1; "
          "pred err (|predicted/measured - 1|) <= 3 %. 'judged': the per-epoch ratio's spread (both jobs' "
          "half-interquartile ranges, 3 epochs or more) is below k - 1; where it is not, this machine "
          "cannot tell whether the promise holds: run more --epochs")  # fmt: skip
    H.write_result(args.out, "promise", args, argv, timing=cfg.plan.timing, rows=rows)
    return 0
