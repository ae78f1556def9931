"""How close a pipelined push + pull could come to raw `Send`/`Recv` (issue 26: "an exchange at
wire speed"): a probe, not the package's path. Two ranks; rank 1 plays a group leader, rank 0 the
server, with the arithmetic of the `delta` path (the leader's update u = w - pulled and its norm,
the server's fold w_s += a*u, the leader's copy of the reply into its model and its pulled copy),
done three ways, alternated in one job (blocks of `--iters`, the order rotated each repeat):

    raw       Send(w) / Recv, Send(w) back / Recv: the bytes alone, no arithmetic
    serial    the arithmetic, each step over the whole vector before the next (the package now)
    pipe<K>   the same arithmetic in K-float chunks, each handed on as soon as it is done: the
              leader sends chunk k while it computes chunk k+1, the server folds chunk k and sends
              its merged weights back (final until the next push) while chunk k+1 arrives, the
              leader copies reply chunks in as they come. Two processes on two cores work on
              different chunks at once, which the serial path never does.

    scripts/mpirun_local.sh -np 2 .venv/bin/python results/bench/pipeline.py \\
        [--floats 11200000] [--chunks 262144,1048576] [--iters 8] [--repeats 5] [--out FILE]

Prints each variant's median round trip as the leader times it, and its ratio to raw.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch
from chunkfold import chunks, options  # (results/bench/, this script's folder)
from mpi4py import MPI

from hpc_dualbatch.bench import _harness as H

TAG_U, TAG_W = 41, 42
A = 0.25  # the fold's weight (4 equal groups)


def leader(world, v: str, parts: list[slice], w, pulled, out, buf) -> None:
    tw, tp, to, tb = (torch.from_numpy(x) for x in (w, pulled, out, buf))
    if v == "raw":
        world.Send(w, dest=0, tag=TAG_U)  # MPI
        world.Recv(buf, source=0, tag=TAG_W)  # MPI
        return
    if v == "serial":
        torch.sub(tw, tp, out=to)
        float(torch.linalg.vector_norm(to))  # the norm the request header carries
        world.Send(out, dest=0, tag=TAG_U)  # MPI
        world.Recv(buf, source=0, tag=TAG_W)  # MPI
        tp.copy_(tb)
        tw.copy_(tb)
        return
    recvs = [world.Irecv(buf[sl], source=0, tag=TAG_W) for sl in parts]  # MPI: the reply's chunks
    sends, sq = [], 0.0
    for sl in parts:
        torch.sub(tw[sl], tp[sl], out=to[sl])
        sq += float(torch.linalg.vector_norm(to[sl])) ** 2  # (sent as a trailer, or per chunk)
        sends.append(world.Isend(out[sl], dest=0, tag=TAG_U))  # MPI: chunk k travels ...
    for req, sl in zip(recvs, parts):  # ... while k+1 is computed; the reply copied in as it comes
        req.Wait()  # MPI
        tp[sl].copy_(tb[sl])
        tw[sl].copy_(tb[sl])
    MPI.Request.Waitall(sends)  # MPI


def server(world, v: str, parts: list[slice], ws, rbuf) -> None:
    tw, tr = torch.from_numpy(ws), torch.from_numpy(rbuf)
    if v == "raw":
        world.Recv(rbuf, source=1, tag=TAG_U)  # MPI
        world.Send(ws, dest=1, tag=TAG_W)  # MPI
        return
    if v == "serial":
        world.Recv(rbuf, source=1, tag=TAG_U)  # MPI
        tw.add_(tr, alpha=A)
        world.Send(ws, dest=1, tag=TAG_W)  # MPI
        return
    recvs = [world.Irecv(rbuf[sl], source=1, tag=TAG_U) for sl in parts]  # MPI
    sends = []
    for req, sl in zip(recvs, parts):
        req.Wait()  # MPI: chunk k in
        tw[sl].add_(tr[sl], alpha=A)
        sends.append(world.Isend(ws[sl], dest=1, tag=TAG_W))  # MPI: its merged weights back
    MPI.Request.Waitall(sends)  # MPI


def main() -> None:
    args = options(__doc__, "pipeline.py")
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), args.floats
    variants = ["raw", "serial"] + [f"pipe{c}" for c in args.chunks.split(",")]
    rng = np.random.default_rng(rank)
    bufs = [rng.standard_normal(n).astype(np.float32) for _ in range(4 if rank == 1 else 2)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            parts = chunks(n, int(v[4:])) if v.startswith("pipe") else []
            for _ in range(args.iters):
                world.Barrier()  # MPI: both ranks start the round trip together
                t0 = time.perf_counter()
                if rank == 1:
                    leader(world, v, parts, *bufs)
                    times[v].append(time.perf_counter() - t0)
                else:
                    server(world, v, parts, *bufs)
    if rank != 1:
        return
    med = {v: statistics.median(times[v]) for v in variants}
    rows = [
        {"variant": v, "round_trip_ms": 1e3 * med[v], "raw_over_this": med["raw"] / med[v]} for v in variants
    ]
    for row in rows:
        print(f"{row['variant']:>14s}  {row['round_trip_ms']:6.2f} ms  {row['raw_over_this']:.3f}x raw")
    if args.out:
        H.write_result(args.out, "pipeline", args, sys.argv[1:], rows=rows)


if __name__ == "__main__":
    main()
