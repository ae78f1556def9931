"""Benchmark: one push + pull through the parameter server's real path vs raw Send/Recv of the same bytes.

    mpirun -np 2 python -m hpc_dualbatch bench exchange [--floats 11200000] [--iters 8] [--repeats 5]

Rank 1 plays a group leader, rank 0 the server, each with the code its role runs in a training
job (`protocol.py`'s sleeping receives, replies in flight, the merge rule's `distance` and `fold`, the
leader's update w_i - w_pulled under `delta` and its norm, `flat.push_body`); raw, delta (the
default), paper (the method's rule) and nomerge (the leader's update, no merge) alternate in one
job with wire (the protocol's messages and waits alone, no arithmetic at either end). Goal:
delta >= 0.9 x raw. Method: docs/bench.md.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.method.merge import PushInfo, make_rule
from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.runtime.flat import push_body

VARIANTS = ("raw", "wire", "delta", "paper", "nomerge")
RESNET18_FLOATS = 11_200_000  # CIFAR ResNet-18 weights (11.17 M parameters + BN buffers)
N_BUFFERS = 9_600  # its BN running means and variances (the tail of the flat weights)
GROUPS = 4  # the merge rule's groups (staleness and weights as in a 4-group job)


def _server(world, variant: str, iters: int, w: np.ndarray, wbuf: np.ndarray, back) -> float:
    """Rank 0's side of `iters` round trips, as `server_loop.serve` and `ParameterServer._merge`
    do them; returns the seconds spent merging (distance, fold, BN buffers)."""
    hdr = np.zeros(P.HDR_LEN, np.float64)
    n_p = w.size - N_BUFFERS
    rule = None if variant in ("raw", "wire", "nomerge") else make_rule(
        variant, "average", [1.0] * GROUPS, np.zeros((GROUPS, N_BUFFERS), np.float32), 0
    )  # fmt: skip
    merge_s = 0.0
    flight = P.InFlight()  # replies travel while the next request is received (server_loop.serve)
    for k in range(iters):
        if variant == "raw":
            world.Recv(wbuf, source=1, tag=P.TAG_W)  # MPI: raw receive
            world.Send(w, dest=1, tag=P.TAG_W)  # MPI: raw send
            continue
        status = P.recv(world, hdr, MPI.ANY_SOURCE, P.TAG_REQ, back)  # PS: next request header
        src, norm = status.Get_source(), P.Request.unpack(hdr).norm
        P.recv(world, wbuf, src, P.TAG_W, back)  # PS: the group's parameters (or update), BN buffers
        flight.settle(back)  # the reply in flight reads the weights this push changes
        if rule is not None:
            t0 = time.perf_counter()
            rule.distance(w[:n_p], wbuf[:n_p], norm)  # (delta: the leader's norm; paper: a pass)
            rule.fold(PushInfo(0, k % GROUPS, 0.1, [64] * GROUPS), w[:n_p], wbuf[:n_p])
            rule.fold_buffers(0, w[n_p:], wbuf[n_p:])
            rule.pulled(0, k)
            merge_s += time.perf_counter() - t0
        for buf, tag in (
            (P.Task(P.Status.CONTINUE).pack(), P.TAG_REP),
            (w[:n_p], P.TAG_W),
            (w[n_p:], P.TAG_BN),
        ):
            flight.post(world, buf, src, tag, 0, None)  # PS: reply header, parameters, BN buffers
    flight.settle(back)
    return merge_s


def _leader(world, variant: str, iters: int, w: np.ndarray, back) -> float:
    """Rank 1's side, as `worker.worker_loop`'s leader does it; returns the wall seconds of the
    `iters` round trips (what the ratios use)."""
    rep = np.zeros(P.HDR_LEN, np.float64)
    n_p = w.size - N_BUFFERS
    pulled = w[:n_p].copy() if variant in ("delta", "nomerge") else None  # (they push an update)
    t0 = time.perf_counter()
    for _ in range(iters):
        if variant == "raw":
            world.Send(w, dest=0, tag=P.TAG_W)  # MPI: raw send
            world.Recv(w, source=0, tag=P.TAG_W)  # MPI: raw receive
            continue
        norm = 0.0 if variant == "wire" else push_body(torch.from_numpy(w), pulled, w, n_p)  # (in place)
        world.Send(P.Request(P.Kind.MERGE, 0, norm=norm).pack(), dest=0, tag=P.TAG_REQ)  # PS: request header
        world.Send(w, dest=0, tag=P.TAG_W)  # PS: parameters (or update), BN buffers
        P.recv(world, rep, 0, P.TAG_REP, back)  # PS: reply header
        P.recv(world, w[:n_p], 0, P.TAG_W, back)  # PS: merged parameters
        P.recv(world, w[n_p:], 0, P.TAG_BN, back)  # PS: BN buffers
        if pulled is not None:
            pulled[:] = w[:n_p]
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = H.parser(
        "exchange", __doc__, floats=(RESNET18_FLOATS, "float32 values per weight buffer"),
        iters=(8, "round trips per timed block"), repeats=(5, "blocks per variant (alternated)"),
        poll_min_s=(0.0002, "Backoff first sleep, s (server.poll_min_s)"),
        poll_max_s=(0.005, "Backoff longest sleep, s (server.poll_max_s)"),
    )  # fmt: skip
    args = H.start(p, argv, "floats iters repeats", floats=100_000, iters=2, repeats=2)
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        raise ConfigError(
            f"bench exchange needs exactly 2 MPI ranks (server + leader), got {world.Get_size()}: "
            "run mpirun -np 2 python -m hpc_dualbatch bench exchange"
        )
    if args.floats <= 2 * N_BUFFERS:
        raise ConfigError(f"bench exchange: --floats {args.floats}: must be more than {2 * N_BUFFERS}")
    rank = world.Get_rank()
    back = P.Backoff(args.poll_min_s, args.poll_max_s)
    # touched: no page faults; small values, so that thousands of merges stay finite
    w = 0.01 * np.random.default_rng(rank).standard_normal(args.floats, dtype=np.float32)
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
    merge_s = {v: statistics.median(times[v]) for v in ("delta", "paper")}
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
    ratio = {r["variant"]: r["ratio"] for r in rows}
    cells = [[r["variant"], 1e3 * r["seconds_per_trip"], r["mb_per_s"], r["ratio"]] for r in rows]
    print(
        f"exchange: {args.floats:,} float32 each way, {args.iters} round trips x {args.repeats} blocks per "
        f"variant, alternated; leader-side times, median\n"
        + H.table("variant|ms/round trip:.2f|MB/s (both ways):,.0f|vs raw:.2f", cells)
        + f"\n({nbytes / 1e6:.1f} MB per direction per round trip; merge alone (server): delta "
        f"{1e3 * merge_s['delta']:.2f} ms, paper {1e3 * merge_s['paper']:.2f} ms per push; delta / raw = "
        f"{ratio['delta']:.2f}x (goal >= 0.9x), paper {ratio['paper']:.2f}x, "
        f"without merge {ratio['nomerge']:.2f}x, the protocol alone (wire) {ratio['wire']:.2f}x)"
    )
    H.write_result(
        args.out, "exchange", args, argv, bytes_per_direction=nbytes, rows=rows,
        ratio_delta=ratio["delta"], ratio_paper=ratio["paper"], ratio_nomerge=ratio["nomerge"],
        ratio_wire=ratio["wire"],
        merge_ms_delta=1e3 * merge_s["delta"], merge_ms_paper=1e3 * merge_s["paper"],
        goal="ratio_delta >= 0.9",
    )  # fmt: skip
    return 0
