"""Benchmark: one push + pull through the parameter-server protocol vs raw Send/Recv of the same bytes.

    mpirun -np 2 python -m hpc_dualbatch bench exchange [--floats 11200000] [--iters 8] [--repeats 5]

Rank 1 plays a group leader, rank 0 the server, with the real `protocol.py` and merge; raw, ps
and ps_nomerge alternate in one job. Goal: ps >= 0.8 x raw. Method: docs/bench.md.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from mpi4py import MPI

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.method.merge import merge_paper as merge
from hpc_dualbatch.ps import protocol as P

VARIANTS = ("raw", "ps", "ps_nomerge")
RESNET18_FLOATS = 11_200_000  # CIFAR ResNet-18 weights (11.17 M parameters + BN buffers)


def _server(world, variant: str, iters: int, w: np.ndarray, wbuf: np.ndarray, back) -> float:
    """Rank 0's side of `iters` round trips; returns the seconds spent in `merge`."""
    hdr = np.zeros(P.HDR_LEN, np.float64)
    merge_s = 0.0
    for _ in range(iters):
        if variant == "raw":
            world.Recv(wbuf, source=1, tag=P.TAG_W)  # MPI: raw receive
            world.Send(w, dest=1, tag=P.TAG_W)  # MPI: raw send
            continue
        status = P.recv(world, hdr, MPI.ANY_SOURCE, P.TAG_REQ, back)  # PS: next request header
        src = status.Get_source()
        P.recv(world, wbuf, src, P.TAG_W, back)  # PS: the group's weights
        if variant == "ps":
            t0 = time.perf_counter()
            merge(w, wbuf, 1.0)
            merge_s += time.perf_counter() - t0
        world.Send(P.Task(P.Status.RUN).pack(), dest=src, tag=P.TAG_REP)  # PS: reply header
        world.Send(w, dest=src, tag=P.TAG_W)  # PS: merged weights
    return merge_s


def _leader(world, variant: str, iters: int, w: np.ndarray, back) -> float:
    """Rank 1's side; returns the wall seconds of the `iters` round trips (what the ratios use)."""
    rep = np.zeros(P.HDR_LEN, np.float64)
    t0 = time.perf_counter()
    for _ in range(iters):
        if variant == "raw":
            world.Send(w, dest=0, tag=P.TAG_W)  # MPI: raw send
            world.Recv(w, source=0, tag=P.TAG_W)  # MPI: raw receive
            continue
        world.Send(P.Request(P.Kind.PUSH, 0).pack(), dest=0, tag=P.TAG_REQ)  # PS: request header
        world.Send(w, dest=0, tag=P.TAG_W)  # PS: the group's weights
        P.recv(world, rep, 0, P.TAG_REP, back)  # PS: reply header
        P.recv(world, w, 0, P.TAG_W, back)  # PS: merged weights
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = H.parser(
        "exchange", __doc__, floats=(RESNET18_FLOATS, "float32 values per weight buffer"),
        iters=(8, "round trips per timed block"), repeats=(5, "blocks per variant (alternated)"),
        poll_min_s=(0.0002, "Backoff first sleep, s (server.poll_min_s)"),
        poll_max_s=(0.02, "Backoff longest sleep, s (server.poll_max_s)"),
    )  # fmt: skip
    args = H.start(p, argv, "floats iters repeats", floats=100_000, iters=2, repeats=2)
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        raise ConfigError(
            f"bench exchange needs exactly 2 MPI ranks (server + leader), got {world.Get_size()}: "
            "run mpirun -np 2 python -m hpc_dualbatch bench exchange"
        )
    rank = world.Get_rank()
    back = P.Backoff(args.poll_min_s, args.poll_max_s)
    w = np.random.default_rng(rank).standard_normal(args.floats, dtype=np.float32)  # touched: no page faults
    wbuf = np.empty_like(w)
    # (repeat, variant) blocks; repeat None: one warm-up round trip of each variant, not timed
    blocks = [(None, v) for v in VARIANTS]
    for i in range(args.repeats):  # the order rotated each repeat
        blocks += [(i, v) for v in VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}  # rank 0: merge s; rank 1: round-trip s
    for i, variant in blocks:
        iters = 1 if i is None else args.iters
        world.Barrier()  # MPI: both sides start a block together
        if rank == 0:
            side = _server(world, variant, iters, w, wbuf, back)
        else:
            side = _leader(world, variant, iters, w, back)
        if i is not None:
            times[variant].append(side / iters)
    merge_s = times["ps"]
    times = world.bcast(times, root=1)  # MPI: the leader's timings to rank 0 (pickled, tiny)
    if rank != 0:
        return 0
    nbytes = 4 * args.floats
    rows = [{
        "variant": v, "seconds_per_trip": statistics.median(times[v]),
        "mb_per_s": 2 * nbytes / statistics.median(times[v]) / 1e6,  # both directions
        "ratio": H.median_ratio(times["raw"], times[v]),  # raw time / variant time = throughput ratio
        "seconds_per_trip_all": times[v],
    } for v in VARIANTS]  # fmt: skip
    merge_ms = 1e3 * statistics.median(merge_s)
    cells = [[r["variant"], 1e3 * r["seconds_per_trip"], r["mb_per_s"], r["ratio"]] for r in rows]
    print(
        f"exchange: {args.floats:,} float32 each way, {args.iters} round trips x {args.repeats} blocks per "
        f"variant, alternated; leader-side times, median\n"
        + H.table("variant|ms/round trip:.2f|MB/s (both ways):,.0f|vs raw:.2f", cells)
        + f"\n({nbytes / 1e6:.1f} MB per direction per round trip; merge alone (server, f=1): "
        f"{merge_ms:.2f} ms per push; ps / raw = {rows[1]['ratio']:.2f}x, without merge "
        f"{rows[2]['ratio']:.2f}x, goal >= 0.8x)"
    )
    H.write_result(
        args.out, "exchange", args, argv, bytes_per_direction=nbytes, rows=rows,
        ratio_ps=rows[1]["ratio"], ratio_ps_nomerge=rows[2]["ratio"], merge_ms=merge_ms,
        merge_mb_per_s=3 * nbytes / (merge_ms / 1e3) / 1e6,  # reads w, wi; writes w (+ wi scratch)
        goal="ratio_ps >= 0.8",
    )  # fmt: skip
    return 0
