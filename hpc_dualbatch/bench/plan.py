"""Benchmark: does the time model predict a planned mini-epoch?

    python -m hpc_dualbatch.bench.plan [--config CONFIG] [--samples D] [--resolutions 20,28] [--data FILE]

One large-batch (d_L at B_L) and one small-batch (d_S at B_S) mini-epoch of the plan per
resolution, in one process as a single-rank group steps through them, next to the timing
file's (a + b/B) * d. Goal: within 5 % (the paper: +-3.5 %). Method: docs/bench.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.config import load_config
from hpc_dualbatch.data import TrainLoader, open_staged, shard_indices
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.plan import plan_from_config, samples_per_epoch
from hpc_dualbatch.method.schedule import dropout_at, lr_at
from hpc_dualbatch.method.timing import load_timing, load_timing_meta, time_per_samples
from hpc_dualbatch.runtime.engine import make_optimizer, pick_device
from hpc_dualbatch.runtime.model import build_model, set_dropout


def _random_batches(samples: int, batch: int, shape: tuple, classes: int, device: torch.device) -> Iterator:
    """`samples` samples of one random batch of `shape`, the last batch short as in a mini-epoch."""
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(batch, *shape, generator=gen).to(device),
        torch.randint(0, classes, (batch,)).to(device),
    )
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        yield (x, y) if n == batch else (x[:n].contiguous(), y[:n].contiguous())


def main(argv: list[str]) -> int:
    p = H.parser(
        "plan", __doc__, config=(H.CONFIG, "run config YAML"),
        samples=(0, "d, samples per epoch (default: config / data)"),
        resolutions=("", "px, comma-separated (default: lowest,highest)"),
        data=("", "staged HDF5 file: real batches through TrainLoader (default: random tensors)"),
        warmup=(3, "untimed steps per (resolution, role) first"),
        channels=(1, "input channels without --data"), classes=(10, "classes without --data"),
        set=([], "dotted config override"),
    )  # fmt: skip
    args = H.start(p, argv, samples=512, warmup=1)
    cfg = load_config(args.config, args.set)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    staged = open_staged(args.data) if args.data else None
    channels, classes = (
        (staged.channels, staged.num_classes) if staged is not None else (args.channels, args.classes)
    )
    plan = plan_from_config(
        cfg, args.samples or (staged.num_samples("train") if staged is not None else samples_per_epoch(cfg))
    )
    if plan.n_small == 0 or plan.n_large == 0:
        raise PlanError("bench plan needs a dual-batch plan (0 < workers.small < number of groups)")
    res_list = [int(r) for r in args.resolutions.split(",") if r.strip()]
    res_list = res_list or [cfg.schedule.resolutions[0], cfg.schedule.resolutions[-1]]
    fits = load_timing(cfg.plan.timing, res_list)
    rows: list[dict] = []
    balance: list[dict] = []
    for res in res_list:
        rp = plan.at(res)
        for role, batch, share, group in (
            ("large", rp.B_L, plan.d_L, 0),
            ("small", rp.B_S, plan.d_S, plan.n - 1),
        ):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model.arch, classes, channels, cfg.model.width).to(device).train()
            set_dropout(model, dropout_at(res, cfg.schedule))
            opt = make_optimizer(model, cfg.optim, lr_at(0, cfg.schedule))
            shape = (channels, res, res)
            H.train_seconds(model, opt, _random_batches(args.warmup * batch, batch, shape, classes, device))
            batches = _random_batches(share, batch, shape, classes, device)
            if staged is not None:  # as the worker: this group's shard through TrainLoader
                shares = [plan.share(g) for g in range(plan.n)]
                idx = shard_indices(
                    staged.num_samples("train"), shares, group, 0, 1, 0, cfg.seed, cfg.data.assignment
                )
                batches = TrainLoader(
                    staged, "train", res, idx, batch, augment=cfg.data.augment, flip=cfg.data.flip,
                    pad=cfg.data.pad, seed=cfg.seed, device=device, prefetch=cfg.data.prefetch,
                    in_memory=cfg.data.in_memory, in_memory_max_mb=cfg.data.in_memory_max_mb,
                )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            c0 = time.process_time()
            measured, seen = H.train_seconds(model, opt, batches)
            cpu = time.process_time() - c0  # of the process: all threads, so = wall only at 1 thread
            predicted = time_per_samples(fits[res], batch, share)
            rows.append({
                "resolution": res, "role": role, "batch": batch, "samples": seen,
                "steps": math.ceil(share / batch), "predicted_s": round(predicted, 3),
                "measured_s": round(measured, 3), "rel_error": round(measured / predicted - 1, 4),
                "cpu_s": round(cpu, 3), "cpu_rel_error": round(cpu / predicted - 1, 4),
                "budget_s": round(rp.epoch_time, 3) if rp.epoch_time is not None else None,
            })  # fmt: skip
        # The balance the plan is for: a small group should take as long as a large one. This
        # ratio, measured within one run, is robust to a machine that is uniformly slower.
        large, small = rows[-2], rows[-1]
        pairs = (("predicted", "predicted_s"), ("wall", "measured_s"), ("cpu", "cpu_s"))
        balance.append({"resolution": res, **{k: round(small[key] / large[key], 4) for k, key in pairs}})
    worst = max(abs(r["rel_error"]) for r in rows)
    worst_cpu = max(abs(r["cpu_rel_error"]) for r in rows)
    print(
        f"plan: n = {plan.n}, n_S = {plan.n_small}, k = {plan.k:g}, d = {plan.d}; d_L = {plan.d_L}, "
        f"d_S = {plan.d_S}; device {device}, {torch.get_num_threads()} thread(s); "
        f"data: {args.data or 'random tensors'}"
    )
    keys = "resolution role batch samples steps predicted_s measured_s rel_error cpu_s cpu_rel_error".split()
    cols = "res px|role|batch|samples|steps|predicted s:.2f|measured s:.2f|error:+.1%|CPU s:.2f|error:+.1%"
    print(H.table(cols, [[r[k] for k in keys] for r in rows]))
    for b in balance:
        print(f"{b['resolution']} px small/large time: predicted {b['predicted']:.3f}, "
              f"measured {b['wall']:.3f} (wall), {b['cpu']:.3f} (CPU)")  # fmt: skip
    print(
        f"largest |error|: wall {100 * worst:.1f} %, CPU time {100 * worst_cpu:.1f} % (goal: within 5 %; "
        "compare with the clock the timing file was measured with, meta.clock)"
    )
    H.write_result(
        args.out, "plan", args, argv, device=str(device), config=args.config, timing=cfg.plan.timing,
        data=args.data or "random tensors", plan=plan.to_dict(), rows=rows, balance=balance,
        timing_clock=load_timing_meta(cfg.plan.timing).get("clock", "wall"),
        max_abs_rel_error=worst, max_abs_cpu_rel_error=worst_cpu,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    H.module_main(main)
