"""`hpc-dualbatch train`: start-up checks on every rank, then the server, worker or sync loop.

    mpirun -np 4 hpc-dualbatch train --config hpc_dualbatch/configs/fashion_mnist.yaml --set seed=1
    mpirun -np 4 hpc-dualbatch train --resume runs/fashion_mnist      # continue from the newest checkpoint

Output folder (`out`): config.yaml (resolved), plan.json, command.txt, metrics.jsonl, tb/
(TensorBoard event files: runtime/events.py), checkpoints/ckpt-<commits>.npz, status.json (state
done | preempted | diverged | stalled, final and best test accuracy). What a folder may already
hold: runfolder.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc_dualbatch.atomic import file_kind, open_regular, write_json
from hpc_dualbatch.config import (
    Config,
    adaptive_on,
    config_from_dict,
    load_config,
    planned_resolutions,
    save_config,
    unused_keys,
)
from hpc_dualbatch.errors import CheckpointError, ConfigError, DivergedError, StalledError
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime import runfolder as F
from hpc_dualbatch.runtime.launch import agree
from hpc_dualbatch.runtime.resume import saved_config


@dataclass
class Setup:
    cfg: Config
    staged: Any
    plan: Any
    groups: list  # server.GroupSpec per group
    ckpt: Any  # checkpoint.Checkpoint to resume from (rank 0 only), or None
    lock: Any  # open lock file (rank 0 only)


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if not path and not args.resume:
        raise ConfigError(
            "train needs --config CONFIG.yaml (a new run, e.g. --config "
            "hpc_dualbatch/configs/fashion_mnist.yaml) or --resume RUN_DIR (continue a run)"
        )
    overrides = list(args.set or [])
    if args.resume:
        overrides.append(f"out={args.resume}")
    if args.resume and not path:
        path = os.path.join(args.resume, "config.yaml")
        if file_kind(path) == "missing":  # every checkpoint holds the config it was made with
            newest = C.latest(args.resume)
            if newest is None:
                raise ConfigError(
                    f"--resume {args.resume}: no config.yaml and no checkpoint there; is it a run folder?"
                )
            return config_from_dict(saved_config(C.load(newest)), overrides)
    return load_config(path, overrides)


def group_specs(cfg: Config, plan: Any) -> list:
    """Share, batch per resolution and contribution factor of each group (the last n_S are small)."""
    from hpc_dualbatch.ps.tasks import GroupSpec

    specs = [
        GroupSpec(
            plan.share(g),
            {r: plan.batch(g, r) for r in cfg.schedule.resolutions},
            plan.factor(g, cfg.plan.factor),
            plan.is_small(g),
        )
        for g in range(cfg.n_groups)
    ]
    for g, spec in enumerate(specs):
        for r, b in spec.batch.items():
            if b < cfg.workers.groups[g]:
                raise ConfigError(
                    f"group {g} has {cfg.workers.groups[g]} ranks but its batch at {r}px is {b}: "
                    f"every rank needs at least one sample per step; use fewer ranks per group"
                )
    return specs


def make_adapter(cfg: Config, plan: Any, groups: list) -> Any:
    """The server's adaptive plan (plan.adaptive), or None where there is nothing to adapt: no
    small groups beside large ones, or every B_S given explicitly."""
    from hpc_dualbatch.method.adapt import Adapter
    from hpc_dualbatch.method.plan import small_floor
    from hpc_dualbatch.method.timing import load_timing

    if not adaptive_on(cfg):
        return None
    planned = planned_resolutions(cfg)
    return Adapter(
        load_timing(cfg.plan.timing, planned),
        {r: cfg.plan.large_batch[r] for r in planned},
        {g: dict(spec.batch) for g, spec in enumerate(groups)},
        [spec.small for spec in groups],
        (plan.d_L, plan.d_S),
        cfg.workers.groups,
        load_timing(cfg.plan.timing, planned, role="small"),
        floor=small_floor(cfg),
    )


def setup(args: argparse.Namespace, world: Any) -> Setup:
    from hpc_dualbatch.data import open_staged
    from hpc_dualbatch.method.plan import plan_from_config

    cfg = _config(args)
    from hpc_dualbatch.runtime.topology import check_hetjob, check_world_size

    check_world_size(world.Get_size(), cfg.workers.groups, cfg.n_servers)
    check_hetjob(cfg.workers.groups, cfg.workers.small, cfg.n_servers)
    staged = open_staged(cfg.data.path)
    staged.check_resolutions(cfg.schedule.resolutions)
    staged.check_trainable()
    from hpc_dualbatch.runtime.model import check_model

    check_model(
        cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width, cfg.schedule.resolutions
    )
    d = cfg.plan.samples_per_epoch or staged.num_samples("train")
    plan = plan_from_config(cfg, d)
    groups = group_specs(cfg, plan)
    lock = ck = None
    if world.Get_rank() == 0:
        from hpc_dualbatch.runtime.events import check as check_events

        check_events(cfg.metrics.tensorboard)  # the rank that writes the metrics and event files
        lock, ck = F.prepare_out(cfg, bool(args.resume), staged)
        if ck is not None and ck.momentum.n_groups != cfg.n_groups:
            raise CheckpointError(
                f"checkpoint in {cfg.out} has {ck.momentum.n_groups} groups, config {cfg.n_groups}"
            )
        if ck is not None and file_kind(os.path.join(cfg.out, "config.yaml")) == "missing":
            print(
                f"resume: {cfg.out}/config.yaml was missing; written again from the checkpoint's config",
                flush=True,
            )
        for unused in unused_keys(cfg):
            print(f"warning: {unused}", flush=True)
        try:
            save_config(cfg, os.path.join(cfg.out, "config.yaml"))
            write_json(os.path.join(cfg.out, "plan.json"), plan.to_dict())
            with open_regular(os.path.join(cfg.out, "command.txt")) as f:
                line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} np={world.Get_size()} "
                f.write(f"{line}{shlex.join(['hpc-dualbatch', *sys.argv[1:]])}\n".encode())
        except OSError as e:
            raise F.write_failed(f"the run's files in {cfg.out}", e) from None
    return Setup(cfg, staged, plan, groups, ck, lock)


def run_server(st: Setup, topo: Any, weights: np.ndarray, n_params: int) -> str:
    """Rank 0 of a parameter-server run (shard 0 of `server.shards`): the server's state (new
    from `weights`, the run's initial flat weights with `n_params` parameters, or the
    checkpoint's; with shards, the first slice of them), served until the end."""
    from hpc_dualbatch.ps import checkpoints
    from hpc_dualbatch.ps.server import ParameterServer, ServerState
    from hpc_dualbatch.ps.server_loop import peak_rss_mb, serve
    from hpc_dualbatch.ps.shards import slices, split
    from hpc_dualbatch.runtime.events import open_log

    cfg, ck = st.cfg, st.ckpt
    n_weights, n_buffers = weights.size, weights.size - n_params
    prm, buf = split(*slices(n_weights, cfg.n_servers)[0], n_params)  # this shard's slice
    weights, n_local = weights[prm.start : buf.stop], prm.stop - prm.start
    if ck is not None:
        state = ServerState.from_checkpoint(ck, weights, n_local, cfg.out)
    else:
        state = ServerState.fresh(weights, n_local, cfg.n_groups, outer=cfg.server.outer != "none")
    log = open_log(cfg, ck, cfg.n_groups)
    adapter = make_adapter(cfg, st.plan, st.groups)
    if adapter is not None and ck is not None and "adapt" in ck.extra:
        adapter.load_state(ck.extra["adapt"])  # continue with the batches, shares and windows it had
    server = ParameterServer(cfg, st.groups, state, log, adapter)
    if ck is not None and ck.extra.get("missing_groups"):
        print(
            f"resume: the checkpoint was written without group(s) {ck.extra['missing_groups']} (not heard "
            "from in time): their momentum starts from zero, their unfinished tasks are handed out again",
            flush=True,
        )
    if st.plan.n_small:  # what the plan chose for the small groups, and why where not the formula
        from hpc_dualbatch.method.plan import timing_warning

        res = sorted(st.plan.resolutions.items())
        warning = timing_warning(cfg, st.staged.channels if st.staged is not None else None)
        print(
            "plan: B_S "
            + ", ".join(f"{rp.B_S} at {r} px ({rp.small_source})" for r, rp in res)
            + "".join(f"\nplan: {rp.note}" for _, rp in res if rp.note)
            + (f"\nplan: {warning}" if warning else ""),
            flush=True,
        )

    def end(outcome: str, path: str | None) -> str:
        account = server.account(peak_rss_mb())
        if server.parts is not None and outcome in ("done", "preempted"):  # the other shards' accounts
            account["shards"] = server.parts.stop()
        log.write(
            {
                "type": "end",
                "state": outcome,
                "commits": state.commits,
                "wall": round(server.wall(), 3),
                "server_cpu_seconds": round(server.cpu_seconds, 3),
                "server_serve_seconds": round(server.serve_seconds, 3),
                "server_busy_share": account["busy_share"],
                "server_peak_rss_mb": account["peak_rss_mb"],
            }
        )
        log.close()
        return F.finish(cfg, outcome, state.commits, server.wall(), path, account)

    try:
        outcome = serve(server, topo, n_weights, n_buffers)
    except DivergedError:  # status.json says so, then the job ends with the message (MPI_Abort)
        end("diverged", None)
        raise
    except StalledError as e:  # a group left out: its checkpoint is written; the stalled ranks
        end(e.state, C.latest(cfg.out))  # cannot leave by themselves, so the job ends by MPI_Abort
        raise
    # The state is consistent in both outcomes: a preemption ends after a checkpoint barrier,
    # and a finished run has committed every task. Saving also covers a signal that came
    # before any commit, so a requeued job always finds a checkpoint to resume from.
    return end(outcome, checkpoints.write(server, final=outcome == "done"))


