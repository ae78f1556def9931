"""Benchmark: one push + pull through the parameter-server protocol vs raw Send/Recv of the same bytes.

    scripts/mpirun_local.sh -np 2 python -m hpc_dualbatch bench exchange [--floats 11200000]
        [--iters 8] [--repeats 5] [--out results/bench/exchange.json]

Rank 1 plays a group leader, rank 0 the server, with the real pieces of `protocol.py` and
`server.py`. One round trip of each variant, as the leader times it:

    raw       leader Send(w) -> server Recv; server Send(w) -> leader Recv (blocking, same bytes)
    ps        leader: request header (TAG_REQ) + weights (TAG_W); server: `protocol.recv` with
              `Backoff` of both, `server.merge`, reply header (TAG_REP) + merged weights (TAG_W);
              leader: `protocol.recv` with `Backoff` of both (what `worker.run_worker` does)
    ps_nomerge  the same without the merge: the protocol's cost alone

The variants alternate in one job (blocks of --iters round trips, the order rotated each
repeat); the ratios are medians of per-repeat ratios. Throughput counts the bytes of both
directions (2 x 4 x floats per round trip). Goal: ps >= 0.8 x raw.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

VARIANTS = ("raw", "ps", "ps_nomerge")
RESNET18_FLOATS = 11_200_000  # CIFAR ResNet-18 weights (11.17 M parameters + BN buffers)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpc-dualbatch bench exchange", description=__doc__.split("\n")[0])
    p.add_argument("--floats", type=int, default=RESNET18_FLOATS, help="float32 values per weight buffer")
    p.add_argument("--iters", type=int, default=8, help="round trips per timed block")
    p.add_argument("--repeats", type=int, default=5, help="blocks per variant (alternated)")
    p.add_argument(
        "--poll-min-s", type=float, default=0.0002, help="Backoff first sleep, s (server.poll_min_s)"
    )
    p.add_argument(
        "--poll-max-s", type=float, default=0.02, help="Backoff longest sleep, s (server.poll_max_s)"
    )
    p.add_argument("--out", default="results/bench/exchange.json")
    return p.parse_args(argv)


def _server(world, variant: str, iters: int, w: np.ndarray, wbuf: np.ndarray, back) -> float:
    """Rank 0's side of `iters` round trips; returns the seconds spent in `merge`."""
    from mpi4py import MPI

    from .. import protocol as P
    from ..merge import merge_paper as merge

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
        world.Send(P.reply(P.Status.RUN), dest=src, tag=P.TAG_REP)  # PS: reply header
        world.Send(w, dest=src, tag=P.TAG_W)  # PS: merged weights
    return merge_s


def _leader(world, variant: str, iters: int, w: np.ndarray, back) -> float:
    """Rank 1's side; returns the wall seconds of the `iters` round trips."""
    from .. import protocol as P

    rep = np.zeros(P.HDR_LEN, np.float64)
    t0 = time.perf_counter()
    for _ in range(iters):
        if variant == "raw":
            world.Send(w, dest=0, tag=P.TAG_W)  # MPI: raw send
            world.Recv(w, source=0, tag=P.TAG_W)  # MPI: raw receive
            continue
        world.Send(P.request(P.Kind.PUSH, 0), dest=0, tag=P.TAG_REQ)  # PS: request header
        world.Send(w, dest=0, tag=P.TAG_W)  # PS: the group's weights
        P.recv(world, rep, 0, P.TAG_REP, back)  # PS: reply header
        P.recv(world, w, 0, P.TAG_W, back)  # PS: merged weights
    return time.perf_counter() - t0


def _table(rows: list[dict], mb: float) -> str:
    lines = [f"{'variant':>11} {'ms/round trip':>14} {'MB/s (both ways)':>17} {'vs raw':>7}"]
    for r in rows:
        ms = 1e3 * r["seconds_per_trip"]
        lines.append(f"{r['variant']:>11} {ms:14.2f} {r['mb_per_s']:17,.0f} {r['ratio']:6.2f}x")
    lines.append(f"({mb:.1f} MB per direction per round trip)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    from .. import protocol as P
    from ..errors import ConfigError
    from .all import machine, median_ratio, write_result

    args = _parse(argv)
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        raise ConfigError(
            f"bench exchange needs exactly 2 MPI ranks (server + leader), got {world.Get_size()}: "
            "run scripts/mpirun_local.sh -np 2 python -m hpc_dualbatch bench exchange"
        )
    if args.floats < 1 or args.iters < 1 or args.repeats < 1:
        raise ConfigError("bench exchange: --floats, --iters and --repeats must be >= 1")
    rank = world.Get_rank()
    back = P.Backoff(args.poll_min_s, args.poll_max_s)
    rng = np.random.default_rng(rank)
    w = rng.standard_normal(args.floats, dtype=np.float32)  # touched: no page faults in the timing
    wbuf = np.empty_like(w)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    merge_s: list[float] = []
    schedule = [("warmup", v) for v in VARIANTS] + [
        (i, VARIANTS[(j + i) % len(VARIANTS)]) for i in range(args.repeats) for j in range(len(VARIANTS))
    ]
    for rep_i, variant in schedule:
        iters = 1 if rep_i == "warmup" else args.iters
        world.Barrier()  # MPI: both sides start a block together
        if rank == 0:
            m = _server(world, variant, iters, w, wbuf, back)
            if variant == "ps" and rep_i != "warmup":
                merge_s.append(m / iters)
        else:
            t = _leader(world, variant, iters, w, back)
            if rep_i != "warmup":
                times[variant].append(t / iters)
    times = world.bcast(times, root=1)  # MPI: the leader's timings to rank 0 (pickled, tiny)
    if rank != 0:
        return 0

    nbytes = 4 * args.floats
    rows = []
    for v in VARIANTS:
        per_trip = statistics.median(times[v])
        rows.append(
            {
                "variant": v,
                "seconds_per_trip": per_trip,
                "mb_per_s": 2 * nbytes / per_trip / 1e6,
                "ratio": median_ratio(times["raw"], times[v]),  # raw time / variant time = throughput ratio
                "seconds_per_trip_all": times[v],
            }
        )
    merge_ms = 1e3 * statistics.median(merge_s)
    result = {
        "bench": "exchange",
        "command": "scripts/mpirun_local.sh -np 2 python -m hpc_dualbatch bench exchange " + " ".join(argv),
        "params": vars(args),
        "machine": machine(),
        "bytes_per_direction": nbytes,
        "rows": rows,
        "ratio_ps": rows[1]["ratio"],
        "ratio_ps_nomerge": rows[2]["ratio"],
        "merge_ms": merge_ms,
        "merge_mb_per_s": 3 * nbytes / (merge_ms / 1e3) / 1e6,  # reads w, wi; writes w (+ wi scratch)
        "goal": "ratio_ps >= 0.8",
    }
    print(
        f"exchange: {args.floats:,} float32 each way, {args.iters} round trips x {args.repeats} blocks per "
        f"variant, alternated; leader-side times, median"
    )
    print(_table(rows, nbytes / 1e6))
    print(
        f"merge alone (server, f=1): {merge_ms:.2f} ms per push; ps / raw = {rows[1]['ratio']:.2f}x, "
        f"without merge {rows[2]['ratio']:.2f}x (goal >= 0.8x)"
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
