"""`hpc-dualbatch profile` as an MPI job: the time model measured the way `train` trains.

    mpirun -np 5 hpc-dualbatch profile --config CONFIG.yaml --out timing.json [--batches 16,32,64]

The single-process profile (runtime/steptime.py; the command itself is commands/profile.py)
times `engine.train_step` on one fixed batch on an idle core. A run puts the server and every
worker group on the node at once, and a group's step also loads and augments its batch, runs
Horovod's allreduce and optimizer wrapper and more Python. Here the job has the ranks and
placement of `train` (rank 0 where the server is, idle and sleeping; the groups of
`workers.groups`, Horovod on each group's communicator), and every group at once trains real
staged batches through the worker's own `GroupTrainer.train_mini_epoch` (loader, augmentation,
forward/backward, allreduce, optimizer), `--steps` steps per batch size and resolution,
`--repeats` times (the first untimed: warm-up), each group in a different rotation of the batch
sizes so that, as in a run, groups at different batch sizes share the cores.

The seconds per step of every group's leader go to rank 0, which fits `t(x) = a*x + b` per
resolution and role: the large groups' fit is the file's fit (T0, B_L), the small groups' the
entry's "small" fit, from which the planner solves B_S (`plan.plan_dual_batch`). With no small
groups in the config only the large fit is written; with no large groups, the small groups'
points make the file's fit.
"""

from __future__ import annotations

import datetime
import platform
import statistics
from typing import Any

import numpy as np

from hpc_dualbatch.config import small_groups
from hpc_dualbatch.method.timing import TimeFit, fit_linear
from hpc_dualbatch.ps import protocol as P


def rotation(sizes: list[int], group: int, repeat: int) -> list[int]:
    """The order group `group` steps through `sizes` in repeat `repeat` (pure)."""
    k = (group + repeat) % len(sizes)
    return sizes[k:] + sizes[:k]


def role_fits(points: dict[int, dict[int, dict[int, float]]], small: list[bool]) -> tuple[dict, dict]:
    """Fits per resolution for the large and the small role from points[group][res][batch] =
    seconds per step (pure). Returns (large fits, small fits); a role without groups is empty."""
    out: tuple[dict[int, TimeFit], dict[int, TimeFit]] = ({}, {})
    for role, fits in ((False, out[0]), (True, out[1])):
        groups = [g for g in points if small[g] == role]
        if not groups:
            continue
        for res in points[groups[0]]:
            fits[res] = fit_linear([(b, t) for g in groups for b, t in sorted(points[g][res].items())])
    return out


def profile_job(cfg: Any, sizes: dict[int, list[int]], steps: int, repeats: int) -> Any:
    """Run on every rank of the job. Returns (large fits, small fits, meta) on rank 0, else None."""
    import torch
    from mpi4py import MPI

    from hpc_dualbatch.data import open_staged
    from hpc_dualbatch.ps.worker import group_trainer
    from hpc_dualbatch.runtime.topology import build_topology, init_horovod, threads_per_rank
    from hpc_dualbatch.runtime.trainer import MiniEpoch

    world = MPI.COMM_WORLD
    topo = build_topology(cfg.workers.groups, cfg.server.shards, world)
    if topo.shard > 0:  # a server shard beside the one that collects: nothing to measure
        return None
    torch.set_num_threads(threads_per_rank(topo, cfg.threads))  # as `train` sets them
    res_list = list(cfg.schedule.resolutions)
    n_points = sum(len(sizes[r]) for r in res_list)
    back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    if topo.is_server:
        points: dict[int, dict[int, dict[int, float]]] = {}
        buf = np.empty(n_points, np.float64)
        for g, leader in enumerate(topo.leaders):
            P.recv(world, buf, leader, P.TAG_REQ, back)  # PS rank: a leader's seconds per step
            it = iter(buf.tolist())
            points[g] = {r: {b: next(it) for b in sizes[r]} for r in res_list}
        small = small_groups(topo.n_groups, cfg.workers.small)
        large_fits, small_fits = role_fits(points, small)
        if not large_fits:  # every group small: their fit is the file's
            large_fits, small_fits = small_fits, {}
        meta = {
            "mode": "mpi job: train's ranks and placement, whole steps (loader, allreduce, optimizer)",
            "groups": list(cfg.workers.groups),
            "small": cfg.workers.small,
            "steps": steps,
            "repeats": repeats,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "arch": cfg.model.arch,
            "width": cfg.model.width,
            "clock": "wall",
            "inputs": f"staged images from {cfg.data.path} (augmentation as configured)",
            "points": {str(g): {str(r): p for r, p in pts.items()} for g, pts in points.items()},
        }
        return large_fits, small_fits, meta
    hvd = init_horovod(topo)
    trainer = group_trainer(cfg, open_staged(cfg.data.path), topo, hvd)
    times: dict[tuple[int, int], list[float]] = {}
    round_idx = 0
    for res in res_list:
        for rep in range(repeats + 1):  # repeat 0: warm-up, untimed
            for b in rotation(sizes[res], topo.group, rep):
                shares = [0] * topo.n_groups
                shares[topo.group] = steps * b
                st = trainer.train_mini_epoch(MiniEpoch(round_idx, shares, res, b, cfg.schedule.lr[-1], 0.0))
                round_idx += 1
                if rep:
                    times.setdefault((res, b), []).append(st.seconds / steps)
    if topo.is_leader:
        med = np.array([statistics.median(times[(r, b)]) for r in res_list for b in sizes[r]], np.float64)
        world.Send(med, dest=0, tag=P.TAG_REQ)  # PS rank: this group's seconds per step
    hvd.shutdown()
    return None
