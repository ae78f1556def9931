"""Benchmark: what does the parameter server cost a whole run? PS run vs the same work with no server.

    python -m hpc_dualbatch bench overhead [--groups 2] [--repeats 4] [--out results/bench/overhead.json]

Two kinds of job, alternated (PS first in even repeats, limit first in odd ones), each launched
with `scripts/mpirun_local.sh`, which does not bind ranks to cores (Open MPI would pin a 2-rank
job's ranks but not a 3-rank job's, which changes how each competes with other jobs):

    ps     `hpc-dualbatch train` (mode ps) on G+1 ranks: the server + G single-rank groups, a
           tiny synthetic config, every group large (k = 1, n_S = 0), checkpoints only at the end
    limit  G ranks, no server: each rank is one of those groups (same `GroupTrainer`, model,
           initial weights, loader, shares, batches, stages) and trains its `epochs` mini-epochs
           back to back, with the exchange (pull, push, merge, reply) skipped; one evaluation
           per epoch as in the PS run (rank epoch mod G evaluates)

images/s = samples trained / seconds. ps: `server_serve_seconds` of the run's end record in
metrics.jsonl (from the server's first wait to the last STOP / evaluation); limit: from the same
point (after the topology is built) to the last rank's last mini-epoch. Process launch, imports
and the final checkpoint are outside both; the groups' own start-up (Horovod, model, first data
load: ~1 s here) is inside both. Goal: ps / limit >= 0.95, and the server's CPU seconds per wall
second of serving (`server_cpu_seconds / server_serve_seconds`) <= 0.05.

Jobs minutes apart see different load from other people's jobs on a shared machine, so a second
measure needs no second job: inside each PS run, the share of each worker's time from the start
of its first mini-epoch to its last push that went to training (the commit records' `seconds`;
evaluations left out; the rest is pull, push and waiting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import yaml


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpc-dualbatch bench overhead", description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=2, help="G single-rank worker groups (PS job: G+1 ranks)")
    p.add_argument("--repeats", type=int, default=4, help="pairs of jobs (ps, limit), alternated")
    p.add_argument("--samples", type=int, default=4000, help="synthetic training samples (d per epoch)")
    p.add_argument(
        "--test-samples", type=int, default=200, help="synthetic test samples (one evaluation/epoch)"
    )
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (= mini-epochs per group)")
    p.add_argument("--width", type=int, default=16, help="resnet18_cifar width (the demo config's 16)")
    p.add_argument("--batch", type=int, default=64, help="B_L, samples per step (12 and 16 px)")
    p.add_argument("--quick", action="store_true", help="toy sizes for a smoke test (1 repeat, 2 epochs)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job before it counts as hung")
    p.add_argument("--out", default="results/bench/overhead.json")
    # internal: one rank of a limit job (launched by this module under mpirun)
    p.add_argument("--limit-worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.samples, args.test_samples, args.epochs = 1, 512, 64, 2
    return args


def _config(data: str, out: str, args: argparse.Namespace) -> dict:
    """The PS run's config; the limit job reads the same file."""
    return {
        "mode": "ps", "seed": 0, "out": out, "device": "cpu", "threads": 1,
        "data": {"path": data, "in_memory": "always"},
        "model": {"arch": "resnet18_cifar", "width": args.width},
        "workers": {"groups": [1] * args.groups, "small": 0},
        "plan": {"k": 1.0, "large_batch": {12: args.batch, 16: args.batch}},
        "schedule": {"epochs": args.epochs, "lr": [0.05], "milestones": [], "resolutions": [12, 16],
                     "dropout": {12: 0.0, 16: 0.1}},
        "server": {"order": "arrival"},
        "checkpoint": {"every_epochs": 0},
    }  # fmt: skip


