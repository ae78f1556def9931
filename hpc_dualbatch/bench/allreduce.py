"""Benchmark: one training step in a 2-rank Horovod group vs one process with the same 2 threads.

    hpc-dualbatch bench allreduce [--width 64] [--batch 64] [--repeats 4]

Separate jobs, alternated, not blocks of one job: Horovod's background thread polls while its
job idles (0.98 CPU s per wall s on rank 1 here) and would tax a variant run inside it. No goal:
what a multi-rank group pays for its allreduce on this machine. Method: docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.errors import ConfigError


def _job(args: argparse.Namespace) -> int:
    """One job: time the training step as `args.role`; rank 0 writes {img_s, ...} to args.result."""
    import torch

    hvd, rank, size = None, 0, 1
    if args.role == "horovod":
        import horovod.torch as hvd
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)  # Horovod: one group of every rank
        rank, size = hvd.rank(), hvd.size()
        if size != 2:
            raise ConfigError(f"bench allreduce: the Horovod job needs 2 ranks, got {size}")
    torch.set_num_threads(max(1, args.threads // size))
    model, opt = H.resnet(args.width)
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())  # Horovod
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # Horovod
    per_rank = args.batch // size
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 1, args.res, args.res, generator=gen)
    y = torch.randint(0, 10, (per_rank,), generator=gen)
    H.train_seconds(model, opt, [(x, y)] * args.warmup)
    seconds, _ = H.train_seconds(model, opt, [(x, y)] * args.steps)  # with each step's allreduce
    if hvd is not None:
        # Horovod: the slower rank's time is the group's
        seconds = float(hvd.allreduce(torch.tensor(seconds), op=hvd.Max, name="bench_seconds"))
        hvd.shutdown()
    if rank == 0:
        n_weights = sum(p.numel() for p in model.parameters())
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump({
                "img_s": per_rank * size * args.steps / seconds, "seconds": seconds, "ranks": size,
                "threads_per_rank": torch.get_num_threads(), "params": n_weights,
            }, f)  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    p = H.parser(
        "allreduce", __doc__, width=(64, "resnet18_cifar width (64 = standard ResNet-18)"),
        batch=(64, "total samples per step (split over the 2 ranks)"), res=(28, "input size, px"),
        threads=(2, "total torch threads (1 per rank under Horovod)"), steps=(4, "timed steps per job"),
        warmup=(2, "untimed steps first"), repeats=(4, "pairs of jobs, alternated"),
        timeout=(300.0, "seconds per job before it counts as hung"),
    )  # fmt: skip
    p.add_argument("--role", choices=("horovod", "single"), help=argparse.SUPPRESS)  # internal: one job
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = H.start(p, argv, "repeats steps", width=8, batch=8, steps=2, warmup=1, repeats=1)
    if args.role:
        return _job(args)
    if args.batch < 2 or args.batch % 2 or args.threads < 2:
        raise ConfigError("bench allreduce: --batch must be even >= 2, --threads >= 2")
    shared = [f"--{k}={getattr(args, k)}" for k in ("width", "batch", "res", "threads", "steps", "warmup")]
    with tempfile.TemporaryDirectory(prefix="hdb-allreduce-") as tmp:

        def job(role: str, i: int) -> dict:
            result = os.path.join(tmp, f"{role}{i}.json")
            ranks = 2 if role == "horovod" else 0
            H.launch(ranks, ["bench", "allreduce", "--role", role, "--result", result, *shared], args.timeout)
            with open(result, encoding="utf-8") as f:
                return json.load(f)

        runs = H.alternate(args.repeats, ("horovod", "single"), job)
    img = {role: [r["img_s"] for r in runs[role]] for role in runs}
    ratio, params = H.median_ratio(img["horovod"], img["single"]), runs["single"][0]["params"]
    print(
        f"allreduce: resnet18_cifar width {args.width} ({params / 1e6:.2f} M params), "
        f"total batch {args.batch}, {args.res} px, {args.threads} threads in all; "
        f"{args.repeats} alternated pairs, median"
    )
    hvd_img, one_img = statistics.median(img["horovod"]), statistics.median(img["single"])
    cells = [["Horovod, 2 ranks x 1 thread", hvd_img, ratio], ["1 process x 2 threads", one_img, 1.0]]
    print(H.table("variant|img/s:.1f|vs single:.3f", cells))
    H.write_result(
        args.out, "allreduce", args, argv, model_params=params, runs=runs, horovod_img_s=hvd_img,
        single_img_s=one_img, ratio=ratio,
    )  # fmt: skip
    return 0
