"""Benchmark: does the time model predict a planned mini-epoch?

For two resolutions of the config's schedule (default: its lowest and highest)
it runs, in one process, one large-batch mini-epoch (d_L samples at B_L) and
one small-batch mini-epoch (d_S samples at B_S) of the plan, exactly as a
single-rank worker group steps through them (the last step may be short), and
prints the time predicted by the timing file, (a + b/B) * d, next to the
measured time. Goal: within 5 % (the paper reports +-3.5 %).

    python -m hpc_dualbatch.bench.plan [--config hpc_dualbatch/configs/fashion_mnist.yaml]
        [--samples D] [--resolutions 20,28] [--data FILE] [--out results/bench/plan.json]

Without --data the batches are random tensors of the staged shape (the time
model covers the training step only); with --data FILE (a staged HDF5 file)
they come through `TrainLoader` as in the worker, loading and augmentation
included.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Iterator

import torch

from ..atomic import write_json
from ..config import load_config
from ..engine import make_optimizer, pick_device, train_step
from ..errors import PlanError
from ..model import build_model, set_dropout
from ..plan import plan_from_config, samples_per_epoch
from ..schedule import dropout_at, lr_at
from ..timing import load_timing, load_timing_meta, time_per_samples

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "fashion_mnist.yaml")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpc_dualbatch.bench.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.relpath(DEFAULT_CONFIG), help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("--samples", type=int, default=None, help="d, samples per epoch (default: config / data)")
    p.add_argument("--resolutions", default="", help="px, comma-separated (default: lowest,highest)")
    p.add_argument("--data", default="", help="staged HDF5 file: train on real batches through TrainLoader")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per (resolution, role) first")
    p.add_argument("--channels", type=int, default=1, help="input channels without --data")
    p.add_argument("--classes", type=int, default=10, help="classes without --data")
    p.add_argument("--out", default="results/bench/plan.json")
    return p.parse_args(argv)


def _random_batches(
    samples: int, batch: int, shape: tuple[int, int, int], classes: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    full = (
        torch.randn(batch, *shape, generator=gen).to(device),
        torch.randint(0, classes, (batch,)).to(device),
    )
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        yield full if n == batch else (full[0][:n].contiguous(), full[1][:n].contiguous())


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.set)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    staged = None
    channels, classes = args.channels, args.classes
    if args.data:
        from ..data import TrainLoader, open_staged, shard_indices

        staged = open_staged(args.data)
        channels, classes = staged.channels, staged.num_classes
    d = args.samples or (staged.num_samples("train") if staged is not None else samples_per_epoch(cfg))
    plan = plan_from_config(cfg, d)
    if plan.n_small == 0 or plan.n_large == 0:
        raise PlanError("bench plan needs a dual-batch plan (0 < workers.small < number of groups)")
    res_list = (
        [int(r) for r in args.resolutions.split(",") if r.strip()]
        if args.resolutions
        else [cfg.schedule.resolutions[0], cfg.schedule.resolutions[-1]]
    )
    fits = load_timing(cfg.plan.timing, res_list)
    rows: list[dict] = []
    balance: list[dict] = []
    print(
        f"plan: n = {plan.n}, n_S = {plan.n_small}, k = {plan.k:g}, d = {d}; "
        f"d_L = {plan.d_L}, d_S = {plan.d_S}; "
        f"device {device}, {torch.get_num_threads()} thread(s); data: {args.data or 'random tensors'}"
    )
    header = (
        f"{'res px':>6} {'role':>5} {'batch':>5} {'samples':>7} {'steps':>5} "
        f"{'predicted s':>11} {'measured s':>10} {'error':>7} {'CPU s':>8} {'error':>7}"
    )
    print(header)
    for res in res_list:
        rp = plan.at(res)
        for role, batch, share, group in (
            ("large", rp.B_L, plan.d_L, 0),
            ("small", rp.B_S, plan.d_S, plan.n - 1),
        ):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model.arch, classes, channels, cfg.model.width).to(device)
            model.train()
            set_dropout(model, dropout_at(res, cfg.schedule))
            opt = make_optimizer(model, cfg.optim, lr_at(0, cfg.schedule))
            shape = (channels, res, res)
            for x, y in _random_batches(args.warmup * batch, batch, shape, classes, device):
                train_step(model, opt, x, y)
            if staged is not None:
                shares = [plan.share(g) for g in range(plan.n)]
                idx = shard_indices(
                    staged.num_samples("train"), shares, group, 0, 1, 0, cfg.seed, cfg.data.assignment
                )
                batches = TrainLoader(
                    staged, "train", res, idx, batch, augment=cfg.data.augment, flip=cfg.data.flip,
                    pad=cfg.data.pad, seed=cfg.seed, device=device, prefetch=cfg.data.prefetch,
                    in_memory=cfg.data.in_memory, in_memory_max_mb=cfg.data.in_memory_max_mb,
                )  # fmt: skip
            else:
                batches = _random_batches(share, batch, shape, classes, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            seen = 0
            for x, y in batches:
                train_step(model, opt, x, y)  # float(loss) inside synchronises a GPU
                seen += len(y)
            measured, cpu = time.perf_counter() - t0, time.process_time() - c0
            predicted = time_per_samples(fits[res], batch, share)
            err = measured / predicted - 1
            cpu_err = cpu / predicted - 1
            row = {
                "resolution": res,
                "role": role,
                "batch": batch,
                "samples": seen,
                "steps": math.ceil(share / batch),
                "predicted_s": round(predicted, 3),
                "measured_s": round(measured, 3),
                "rel_error": round(err, 4),
                "cpu_s": round(cpu, 3),  # process CPU time: all threads, so = wall only at 1 thread
                "cpu_rel_error": round(cpu_err, 4),
                "budget_s": round(rp.epoch_time, 3) if rp.epoch_time is not None else None,
            }
            rows.append(row)
            print(
                f"{res:6d} {role:>5} {batch:5d} {seen:7d} {row['steps']:5d} "
                f"{predicted:11.2f} {measured:10.2f} {100 * err:+6.1f}% {cpu:8.2f} {100 * cpu_err:+6.1f}%"
            )
        # The balance the plan is for: a small group should take as long as a large one. This
        # ratio, measured within one run, is robust to a machine that is uniformly slower.
        large, small = rows[-2], rows[-1]
        bal = {
            "resolution": res,
            "predicted": round(small["predicted_s"] / large["predicted_s"], 4),
            "wall": round(small["measured_s"] / large["measured_s"], 4),
            "cpu": round(small["cpu_s"] / large["cpu_s"], 4),
        }
        balance.append(bal)
        print(
            f"{res:6d} small/large time: predicted {bal['predicted']:.3f}, "
            f"measured {bal['wall']:.3f} (wall), "
            f"{bal['cpu']:.3f} (CPU)"
        )
    worst = max(abs(r["rel_error"]) for r in rows)
    worst_cpu = max(abs(r["cpu_rel_error"]) for r in rows)
    print(
        f"largest |error|: wall {100 * worst:.1f} %, CPU time {100 * worst_cpu:.1f} % (goal: within 5 %; "
        "compare with the clock the timing file was measured with, meta.clock)"
    )
    result = {
        "bench": "plan",
        "command": "python -m hpc_dualbatch.bench.plan " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": args.config,
        "timing": cfg.plan.timing,
        "data": args.data or "random tensors",
        "plan": plan.to_dict(),
        "rows": rows,
        "balance": balance,
        "timing_clock": load_timing_meta(cfg.plan.timing).get("clock", "wall"),
        "max_abs_rel_error": worst,
        "max_abs_cpu_rel_error": worst_cpu,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from ..launch import run_main

    sys.exit(run_main(main, sys.argv[1:]))