def run_shard(st: Setup, topo: Any, weights: np.ndarray, n_params: int, part: tuple | None) -> None:
    """Server shard s >= 1: its slice of the weights (new, or `part`: (its part of the checkpoint,
    the manifest's outer count)), and shard 0's orders carried out until the end (ps/shards.py)."""
    from hpc_dualbatch.method.merge import Outer, make_rule
    from hpc_dualbatch.ps.shards import ShardState, serve_shard, slices, split

    cfg, s, sv = st.cfg, topo.shard, st.cfg.server
    prm, buf = split(*slices(weights.size, cfg.n_servers)[s], n_params)
    n_local, outer_count = prm.stop - prm.start, 0
    if part is not None:
        mine, outer_count = part
        state = ShardState(mine.weights, n_local, mine.group_buffers, mine.outer, mine.momentum)
    else:
        w = weights[prm.start : buf.stop].copy()
        outer = np.zeros((2, n_local), np.float32) if sv.outer != "none" else None
        state = ShardState(w, n_local, np.repeat(w[None, n_local:], cfg.n_groups, 0), outer)
    outer_ = None
    if state.outer is not None:  # the same steps as shard 0's on this slice (merge.Outer)
        every = 1 if sv.outer == "nesterov" else cfg.n_groups
        outer_ = Outer(sv.outer_lr, sv.outer_momentum, every, state.outer, outer_count)
    rule = make_rule(sv.merge, sv.bn, [g.factor for g in st.groups], state.group_buffers, 0, outer_)
    serve_shard(cfg, topo, state, rule, lambda commits: C.Writer(cfg.out, commits, shard=s))


