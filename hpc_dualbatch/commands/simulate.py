"""`hpc-dualbatch simulate`: the parameter server's discrete-event model (`ps/simulate.py`).

    hpc-dualbatch simulate check RUN_DIR... --exchange results/bench/exchange-small.json [--wake-ms W]
    hpc-dualbatch simulate scale [--gbps 100] [--merge-ns 0.20] [--update-ns 0.52] [--out docs/scaling.md]

`check` replays real runs: each group's measured task times (commit records: training seconds,
the exchanges excluded), its pushes per task (merge records), the evaluations' seconds, the
model's size, and the exchange's costs from a `bench exchange` result (raw round trip -> link
bandwidth, the delta merge's ms -> seconds per weight); it prints the measured and predicted
seconds per push inside a task (what commit records' `wait` sums) and commits per second, and
their relative errors (goal: within 15 %).

`scale` runs the model for the paper's workloads from 8 to 1,024 GPUs, for 1-16 server shards and
push periods of 1, 4 and 16 steps, and prints (or writes into docs/scaling.md between its markers)
the fewest shards that keep 95 % of the throughput without a server.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.ps.simulate import Link, SimGroup, SimInput, SimTask, simulate
from hpc_dualbatch.yaml_safe import load as load_yaml


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
    # a raw round trip moves the floats there and back, one after the other; the leader's own
    # arithmetic is what `nomerge` (update, no merge) takes beyond `wire` (no arithmetic): results
    # from before `wire` existed give none
    trip = {row["variant"]: row["seconds_per_trip"] for row in r["rows"]}
    update = max(0.0, trip["nomerge"] - trip["wire"]) / floats if {"wire", "nomerge"} <= set(trip) else 0.0
    link = Link(2 * 4 * floats / raw, merge_s_per_float=merge_ms / 1e3 / floats, update_s_per_float=update)
    return link, floats


def model_floats(cfg: Any) -> int:
    """Weights a push carries for the run's model (parameters and BN buffers)."""
    from hpc_dualbatch.data.staged import open_staged
    from hpc_dualbatch.runtime.flat import FlatModel
    from hpc_dualbatch.runtime.model import build_model

    staged = open_staged(cfg.data.path)
    return FlatModel(
        build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width)
    ).n_weights


def replay(
    run: str, link: Link, wake: tuple[float, float], floats: int | None = None, blocking: bool = False
) -> tuple[dict[str, float], SimInput]:
    """A run's measured trace as a model input, and what the run measured. `wake`: the (server,
    worker) wake-up delays, s, for a run that did not measure its own (`run_wakes`)."""
    from hpc_dualbatch.config import load_config
    from hpc_dualbatch.runtime.metrics import evaluations, read_metrics

    cfg = load_config(os.path.join(run, "config.yaml"))
    if cfg.mode != "ps":
        raise ConfigError(f"{run}: mode {cfg.mode}: only parameter-server runs have a server to model")
    if len(set(cfg.server.order_by_lr)) > 1:
        raise ConfigError(
            f"{run}: server.order_by_lr {cfg.server.order_by_lr} switched the server's order during the "
            "run; the model holds one order throughout: check a run with one server.order"
        )
    recs = read_metrics(os.path.join(run, "metrics.jsonl"))
    commits = [r for r in recs if r["type"] == "commit"]
    merges = [r for r in recs if r["type"] == "merge"]
    evals = evaluations(recs)
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
    wake = run_wakes(run, commits, wake)
    order = (cfg.server.order_by_lr or [cfg.server.order])[0]  # (one order throughout: checked above)
    sim = SimInput(
        groups, floats or model_floats(cfg), link, len(commits), poll_min=cfg.server.poll_min_s,
        poll_max=cfg.server.poll_max_s, wake=wake[0], worker_wake=wake[1],
        evals=[e["seconds"] + e.get("bn_seconds", 0.0) for e in evals], spread=part_spread(recs),
        blocking_replies=blocking, overlap=cfg.server.overlap, rounds=order == "rounds",
        predict=_ran_predicting(run), leader_s=leader_seconds(commits, len(merges)),
    )  # fmt: skip
    measured = {
        "mid_exchange_per_push": sum(c.get("wait", 0.0) for c in commits) / max(len(merges), 1),
        "commits_per_s": len(commits) / max(c["wall"] for c in commits),
    }
    return measured, sim


def leader_seconds(commits: list[dict], merges: int) -> float | None:
    """The leaders' own handling per push inside a task, s, as a run measured it: of the pushes'
    time (`wait`) what the server's part (`waited`: header to reply) leaves; None for runs that
    did not record `waited` (then the model takes the link's arithmetic)."""
    if not merges or any("waited" not in c for c in commits):
        return None
    return max(0.0, sum(c["wait"] - c["waited"] for c in commits) / merges)