def _limit_worker(config_path: str, result_path: str) -> int:
    """One rank of the no-server limit: this rank's group's mini-epochs, no exchange."""
    import torch
    from mpi4py import MPI

    from ..config import load_config
    from ..data import open_staged
    from ..flat import initial_weights
    from ..plan import plan_from_config
    from ..protocol import Backoff
    from ..schedule import stage_for_commit
    from ..topology import build_topology, init_horovod
    from ..train import group_specs
    from ..worker import group_trainer

    cfg = load_config(config_path)
    world = MPI.COMM_WORLD
    staged = open_staged(cfg.data.path)
    plan = plan_from_config(cfg, cfg.plan.samples_per_epoch or staged.num_samples("train"))
    specs = group_specs(cfg, plan)
    torch.set_num_threads(cfg.threads)
    topo = build_topology(cfg.workers.groups, False, world)  # every rank its own single-rank group
    back = Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    back.wait(world.Ibarrier())  # MPI: start together (the PS clock starts here too)
    t0 = time.perf_counter()
    hvd = init_horovod(topo)
    trainer = group_trainer(cfg, staged, topo, hvd)
    weights, _ = initial_weights(cfg, staged)
    trainer.flat.load_weights(weights)
    g, n = topo.group, cfg.n_groups
    shares = [s.share for s in specs]
    samples, first = 0, time.perf_counter() - t0
    for r in range(cfg.schedule.epochs):
        stage = stage_for_commit(r * n + g, n, cfg.schedule)
        st = trainer.train_mini_epoch(
            r, shares, stage.resolution, specs[g].batch[stage.resolution], stage.lr, stage.dropout
        )
        samples += st.samples
        if r % n == g:
            trainer.evaluate(stage.resolution)
    back.wait(world.Ibarrier())  # MPI: the run ends with its last rank
    seconds = time.perf_counter() - t0
    total = world.allreduce(samples, op=MPI.SUM)  # MPI
    hvd.shutdown()
    if world.Get_rank() == 0:
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump({"samples": total, "seconds": seconds, "start_s": first}, f)
    return 0


def _ps_job(cfg_path: str, out: str, np_: int, timeout: float) -> dict:
    from ..metrics import read_metrics
    from .all import mpirun

    mpirun(np_, ["train", "--config", cfg_path, "--set", f"out={out}"], timeout)
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    end = recs[-1]
    samples = sum(r["samples"] for r in recs if r["type"] == "commit")
    serve = end["server_serve_seconds"]
    return {
        "samples": samples, "seconds": serve, "img_s": samples / serve,
        "server_cpu_seconds": end["server_cpu_seconds"], "server_serve_seconds": end["server_serve_seconds"],
        "commits": end["commits"], "duty": duty_cycle(recs),
    }  # fmt: skip


def duty_cycle(recs: list[dict]) -> float:
    """Training seconds / wall seconds of each group from the start of its first mini-epoch to its
    last push, evaluations left out, summed over groups: one run's own measure of what the pulls,
    pushes and waits cost, which drifting load from other jobs does not skew between variants."""
    train = span = 0.0
    for g in sorted({r["group"] for r in recs if r["type"] == "commit"}):
        commits = [r for r in recs if r["type"] == "commit" and r["group"] == g]
        start, end = commits[0]["wall"] - commits[0]["seconds"], commits[-1]["wall"]
        evals = sum(
            r["seconds"] for r in recs if r["type"] == "eval" and r["group"] == g and r["wall"] <= end
        )
        train += sum(r["seconds"] for r in commits)
        span += end - start - evals
    return train / span


def _limit_job(cfg_path: str, result: str, np_: int, timeout: float) -> dict:
    from .all import mpirun

    mpirun(np_, ["bench", "overhead", "--limit-worker", cfg_path, result], timeout)
    with open(result, encoding="utf-8") as f:
        r = json.load(f)
    return {**r, "img_s": r["samples"] / r["seconds"]}


