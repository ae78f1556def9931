"""Benchmark: the smallest batch that still trains at the schedule's learning rate (the default
floor of B_S, `plan.min_small_batch`).

    hpc-dualbatch bench batchfloor [--file data/fashion-mnist.h5] [--batches 1,2,4,8,16,32,64]

A small group pulls half-trained weights and trains its share at the large groups' learning
rate (method section 1: no scaling with the batch). Per seed: the config's model is trained
--pretrain samples at B_L (warm-up from lr/10), then, from those weights, --samples samples at
each batch of --batches at the first stage's rate. Accuracy on --holdout training images that no
step sees (BN recalibrated as the server does; the test split is never read). A batch trains when
on every seed it ends within --tol points of B_L's continuation. Method: docs/bench.md.
"""

from __future__ import annotations

import copy
import statistics
import tempfile

import numpy as np
import torch

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.config import load_config
from hpc_dualbatch.data import EvalLoader, TrainLoader, open_staged
from hpc_dualbatch.runtime.engine import evaluate, make_optimizer, recalibrate_bn, set_lr, train_step
from hpc_dualbatch.runtime.model import build_model, set_dropout


def _floor(batches: list[int], worst: dict[int, float], tol: float) -> int | None:
    """The smallest batch from which every larger one stays within tol points (worst seed)."""
    floor = None
    for b in sorted(batches, reverse=True):
        if worst[b] < -tol:
            break
        floor = b
    return floor


def main(argv: list[str]) -> int:
    p = H.parser(
        "batchfloor", __doc__, file=("", "staged HDF5 file (default: data/fashion-mnist.h5, else staged)"),
        source=("", "when staging: fashion-mnist (default where installed) or synthetic"),
        resolution=(28, "px (the demo's B_L is smallest there: 64)"), batches=("1,2,4,8,16,32,64", "B tried"),
        pretrain=(12000, "samples at B_L before the branches"), samples=(6000, "samples per branch"),
        holdout=(2000, "training images held out for accuracy"), seeds=("1,2,3", "seeds"),
        tol=(2.0, "points below B_L's continuation a batch may end at"),
        threads=(1, "torch threads (the demo's 1 per rank)"),
    )  # fmt: skip
    args = H.start(
        p, argv, "pretrain samples holdout", source="synthetic", resolution=12, batches="2,8",
        pretrain=64, samples=32, holdout=32, seeds="1",
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    batches = sorted({int(b) for b in args.batches.split(",")})
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = load_config(H.CONFIG)
    lr = cfg.schedule.lr[0]
    with tempfile.TemporaryDirectory(prefix="hdb-batchfloor-") as tmp:
        path = H.staged_file(args.file, args.source, str(args.resolution), tmp)
        staged = open_staged(path)
        r = args.resolution
        B_L = cfg.plan.large_batch.get(r, max(batches))
        n = staged.num_samples("train")
        p_drop = cfg.schedule.dropout.get(r, 0.0)
        rows: dict[int, list[dict]] = {b: [] for b in batches}
        starts = []
        for seed in seeds:
            perm = np.random.default_rng(seed).permutation(n)
            held, pool = np.sort(perm[: args.holdout]), perm[args.holdout :]

            def loader(idx: np.ndarray, batch: int, s: int) -> TrainLoader:
                return TrainLoader(
                    staged, "train", r, idx, batch, pad=cfg.data.pad, flip=cfg.data.flip, seed=s
                )

            def accuracy(model: torch.nn.Module, pool: np.ndarray = pool, held: np.ndarray = held) -> float:
                recalibrate_bn(model, loader(pool[: cfg.server.bn_samples], 256, 0))
                _, correct, m = evaluate(model, EvalLoader(staged, r, held, 1000, split="train"))
                model.train()
                return 100.0 * correct / m

            torch.manual_seed(seed)
            model = build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width).train()
            set_dropout(model, p_drop)
            opt = make_optimizer(model, cfg.optim, lr / 10)
            steps = -(-args.pretrain // B_L)
            for i, (x, y) in enumerate(loader(pool[: args.pretrain], B_L, seed)):
                set_lr(opt, lr / 10 + (lr - lr / 10) * i / max(1, steps - 1))  # linear warm-up
                train_step(model, opt, x, y)
            start = copy.deepcopy(model.state_dict())
            starts.append(accuracy(model))
            branch = pool[args.pretrain : args.pretrain + args.samples]
            for b in batches:
                model.load_state_dict(start)
                opt = make_optimizer(model, cfg.optim, lr)
                losses = [train_step(model, opt, x, y)[0] / len(y) for x, y in loader(branch, b, seed + 1)]
                tail = losses[-max(1, len(losses) // 4) :]
                acc = accuracy(model)
                rows[b].append({"seed": seed, "acc": acc, "loss_tail": statistics.fmean(tail)})
                print(f"seed {seed}  batch {b:4d}: held-out {acc:6.2f} %  train loss (last quarter) "
                      f"{statistics.fmean(tail):.3f}", flush=True)  # fmt: skip
        ref = {s: row["acc"] for s, row in zip(seeds, rows[max(batches)])}
        worst = {b: min(row["acc"] - ref[row["seed"]] for row in rows[b]) for b in batches}
        summary = []
        for b in batches:
            accs = [row["acc"] for row in rows[b]]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            summary.append(
                [b, statistics.fmean(accs), sd, worst[b], max(row["loss_tail"] for row in rows[b])]
            )
        floor = _floor(batches, worst, args.tol)
        print(
            f"batchfloor: {staged.source} at {r} px, {cfg.model.arch} width {cfg.model.width}, lr {lr}, "
            f"{len(seeds)} seeds; from {statistics.fmean(starts):.2f} % after {args.pretrain} samples at "
            f"B_L {B_L}, {args.samples} samples per batch"
        )
        print(H.table("batch|held-out %:.2f|sd:.2f|worst vs B_L:+.2f|worst loss:.3f", summary))
        print(f"smallest batch within {args.tol} points of B_L on every seed (and every larger one): {floor}")
        H.write_result(
            args.out, "batchfloor", args, argv, file=None if path.startswith(tmp) else path,
            source=staged.source, resolution=r, lr=lr, B_L=B_L, start_acc=starts, floor=floor,
            rows={str(b): rows[b] for b in batches},
            goal=f"smallest batch within {args.tol} points of B_L's continuation on every seed",
        )  # fmt: skip
    return 0