def part_spread(recs: list[dict]) -> float:
    """How much a run's parts of a task varied: the relative s.d. of the times between a group's
    consecutive pushes inside one task (the server's record times), the median over the groups;
    0 without pushes inside tasks. The replay splits each task's measured time into parts this
    much apart, so a server that expects each push (server.poll_predict) misses as it did."""
    pushes: dict[tuple[int, int], list[float]] = {}
    for r in recs:
        if r["type"] in ("merge", "commit"):
            pushes.setdefault((r["group"], r["round"]), []).append(r["wall"])
    gaps: dict[int, list[float]] = {}
    for (g, _), walls in pushes.items():  # (a task's first part follows its pull: not counted)
        gaps.setdefault(g, []).extend(b - a for a, b in zip(walls, walls[1:]))
    spreads = [statistics.pstdev(x) / statistics.mean(x) for x in gaps.values() if len(x) > 1]
    return statistics.median(spreads) if spreads else 0.0


def run_wakes(run: str, commits: list[dict], default: tuple[float, float]) -> tuple[float, float]:
    """The (server, worker) wake-up delays a run measured, s: how late its server's sleeps ended
    (status.json's wake_late_ms) and its leaders' (the commit records' late / sleeps), each
    `default`'s where the run did not record it (runs before `protocol.Backoff` counted)."""
    from hpc_dualbatch.atomic import read_json

    path = os.path.join(run, "status.json")
    status = read_json(path, "run status", ConfigError, "give a run folder `train` wrote")
    server = (status.get("server") or {}).get("wake_late_ms") if isinstance(status, dict) else None
    sleeps = sum(c.get("sleeps", 0) for c in commits)
    worker = sum(c.get("late", 0.0) for c in commits) / sleeps if sleeps else default[1]
    return (default[0] if server is None else server / 1e3, worker)


def _ran_predicting(run: str) -> bool:
    """Whether the run's server expected its requests (server.poll_predict): its config.yaml holds
    every key the code knew, so a run made before the key existed ran without it."""
    path = os.path.join(run, "config.yaml")
    with open(path, encoding="utf-8") as f:
        server = (load_yaml(f, f"config file '{path}'") or {}).get("server") or {}
    return bool(server.get("poll_predict", False))


def check(args: argparse.Namespace) -> int:
    link, _ = link_from_bench(args.exchange)
    rows, errors = [], []
    for run in args.runs:
        wake = (args.wake_ms / 1e3, args.worker_wake_ms / 1e3)
        measured, sim = replay(run, link, wake, args.floats, args.blocking_replies)
        out = simulate(sim)
        pred = {"mid_exchange_per_push": out.mid_exchange_per_push, "commits_per_s": out.commits_per_s}
        err = {k: pred[k] / measured[k] - 1 if measured[k] else float("nan") for k in pred}
        errors.append(err)
        inputs = {"wake_ms": 1e3 * sim.wake, "worker_wake_ms": 1e3 * sim.worker_wake}  # (the run's)
        own = ""
        if sim.leader_s is not None:  # the server's part of a push (the rest is the leader's own)
            m, p = (1e3 * (x["mid_exchange_per_push"] - sim.leader_s) for x in (measured, pred))
            inputs.update(leader_ms=1e3 * sim.leader_s, server_part_ms={"measured": m, "predicted": p})
            own = f"; the leader's own {1e3 * sim.leader_s:.2f} ms, the server's part {m:.2f} / {p:.2f}"
            own += f" ({100 * (p / m - 1):+.0f} %)" if m > 0 else ""
        rows.append(
            {"run": run, "measured": measured, "predicted": pred, "error": err, "busy_share": out.busy_share,
             **inputs}
        )  # fmt: skip
        ms = {k: 1e3 * v["mid_exchange_per_push"] for k, v in (("m", measured), ("p", pred))}
        print(
            f"{run}: exchange per push inside a task {ms['m']:.2f} ms measured, {ms['p']:.2f} predicted "
            f"({100 * err['mid_exchange_per_push']:+.0f} %); commits/s {measured['commits_per_s']:.3f} / "
            f"{pred['commits_per_s']:.3f} ({100 * err['commits_per_s']:+.0f} %); "
            f"server busy {100 * out.busy_share:.1f} %; wake-ups {inputs['wake_ms']:.2f} ms (server), "
            f"{inputs['worker_wake_ms']:.2f} ms (workers){own}"
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
            {"exchange": args.exchange, "wake_ms": args.wake_ms, "worker_wake_ms": args.worker_wake_ms,
             "rows": rows, "worst": worst,
             "median_abs_error": {k: statistics.median(abs(e[k]) for e in errors) for k in errors[0]}},
        )  # fmt: skip
        print(f"wrote {args.out}")
    return 0