def main(argv: list[str]) -> int:
    from ..data import SyntheticSpec, prepare
    from ..errors import ConfigError
    from .all import exit_on_sigterm, machine, median_ratio, write_result

    args = _parse(argv)
    if args.limit_worker:
        return _limit_worker(*args.limit_worker)
    exit_on_sigterm()
    if args.groups < 1 or args.repeats < 1 or args.epochs < 1:
        raise ConfigError("bench overhead: --groups, --repeats and --epochs must be >= 1")
    G = args.groups
    ps_runs: list[dict] = []
    limit_runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hdb-overhead-") as tmp:
        data = os.path.join(tmp, "synthetic.h5")
        spec = SyntheticSpec(samples=args.samples, test_samples=args.test_samples, size=16)
        prepare("synthetic", None, "12,16", data, synthetic=spec, log=lambda s: None)
        cfg_path = os.path.join(tmp, "overhead.yaml")
        with open(cfg_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(_config(data, os.path.join(tmp, "unused"), args), f)
        for i in range(args.repeats):
            order = ("ps", "limit") if i % 2 == 0 else ("limit", "ps")
            for kind in order:
                if kind == "ps":
                    ps_runs.append(_ps_job(cfg_path, os.path.join(tmp, f"ps{i}"), G + 1, args.timeout))
                else:
                    limit_runs.append(
                        _limit_job(cfg_path, os.path.join(tmp, f"limit{i}.json"), G, args.timeout)
                    )
            print(
                f"repeat {i + 1}/{args.repeats}: ps {ps_runs[-1]['img_s']:.0f} img/s, "
                f"limit {limit_runs[-1]['img_s']:.0f} img/s",
                flush=True,
            )
    ratio = median_ratio([r["img_s"] for r in ps_runs], [r["img_s"] for r in limit_runs])
    cpu = statistics.median(r["server_cpu_seconds"] / r["server_serve_seconds"] for r in ps_runs)
    ps_img, lim_img = (
        statistics.median(r["img_s"] for r in ps_runs),
        statistics.median(r["img_s"] for r in limit_runs),
    )
    commit_s = statistics.median(r["server_serve_seconds"] / r["commits"] for r in ps_runs)
    duty = statistics.median(r["duty"] for r in ps_runs)
    # Groups run side by side, each through `epochs` mini-epochs: the PS's extra wall time per mini-epoch.
    extra = statistics.median(p["seconds"] - q["seconds"] for p, q in zip(ps_runs, limit_runs)) / args.epochs
    mini_epoch = statistics.median(q["seconds"] - q["start_s"] for q in limit_runs) / args.epochs
    result = {
        "bench": "overhead",
        "command": "python -m hpc_dualbatch bench overhead " + " ".join(argv),
        "params": vars(args),
        "machine": machine(),
        "config": _config("<temporary synthetic file>", "<temporary>", args),
        "jobs": {
            "ps": f"scripts/mpirun_local.sh -np {G + 1} python -m hpc_dualbatch train "
            "--config <config> --set out=<temporary>",
            "limit": f"scripts/mpirun_local.sh -np {G} python -m hpc_dualbatch bench overhead "
            "--limit-worker <config> <result>",
        },
        "ps_runs": ps_runs,
        "limit_runs": limit_runs,
        "ps_img_s": ps_img,
        "limit_img_s": lim_img,
        "ratio": ratio,
        "server_cpu_per_wall": cpu,
        "duty_cycle": duty,
        "seconds_per_commit": commit_s,
        "extra_seconds_per_mini_epoch": extra,
        "limit_seconds_per_mini_epoch": mini_epoch,
        "goal": "ratio >= 0.95 and server_cpu_per_wall <= 0.05",
    }
    print(
        f"overhead: {G} single-rank groups x {args.epochs} mini-epochs of {args.samples // G} samples "
        f"(resnet18_cifar width {args.width}, batch {args.batch}, 12/16 px, 1 thread/rank); "
        f"{args.repeats} alternated pairs, median"
    )
    print(f"{'variant':>16} {'img/s':>8} {'vs limit':>9}")
    print(f"{'ps (G+1 ranks)':>16} {ps_img:8.0f} {ratio:8.3f}x")
    print(f"{'limit (G ranks)':>16} {lim_img:8.0f} {1.0:8.3f}x")
    print(
        f"PS / limit = {ratio:.3f} (goal >= 0.95); server CPU {cpu:.4f} s per wall s (goal <= 0.05); "
        f"{commit_s:.2f} s of serving per commit"
    )
    print(
        f"inside the PS runs, workers trained {duty:.3f} of their time between their first mini-epoch and "
        "their last push (evaluations left out; the rest: pull, push, waits)"
    )
    print(
        f"PS extra wall time per mini-epoch: {1e3 * extra:+.0f} ms (a mini-epoch without the PS: "
        f"{mini_epoch:.2f} s; start-up, {statistics.median(q['start_s'] for q in limit_runs):.2f} s, in both)"
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