def shard_part(manifest: str, shard: int) -> tuple:
    """Shard `shard`'s part of the checkpoint `manifest`, and the outer momentum's count."""
    whole = C.load(manifest)
    return C.load_part(whole, manifest, shard), int(whole.extra.get("outer_count", 0))


def run(args: argparse.Namespace) -> int:
    import torch
    from mpi4py import MPI

    from hpc_dualbatch.runtime.topology import build_topology, threads_per_rank

    world = MPI.COMM_WORLD
    st = agree(world, lambda: setup(args, world))
    if world.Get_rank() == 0:
        F.bind_run_files(st.cfg.out, st.staged, st.ckpt)
    topo = agree(world, lambda: build_topology(st.cfg.workers.groups, st.cfg.n_servers, world))
    threads = threads_per_rank(topo, st.cfg.threads)
    if threads < st.cfg.threads and world.Get_rank() == 0:
        print(f"threads: {st.cfg.threads} asked, this process may use {threads} cores: {threads}", flush=True)
    torch.set_num_threads(threads)
    part = None  # a sharded server's resume: each other shard's part, read before anyone starts
    if st.cfg.n_servers > 1:
        found = C.latest(st.cfg.out) if world.Get_rank() == 0 and st.ckpt is not None else None
        manifest = world.bcast(found, root=0)  # MPI: every rank learns it (pickled, a path)
        if manifest is not None:
            part = agree(world, lambda: shard_part(manifest, topo.shard) if topo.shard > 0 else None)  # MPI
    if st.cfg.mode == "sync":
        from hpc_dualbatch.runtime.sync import run_sync

        run_sync(st, topo)
    elif topo.is_server:
        from hpc_dualbatch.runtime.flat import initial_weights

        if topo.shard == 0:
            run_server(st, topo, *initial_weights(st.cfg, st.staged))
        else:
            run_shard(st, topo, *initial_weights(st.cfg, st.staged), part)
    else:
        from hpc_dualbatch.ps.worker import run_worker

        run_worker(st.cfg, topo, st.staged, [g.share for g in st.groups])
    world.Barrier()  # MPI: all ranks leave together; the server has already written status.json
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train (run under mpirun/srun: 1 server + worker groups)")
    p.add_argument("--config", help="YAML config (see hpc_dualbatch/configs/)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. plan.k=1.1"
    )
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    p.set_defaults(func=run)
