"""Benchmark: what does the parameter server cost a whole run? PS run vs the same work with no server.

    hpc-dualbatch bench overhead [--groups 2] [--repeats 4] [--out results/bench/overhead.json]
                                 [--variant server.poll_max_s=0.001 ...]

Alternated jobs: `ps` (`train`: the server + G single-rank groups, all large, tiny synthetic
data), `overlap` (the same with `server.overlap: true`) and `limit` (G ranks, each one of those
groups, the exchange skipped); with `--variant KEY=VALUE`, a fourth job, `variant` (ps with those
config keys set), alternated with them, so that a server setting is compared in one invocation.
Goal: ps / limit images/s >= 0.95, server CPU s per wall s <= 0.05;
`duty_cycle`, the workers' share of time spent training inside each PS run, needs no second job.
Method: docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time

import yaml

from hpc_dualbatch.bench import _harness as H


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
        # bn_samples: the share of an epoch the default 2,560 is of Fashion-MNIST's 60,000 (~5 %);
        # at 2,560 each recalibration cost more than a 2,000-sample task, all on the group that
        # closed the epoch, and the bench measured where evaluations fell, not the exchange
        "server": {"order": "arrival", "bn_samples": 256}, "checkpoint": {"every_epochs": 0},
    }  # fmt: skip


def _limit_worker(config_path: str, result_path: str) -> int:
    """One rank of the no-server limit: this rank's group's mini-epochs, no exchange."""
    import torch
    from mpi4py import MPI

    from hpc_dualbatch.commands.train import group_specs
    from hpc_dualbatch.config import load_config
    from hpc_dualbatch.data import open_staged
    from hpc_dualbatch.method import schedule
    from hpc_dualbatch.method.plan import plan_from_config
    from hpc_dualbatch.ps import protocol
    from hpc_dualbatch.ps.worker import group_trainer
    from hpc_dualbatch.runtime import flat, topology
    from hpc_dualbatch.runtime.trainer import MiniEpoch

    cfg, world = load_config(config_path), MPI.COMM_WORLD
    staged = open_staged(cfg.data.path)
    specs = group_specs(cfg, plan_from_config(cfg, cfg.plan.samples_per_epoch or staged.num_samples("train")))
    torch.set_num_threads(cfg.threads)
    topo = topology.build_topology(cfg.workers.groups, False, world)  # every rank its own single-rank group
    back = protocol.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    back.wait(world.Ibarrier())  # MPI: start together (the PS clock starts here too)
    t0 = time.perf_counter()
    hvd = topology.init_horovod(topo)
    trainer = group_trainer(cfg, staged, topo, hvd)
    trainer.flat.load_weights(flat.initial_weights(cfg, staged)[0])
    g, n, shares = topo.group, cfg.n_groups, [s.share for s in specs]
    samples, first, trained = 0, time.perf_counter() - t0, 0.0
    for r in range(cfg.schedule.epochs):
        stage = schedule.stage_for_count(r * n + g, n, cfg.schedule)
        batch = specs[g].batch[stage.resolution]
        work = MiniEpoch(r, shares, stage.resolution, batch, stage.lr, stage.dropout)
        samples += trainer.train_mini_epoch(work).samples
        if r == cfg.schedule.epochs - 1:  # the final evaluation, shared by every rank as in the PS run
            trained = time.perf_counter() - t0  # (its Allreduce waits for the last rank)
            trainer.recalibrate(stage.resolution, g, n)
            bufs = trainer.flat.buffers_flat()
            world.Allreduce(MPI.IN_PLACE, bufs)  # MPI: the mean statistics over all ranks
            trainer.flat.load_buffers(bufs / n)
            trainer.evaluate(stage.resolution, g, n)
        elif r % n == g:  # the evaluation the PS run's server asks for, with its recalibration
            trainer.recalibrate(stage.resolution)
            trainer.evaluate(stage.resolution)
    back.wait(world.Ibarrier())  # MPI: the run ends with its last rank
    seconds = time.perf_counter() - t0
    total = world.allreduce(samples, op=MPI.SUM)  # MPI
    finished = world.gather(trained, root=0)  # MPI: when each rank ran out of tasks
    hvd.shutdown()
    if world.Get_rank() == 0:
        tail = sum(max(finished) - t for t in finished) / (len(finished) * seconds)  # as run_end's
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump({"samples": total, "seconds": seconds, "start_s": first, "tail": tail}, f)
    return 0


def ps_summary(recs: list[dict]) -> dict:
    """A PS run's numbers from its metrics records; its clock is the server's serving time."""
    end, samples = recs[-1], sum(r["samples"] for r in recs if r["type"] == "commit")
    serve = end["server_serve_seconds"]
    return {
        "samples": samples, "seconds": serve, "img_s": samples / serve,
        "server_cpu_seconds": end["server_cpu_seconds"], "server_serve_seconds": serve,
        "commits": end["commits"], "duty": duty_cycle(recs), **run_end(recs, serve),
    }  # fmt: skip


def run_end(recs: list[dict], serve: float) -> dict:
    """How a PS run ends, as shares of its `serve` seconds. `tail`: the groups' mean idle time
    from their own last commit to the run's last one (tasks are handed out whole, so the last
    ones end unevenly: up to about one task per group, once per run, whatever its length);
    `final_eval`: the time after the last commit, the final evaluation (shared by the groups)."""
    last: dict[int, float] = {}
    for r in recs:
        if r["type"] == "commit":
            last[r["group"]] = max(last.get(r["group"], 0.0), r["wall"])
    t_last = max(last.values())
    end = max(r["wall"] for r in recs if r["type"] in ("commit", "eval"))
    idle = sum(t_last - t for t in last.values())
    return {"tail": idle / (len(last) * serve), "final_eval": (end - t_last) / serve}


def duty_cycle(recs: list[dict]) -> float:
    """Training seconds / wall seconds of each group from the start of its first mini-epoch to its
    last push, evaluations left out, summed over groups: one run's own measure of what the pulls,
    pushes and waits cost, which drifting load from other jobs does not skew between variants."""
    train = span = 0.0
    for g in sorted({r["group"] for r in recs if r["type"] == "commit"}):
        commits = [r for r in recs if r["type"] == "commit" and r["group"] == g]
        start, end = commits[0]["wall"] - commits[0]["seconds"], commits[-1]["wall"]
        evals = sum(  # an evaluation and the BN recalibration before it
            r["seconds"] + r.get("bn_seconds", 0.0)
            for r in recs
            if r["type"] == "eval" and r["group"] == g and r["wall"] <= end
        )
        train += sum(r["seconds"] for r in commits)
        span += end - start - evals
    return train / span


def main(argv: list[str]) -> int:
    from hpc_dualbatch.data import SyntheticSpec, prepare
    from hpc_dualbatch.runtime.metrics import read_metrics

    p = H.parser(
        "overhead", __doc__, groups=(2, "G single-rank worker groups (PS job: G+1 ranks)"),
        repeats=(4, "pairs of jobs (ps, limit), alternated"), epochs=(4, "epochs per run (= mini-epochs)"),
        samples=(4000, "synthetic training samples (d per epoch)"),
        test_samples=(200, "synthetic test samples (one evaluation/epoch)"),
        width=(16, "resnet18_cifar width (the demo config's 16)"), batch=(64, "B_L at 12 and 16 px"),
        timeout=(300.0, "seconds per job before it counts as hung"),
        variant=([], "a config key of a fourth, alternated job: ps with it set (repeatable)"),
    )  # fmt: skip
    # internal: one rank of a limit job (launched by this module under MPI)
    p.add_argument("--limit-worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = H.start(p, argv, "groups repeats epochs", repeats=1, samples=512, test_samples=64, epochs=2)
    if args.limit_worker:
        return _limit_worker(*args.limit_worker)
    G = args.groups
    variant = [x for kv in args.variant for x in ("--set", kv)]  # (train checks each key and value)
    kinds = ("ps", "overlap", "limit") + ("variant",) * bool(variant)
    with tempfile.TemporaryDirectory(prefix="hdb-overhead-") as tmp:
        data, cfg_path = os.path.join(tmp, "synthetic.h5"), os.path.join(tmp, "overhead.yaml")
        spec = SyntheticSpec(samples=args.samples, test_samples=args.test_samples, size=16)
        prepare("synthetic", None, "12,16", data, synthetic=spec, log=lambda s: None)
        with open(cfg_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(_config(data, os.path.join(tmp, "unused"), args), f)

        def job(kind: str, i: int) -> dict:
            out = os.path.join(tmp, f"{kind}{i}")
            if kind != "limit":
                extra = {"ps": [], "overlap": ["--set", "server.overlap=true"], "variant": variant}[kind]
                sets = ["--set", f"out={out}", *extra]
                H.launch(G + 1, ["train", "--config", cfg_path, *sets], args.timeout)
                return ps_summary(read_metrics(os.path.join(out, "metrics.jsonl")))
            H.launch(G, ["bench", "overhead", "--limit-worker", cfg_path, out], args.timeout)
            with open(out, encoding="utf-8") as f:
                r = json.load(f)
            return {**r, "img_s": r["samples"] / r["seconds"]}

        runs = H.alternate(args.repeats, kinds, job)
    ps, ov, limit = runs["ps"], runs["overlap"], runs["limit"]
    median = statistics.median
    ratio = H.median_ratio([r["img_s"] for r in ps], [r["img_s"] for r in limit])
    ratio_ov = H.median_ratio([r["img_s"] for r in ov], [r["img_s"] for r in limit])
    cpu = median(r["server_cpu_seconds"] / r["server_serve_seconds"] for r in ps)
    # Groups run side by side, each through `epochs` mini-epochs: the PS's extra wall time per mini-epoch.
    extra = median(p["seconds"] - q["seconds"] for p, q in zip(ps, limit)) / args.epochs
    result = {
        "ps_img_s": median(r["img_s"] for r in ps), "limit_img_s": median(r["img_s"] for r in limit),
        "overlap_img_s": median(r["img_s"] for r in ov),
        "ratio": ratio, "ratio_overlap": ratio_ov, "server_cpu_per_wall": cpu,
        "duty_cycle": median(r["duty"] for r in ps), "duty_cycle_overlap": median(r["duty"] for r in ov),
        "tail": median(r["tail"] for r in ps), "tail_limit": median(r["tail"] for r in limit),
        "final_eval": median(r["final_eval"] for r in ps),
        "seconds_per_commit": median(r["server_serve_seconds"] / r["commits"] for r in ps),
        "extra_seconds_per_mini_epoch": extra,
        "limit_seconds_per_mini_epoch": median(q["seconds"] - q["start_s"] for q in limit) / args.epochs,
    }  # fmt: skip
    va = runs.get("variant", [])
    if va:
        result.update({
            "variant": args.variant, "variant_img_s": median(r["img_s"] for r in va),
            "ratio_variant": H.median_ratio([r["img_s"] for r in va], [r["img_s"] for r in limit]),
            "duty_cycle_variant": median(r["duty"] for r in va),
            "server_cpu_per_wall_variant": median(
                r["server_cpu_seconds"] / r["server_serve_seconds"] for r in va
            ),
        })  # fmt: skip
    print(
        f"overhead: {G} single-rank groups x {args.epochs} mini-epochs of {args.samples // G} samples "
        f"(resnet18_cifar width {args.width}, batch {args.batch}, 12/16 px, 1 thread/rank); "
        f"{args.repeats} alternated pairs, median"
    )
    cells = [
        ["ps (G+1 ranks)", result["ps_img_s"], ratio, result["duty_cycle"]],
        ["overlap (G+1 ranks)", result["overlap_img_s"], ratio_ov, result["duty_cycle_overlap"]],
        ["limit (G ranks)", result["limit_img_s"], 1.0, 1.0],
    ]
    if va:
        row = [f"variant: {' '.join(args.variant)}", result["variant_img_s"], result["ratio_variant"]]
        cells.insert(2, row + [result["duty_cycle_variant"]])
    print(H.table("job|img/s:.0f|vs limit:.3f|duty cycle:.3f", cells))
    print(
        f"PS / limit = {ratio:.3f} (goal >= 0.95), with server.overlap {ratio_ov:.3f}; server CPU "
        f"{cpu:.4f} s per wall s (goal <= 0.05); duty cycle: the share of the workers' time between "
        f"their first mini-epoch and last push spent training (the rest: pull, push, waits); PS extra "
        f"wall time per mini-epoch {1e3 * extra:+.0f} ms"
    )
    print(
        (f"variant: server CPU {result['server_cpu_per_wall_variant']:.4f} s per wall s; " if va else "")
        + f"run end (shares of the run): PS groups idle after their last task {result['tail']:.3f} "
        f"(limit ranks {result['tail_limit']:.3f}), PS final evaluation after the last commit "
        f"{result['final_eval']:.3f}: each once per run, so a longer run (--epochs) pays less of them"
    )
    mpirun = shlex.join(H.launcher())
    H.write_result(
        args.out, "overhead", args, argv, config=_config("<temporary synthetic file>", "<temporary>", args),
        jobs={
            "ps": f"{mpirun} -np {G + 1} python -m hpc_dualbatch train --config <config> --set out=<tmp>",
            "overlap": "(ps) --set server.overlap=true",
            **({"variant": "(ps) " + " ".join(variant)} if va else {}),
            "limit": f"{mpirun} -np {G} python -m hpc_dualbatch bench overhead --limit-worker <config> <out>",
        },
        ps_runs=ps, overlap_runs=ov, limit_runs=limit, **({"variant_runs": va} if va else {}), **result,
        goal="ratio >= 0.95 and server_cpu_per_wall <= 0.05",
    )  # fmt: skip
    return 0
