"""`hpc-dualbatch info`: versions of everything the package stands on, and an MPI self-check.

hpc-dualbatch info                       # versions, Horovod build flags
mpirun -np 4 hpc-dualbatch info --check  # + split into groups, allreduce inside each
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("hpc_dualbatch", "torch", "torchvision", "numpy", "h5py", "mpi4py", "horovod"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - report, do not fail: this is a diagnostic
            out[name] = f"MISSING ({type(e).__name__}: {e})"
    try:
        from mpi4py import MPI

        out["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        out["mpi_thread_level"] = {
            MPI.THREAD_SINGLE: "single",
            MPI.THREAD_FUNNELED: "funneled",
            MPI.THREAD_SERIALIZED: "serialized",
            MPI.THREAD_MULTIPLE: "multiple",
        }[MPI.Query_thread()]
    except Exception as e:  # noqa: BLE001
        out["mpi_library"] = f"MISSING ({e})"
    try:
        import horovod.torch as hvd

        out["horovod_pytorch"] = True
        out["horovod_mpi_built"] = bool(hvd.mpi_built())
        out["horovod_nccl_built"] = bool(hvd.nccl_built())
        out["horovod_gloo_built"] = bool(hvd.gloo_built())
    except Exception as e:  # noqa: BLE001
        out["horovod_pytorch"] = f"NO ({type(e).__name__}: {e})"
    import torch

    out["cuda_devices"] = torch.cuda.device_count()
    return out


def mpi_check(groups: list[int]) -> str:
    """Split the world as the trainer does and allreduce inside each group; returns a summary."""
    import torch
    from mpi4py import MPI

    from hpc_dualbatch.runtime.topology import build_topology, init_horovod

    topo = build_topology(groups, servers=1)
    got = -1.0
    if not topo.is_server:
        hvd = init_horovod(topo)
        # Each rank contributes its world rank: the group sum must be the sum of its own ranks only.
        got = float(hvd.allreduce(torch.tensor([float(topo.rank)]), op=hvd.Sum).item())  # Horovod: group
        hvd.shutdown()
    results = topo.world.gather((topo.rank, topo.group, got), root=0)  # MPI: summary to rank 0
    if topo.rank != 0:
        return ""
    lines, ok = [], True
    for g in range(len(groups)):
        members = [r for r, gi, _ in results if gi == g]
        sums = {s for r, gi, s in results if gi == g}
        ok &= sums == {float(sum(members))}
        lines.append(f"group {g}: ranks {members} allreduce sum {sorted(sums)} expected {sum(members)}")
    lines.append(f"MPI check {'passed' if ok else 'FAILED'} on {MPI.COMM_WORLD.Get_size()} ranks")
    if not ok:
        raise RuntimeError("\n".join(lines))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.check:
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        if size < 2:
            raise SystemExit("info --check needs at least 2 ranks: mpirun -np 4 hpc-dualbatch info --check")
        # One server and the rest as groups of at most 2 ranks, e.g. 4 ranks -> [2, 1].
        rest, groups = size - 1, []
        while rest:
            groups.append(min(2, rest))
            rest -= groups[-1]
        summary = mpi_check(groups)
        if summary:
            print(summary)
        return 0
    for k, v in versions().items():
        print(f"{k:20s} {v}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="print versions and build flags; --check: MPI + Horovod self-check")
    p.add_argument("--check", action="store_true", help="under mpirun: split into groups and allreduce")
    p.set_defaults(func=run)
