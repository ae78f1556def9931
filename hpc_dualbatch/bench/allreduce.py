"""Benchmark: the same training step in a 2-rank Horovod group vs one process with the same threads.

    python -m hpc_dualbatch bench allreduce [--width 64] [--batch 64] [--repeats 4]
        [--out results/bench/allreduce.json]

Two kinds of job, alternated (Horovod first in even repeats, single first in odd ones):

    horovod  `scripts/mpirun_local.sh -np 2` (ranks not bound to cores): `hvd.init()` on COMM_WORLD,
             `hvd.DistributedOptimizer`, each rank --threads/2 torch threads and --batch/2
             samples per step (unbound, like the single process)
    single   one plain process: --threads torch threads, --batch samples per step, plain SGD

Both train `resnet18_cifar` (width 64 = the standard ResNet-18, 11.2 M weights, so every step
allreduces 45 MB of gradients) on a fixed random batch of --res px, 1 channel (Fashion-MNIST's
shape); the data pipeline is not part of the step. images/s = total batch x timed steps / seconds
after --warmup untimed steps; the ratio is the median of per-repeat ratios. No goal: this is
what a multi-rank group pays for its allreduce on this machine (the groups of `workers.groups`).

The variants are separate jobs, not blocks of one job, because Horovod's background thread keeps
polling while its job is idle (0.98 CPU s per wall s on rank 1 of an idle 2-rank job, measured
here), which would tax a single-process variant running inside it. A 2-thread process is also
the variant that suffers most when someone else's job takes a core: compare the `load` column
of `bench all`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpc-dualbatch bench allreduce", description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=64, help="resnet18_cifar width (64 = standard ResNet-18)")
    p.add_argument("--batch", type=int, default=64, help="total samples per step (split over the 2 ranks)")
    p.add_argument("--res", type=int, default=28, help="input size, px")
    p.add_argument("--threads", type=int, default=2, help="total torch threads (1 per rank under Horovod)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=4, help="pairs of jobs, alternated")
    p.add_argument("--quick", action="store_true", help="toy sizes for a smoke test")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job before it counts as hung")
    p.add_argument("--out", default="results/bench/allreduce.json")
    p.add_argument("--role", choices=("horovod", "single"), help=argparse.SUPPRESS)  # internal: one job
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.steps, args.warmup, args.repeats = 8, 8, 2, 1, 1
    return args


def _job(args: argparse.Namespace) -> int:
    """One job: time the training step as `args.role`; rank 0 writes {img_s, ...} to args.result."""
    import torch

    from ..config import OptimConfig
    from ..engine import make_optimizer, train_step
    from ..model import build_model

    hvd, rank, size = None, 0, 1
    if args.role == "horovod":
        import horovod.torch as hvd
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)  # Horovod: one group of every rank
        rank, size = hvd.rank(), hvd.size()
        if size != 2:
            from ..errors import ConfigError

            raise ConfigError(f"bench allreduce: the Horovod job needs 2 ranks, got {size}")
    torch.set_num_threads(max(1, args.threads // size))
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", 10, 1, args.width)
    model.train()
    opt = make_optimizer(model, OptimConfig(), lr=0.01)
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())  # Horovod
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # Horovod
    per_rank = args.batch // size
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 1, args.res, args.res, generator=gen)
    y = torch.randint(0, 10, (per_rank,), generator=gen)
    for _ in range(args.warmup):
        train_step(model, opt, x, y)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, x, y)  # the loss .item() waits for the step (and its allreduce)
    seconds = time.perf_counter() - t0
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
    from ..errors import ConfigError
    from .all import exit_on_sigterm, machine, median_ratio, mpirun, run_command, write_result

    args = _parse(argv)
    if args.role:
        return _job(args)
    exit_on_sigterm()
    if args.batch < 2 or args.batch % 2 or args.threads < 2 or args.repeats < 1 or args.steps < 1:
        raise ConfigError(
            "bench allreduce: --batch must be even >= 2, --threads >= 2, --repeats/--steps >= 1"
        )
    shared = [f"--{k}={getattr(args, k)}" for k in ("width", "batch", "res", "threads", "steps", "warmup")]
    runs: dict[str, list[dict]] = {"horovod": [], "single": []}
    with tempfile.TemporaryDirectory(prefix="hdb-allreduce-") as tmp:
        for i in range(args.repeats):
            for role in ("horovod", "single") if i % 2 == 0 else ("single", "horovod"):
                result = os.path.join(tmp, f"{role}{i}.json")
                opts = ["bench", "allreduce", "--role", role, "--result", result, *shared]
                if role == "horovod":
                    mpirun(2, opts, args.timeout)
                else:
                    run_command([sys.executable, "-m", "hpc_dualbatch", *opts], args.timeout)
                with open(result, encoding="utf-8") as f:
                    runs[role].append(json.load(f))
            print(
                f"repeat {i + 1}/{args.repeats}: horovod {runs['horovod'][-1]['img_s']:.1f} img/s, "
                f"single {runs['single'][-1]['img_s']:.1f} img/s",
                flush=True,
            )
    hvd_img = statistics.median(r["img_s"] for r in runs["horovod"])
    one_img = statistics.median(r["img_s"] for r in runs["single"])
    ratio = median_ratio([r["img_s"] for r in runs["horovod"]], [r["img_s"] for r in runs["single"]])
    params = runs["single"][0]["params"]
    result = {
        "bench": "allreduce",
        "command": "python -m hpc_dualbatch bench allreduce " + " ".join(argv),
        "params": vars(args),
        "machine": machine(),
        "model_params": params,
        "runs": runs,
        "horovod_img_s": hvd_img,
        "single_img_s": one_img,
        "ratio": ratio,
    }
    print(
        f"allreduce: resnet18_cifar width {args.width} ({params / 1e6:.2f} M params), "
        f"total batch {args.batch}, {args.res} px, {args.threads} threads in all; "
        f"{args.repeats} alternated pairs, median"
    )
    print(f"{'variant':>28} {'img/s':>8} {'vs single':>10}")
    print(f"{'Horovod, 2 ranks x 1 thread':>28} {hvd_img:8.1f} {ratio:9.3f}x")
    print(f"{'1 process x 2 threads':>28} {one_img:8.1f} {1.0:9.3f}x")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
