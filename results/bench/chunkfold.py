"""Would the server gain from folding a push chunk by chunk as it arrives (issue 26, "the body
received in chunks, each merged while the next arrives")? Two ranks, as `bench exchange`: rank 1
sends a push body (an update of `--floats` float32), rank 0 receives it and folds it into its
weights (`w += a*u`, the `delta` rule's one pass), then answers with one float so that the leader
times the whole push. Variants, alternated in one job (blocks of `--iters`, the order rotated
each repeat), each timed by the leader (round trip) and by the server (receive + fold):

    whole     one message; the fold after the whole body is in (the server today)
    chunk<K>  K-float messages; each chunk folded right after it arrives, while it is in cache,
              before the next is received (the receiver does the copy: shared-memory MPI has no
              progress in the background, so the gain can only be the cache)
    nofold    one message, no fold: the transfer alone

    scripts/mpirun_local.sh -np 2 .venv/bin/python results/bench/chunkfold.py \\
        [--floats 11200000] [--iters 8] [--repeats 5] [--out results/bench/chunkfold.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpc_dualbatch.bench import _harness as H

TAG = 31


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)] if size else [slice(0, n)]


def options(doc: str, name: str) -> argparse.Namespace:
    """The probes' options (this one's and pipeline.py's), checked on exactly 2 ranks, each
    with one torch thread: a training job's ranks on a shared node (`threads_per_rank`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floats", type=int, default=11_200_000)  # CIFAR ResNet-18, as bench exchange
    p.add_argument("--chunks", default="262144,1048576")  # floats per message: 1 MiB, 4 MiB
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if MPI.COMM_WORLD.Get_size() != 2:
        sys.exit(f"{name}: run on exactly 2 ranks (mpirun -np 2)")
    torch.set_num_threads(1)
    return args


def main() -> None:
    args = options(__doc__, "chunkfold.py")
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), args.floats
    sizes = [int(c) for c in args.chunks.split(",")]
    variants = ["whole", "nofold"] + [f"chunk{c}" for c in sizes]
    rng = np.random.default_rng(rank)
    body = rng.standard_normal(n).astype(np.float32)  # the leader's update / the server's buffer
    w = rng.standard_normal(n).astype(np.float32)  # the server's weights
    tw, tb = torch.from_numpy(w), torch.from_numpy(body)
    ack = np.zeros(1, np.float32)
    times: dict[str, list[float]] = {v: [] for v in variants}
    server_s: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            parts = chunks(n, 0 if v in ("whole", "nofold") else int(v[5:]))
            for _ in range(args.iters):
                world.Barrier()  # MPI: both ranks start the round trip together
                t0 = time.perf_counter()
                if rank == 1:
                    for sl in parts:
                        world.Send(body[sl], dest=0, tag=TAG)  # MPI: the push, chunk by chunk
                    world.Recv(ack, source=0, tag=TAG)  # MPI: the server is done with it
                    times[v].append(time.perf_counter() - t0)
                else:
                    for sl in parts:
                        world.Recv(body[sl], source=1, tag=TAG)  # MPI: one chunk
                        if v != "nofold" and len(parts) > 1:
                            tw[sl].add_(tb[sl], alpha=0.25)  # folded while the chunk is in cache
                    if v == "whole":
                        tw.add_(tb, alpha=0.25)
                    server_s[v].append(time.perf_counter() - t0)
                    world.Send(ack, dest=1, tag=TAG)  # MPI
    leader = world.bcast(times, root=1)  # MPI: the leader's times to rank 0
    if rank != 0:
        return
    med = {v: statistics.median(leader[v]) for v in variants}
    srv = {v: statistics.median(server_s[v]) for v in variants}
    rows = [
        {"variant": v, "push_ms": 1e3 * med[v], "server_ms": 1e3 * srv[v], "vs_whole": med[v] / med["whole"]}
        for v in variants
    ]
    for row in rows:
        print(
            f"{row['variant']:>14s}  push {row['push_ms']:6.2f} ms  server {row['server_ms']:6.2f} ms"
            f"  {row['vs_whole']:.3f}x whole"
        )
    if args.out:
        H.write_result(args.out, "chunkfold", args, sys.argv[1:], rows=rows)


if __name__ == "__main__":
    main()