# The paper's workloads (docs/scaling.md, "Inputs"): time per GPU step t(B) = a*B + b at B_L, the
# train samples d, and the weights per push P of the two models.
WORKLOADS = {
    "CIFAR ResNet-18": (5.06e-4, 0.0156, 560, 50_000, 11_200_000),
    "ImageNet ResNet-50": (5.68e-4, 0.0171, 1_110, 1_281_167, 25_600_000),
}
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
SHARDS = (1, 2, 4, 8, 16)
PERIODS = (1, 4, 16)  # server.push_every, steps
ENOUGH = 0.95  # of the throughput without any server: where a shard more stops paying


def scale_point(
    work: str,
    gpus: int,
    group: int,
    shards: int,
    period: int,
    link: Link,
    wake: tuple[float, float],
    blocking: bool = False,
    overlap: bool = False,
    rounds: bool = False,
    predict: bool = True,
) -> dict:
    """One cluster: gpus / group groups, each training its share of an epoch at B_L per GPU and
    pushing every `period` steps, 4 rounds of tasks, each part's time spread by 10 % (so the groups
    do not push in lockstep); the throughput against no server at all. `wake`: (server, worker)
    mean wake-up delays, s."""
    a, b, B_L, d, floats = WORKLOADS[work]
    n = gpus // group
    step = a * B_L + b  # s per step of every GPU of a group (its allreduce taken as free)
    steps = max(1, round(d / (n * group * B_L)))  # per mini-epoch (at least one)
    pushes = max(1, -(-steps // period))
    task = SimTask(steps * step, pushes, steps * group * B_L)
    sim = SimInput(
        [SimGroup(group, [task])] * n, floats, link, 4 * n, shards=shards, wake=wake[0], worker_wake=wake[1],
        spread=0.1, blocking_replies=blocking, overlap=overlap, rounds=rounds, predict=predict,
    )  # fmt: skip
    out = simulate(sim)
    return {"throughput": out.training_share, "busy": out.busy_share, "exchange_s": out.exchange_per_push}


def _table(cell: Callable[[str, int, int, int], str]) -> list[str]:
    """Markdown rows: per workload, group size and push period, `cell(work, gpus, group,
    period)` from 8 to 1,024 GPUs ('-': a single group, or less than a step per GPU)."""
    rows = [
        "| workload | GPUs per group | push every (steps) | "
        + " | ".join(f"{n:,} GPUs" for n in GPUS)
        + " |",
        "|---|---:|---:|" + "---:|" * len(GPUS),
    ]
    for work, (_, _, B_L, d, _) in WORKLOADS.items():
        for group in (1, 8):
            for period in PERIODS:
                cells = [
                    "-" if gpus < 2 * group or d < gpus * B_L else cell(work, gpus, group, period)
                    for gpus in GPUS
                ]
                rows.append(f"| {work} | {group} | {period} | " + " | ".join(cells) + " |")
    return rows


def shards_table(link: Link, wake: tuple[float, float], blocking: bool, overlap: bool = False) -> list[str]:
    """The fewest shards that keep ENOUGH of the throughput without a server, and in brackets
    the throughput with one."""

    def cell(work: str, gpus: int, group: int, period: int) -> str:
        point = (work, gpus, group)
        # (the server before InFlight, blocking, did not expect its requests either)
        kept = [
            scale_point(*point, S, period, link, wake, blocking, overlap, predict=not blocking)["throughput"]
            for S in SHARDS
        ]
        need = next((S for S, x in zip(SHARDS, kept) if x >= ENOUGH), None)
        return f"{need if need else '>16'} ({kept[0]:.2f})"

    return _table(cell)


def rounds_table(link: Link, wake: tuple[float, float]) -> list[str]:
    """The groups' training share under `server.order: rounds` (every push waits for the round's
    slowest part) at the shard count `arrival` needs (its table), and in brackets arrival's."""

    def cell(work: str, gpus: int, group: int, period: int) -> str:
        for S in SHARDS:  # the fewest that keep ENOUGH under arrival (else the most)
            arrival = scale_point(work, gpus, group, S, period, link, wake)["throughput"]
            if arrival >= ENOUGH:
                break
        rounds = scale_point(work, gpus, group, S, period, link, wake, rounds=True)["throughput"]
        return f"{rounds:.2f} ({arrival:.2f})"

    return _table(cell)


def scale(args: argparse.Namespace) -> int:
    link = Link(args.gbps * 1e9 / 8, args.latency_us * 1e-6, args.merge_ns * 1e-9, args.update_ns * 1e-9)
    wake = (args.wake_ms / 1e3, args.worker_wake_ms / 1e3)
    lines = [
        f"Simulated ({args.gbps:g} Gb/s links, {args.latency_us:g} us per message, merge {args.merge_ns:g} "
        f"ns per weight, the leader's update {args.update_ns:g} ns per weight, Backoff 0.2-5 ms (a tenth "
        f"of the wait so far; a waiting server also wakes when a request is due, server.poll_predict, "
        f"except in the first table), wake-ups {args.wake_ms:g} ms (server) and "
        f"{args.worker_wake_ms:g} ms (workers), parts spread by 10 %; "
        "`hpc-dualbatch simulate scale`). Each cell: the fewest server shards S (of "
        f"{', '.join(map(str, SHARDS))}) at which the groups spend >= {ENOUGH:.0%} of their time "
        "training (what they keep of the throughput without a server); in brackets that share with one "
        "shard; '>16': not even 16 shards reach it; '-': a single group, or an epoch of less than one "
        "step per GPU.",
        "",
        "With blocking replies (each reply taken before the next request is served: the server "
        "before `protocol.InFlight`):",
        "",
        *shards_table(link, wake, blocking=True),
        "",
        "With replies in flight (a shard serves the next request while its reply travels: the server now):",
        "",
        *shards_table(link, wake, blocking=False),
        "",
        "With replies in flight and `server.overlap: true` (a group trains on while a push inside its "
        "task travels):",
        "",
        *shards_table(link, wake, blocking=False, overlap=True),
        "",
        "With `server.order: rounds` (each push answered once every group has pushed), replies in "
        "flight: the share of their time the groups train, at the shard count the second table "
        "gives `arrival`; in brackets `arrival`'s share there. Every round waits for its slowest "
        "part (parts spread by 10 %), which no shard count removes:",
        "",
        *rounds_table(link, wake),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        from hpc_dualbatch.atomic import write_text

        begin, end = "<!-- simulate scale -->\n", "<!-- /simulate scale -->"
        doc = open(args.out, encoding="utf-8").read()
        if begin not in doc or end not in doc:
            raise ConfigError(f"{args.out} has no section marked {begin.strip()} ... {end} to replace")
        head, rest = doc.split(begin, 1)
        write_text(args.out, head + begin + text + end + rest.split(end, 1)[1])
        print(f"updated {args.out}")
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
    wakes = (  # (a run records its own, status.json and the commit records, since Request.sleeps)
        ("--wake-ms", "server: mean delay from a wake-up to running, ms, for runs that did not record it"),
        (
            "--worker-wake-ms",
            "worker: mean delay from a wake-up to running Python, ms (the node's scheduler, the GIL a "
            "loader thread holds), for runs that did not record it",
        ),
    )
    for flag, help_ in wakes:
        c.add_argument(flag, type=float, default=0.0, help=help_)
    c.add_argument(
        "--floats", type=int, default=None, help="weights per push (default: from the run's model)"
    )
    c.add_argument(
        "--blocking-replies", action="store_true",
        help="model the server before protocol.InFlight (runs whose code.txt predates it)",
    )  # fmt: skip
    c.add_argument("--out", default=None, help="write the comparison as JSON")
    c.set_defaults(func=check)
    sc = s.add_parser("scale", help="shards needed from 8 to 1,024 GPUs for the paper's workloads")
    sc.add_argument("--gbps", type=float, default=100.0, help="link speed, Gb/s (100: InfiniBand EDR)")
    sc.add_argument("--latency-us", type=float, default=5.0, help="per message, us")
    sc.add_argument(
        "--merge-ns", type=float, default=0.20,
        help="the server's merge per weight, ns (bench exchange on AMD EPYC, 0.29, times 0.69: the fold "
        "alone since the leader measures its push, results/bench/exchange-ab-2026-12-05)",
    )  # fmt: skip
    sc.add_argument(
        "--update-ns", type=float, default=0.52,
        help="the leader's update, its norm and copy of the reply per weight, ns (bench exchange: nomerge "
        "- wire; AMD EPYC 0.4 before the norm, times 1.31, results/bench/exchange-ab-2026-12-05)",
    )  # fmt: skip
    sc.add_argument(
        "--wake-ms", type=float, default=0.05, help="server: mean delay from a wake-up to running, ms"
    )
    sc.add_argument(
        "--worker-wake-ms", type=float, default=0.3,
        help="worker: the same, ms (half the 0.5 ms GIL switch interval worker ranks set, as 2.5 ms "
        "was half the default 5 ms in `simulate check`)",
    )  # fmt: skip
    sc.add_argument(
        "--out", default=None, help="a markdown file whose marked section is replaced by the table"
    )
    sc.set_defaults(func=scale)
