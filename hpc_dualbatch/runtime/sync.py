"""Conventional synchronous data-parallel training: the baseline, in the same harness.

Every rank is in one Horovod group (no server); each rank trains at B_L of the
current resolution (the group's batch is B_L x ranks) on its part of the whole
training set every epoch, with the same schedule, model, initial weights,
data pipeline, evaluation, metrics file and checkpoints as the
parameter-server runs, so the results compare directly. Its evaluations use each rank's
running BN statistics, as plain Horovod training does, or (`sync.bn: recalibrate`) statistics
recomputed as the server's are. Under `schedule.average: last_stage` every rank keeps the mean
of its (identical) parameters over the last learning-rate stage, added after every step, and
evaluates and saves that mean (`method/average.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from hpc_dualbatch.errors import DivergedError
from hpc_dualbatch.method.average import TailAverage
from hpc_dualbatch.method.schedule import lr_at, lr_stage, stage_at
from hpc_dualbatch.ps.worker import SignalFlag, group_trainer, reduce_stats
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.events import open_log
from hpc_dualbatch.runtime.flat import initial_weights
from hpc_dualbatch.runtime.metrics import Progress, commit_record, eval_record
from hpc_dualbatch.runtime.runfolder import finish
from hpc_dualbatch.runtime.topology import Topology, init_horovod
from hpc_dualbatch.runtime.trainer import MiniEpoch, MiniEpochStats


def run_sync(st: Any, topo: Topology) -> None:
    cfg, comm = st.cfg, topo.group_comm
    hvd = init_horovod(topo)
    flag = SignalFlag()
    trainer = group_trainer(cfg, st.staged, topo, hvd)
    weights, _ = initial_weights(cfg, st.staged)
    n_p, flat = trainer.flat.n_params, trainer.flat.flat
    momentum = np.zeros(n_p, np.float32)
    average = np.zeros(n_p, np.float32) if cfg.schedule.average != "none" else None
    counters = np.zeros(4, np.float64)  # epochs done, elapsed seconds, steps in the average, resumed
    ck = st.ckpt
    if ck is not None:  # rank 0 loaded it; everyone gets it by broadcast
        weights[:], momentum[:] = ck.weights, ck.momentum.get(0)
        counters[:] = (ck.commits, ck.elapsed, ck.extra.get("average_count", 0), 1)
        if average is not None and ck.average is not None:
            average[:] = ck.average
    comm.Bcast(weights, root=0)  # MPI: group
    comm.Bcast(momentum, root=0)  # MPI
    comm.Bcast(counters, root=0)  # MPI
    tail = None  # schedule.average: the mean of the parameters since the last stage began
    if average is not None:
        comm.Bcast(average, root=0)  # MPI
        tail = TailAverage(n_p, torch.from_numpy(average).to(flat.device), int(counters[2]))
    trainer.flat.load_weights(weights)
    if counters[3]:  # every rank (only rank 0 holds `ck`): replicas that diverge otherwise
        trainer.flat.load_momentum(trainer.opt, momentum)
    start, elapsed = int(counters[0]), float(counters[1])
    log = open_log(cfg, ck, 1) if topo.rank == 0 else None  # one commit per epoch
    progress = Progress()
    d = st.plan.d
    t0 = time.perf_counter()
    state, epoch = "done", start

    def save(epochs_done: int) -> str | None:
        if log is None:
            return None
        return C.save(
            cfg.out,
            C.Checkpoint(
                trainer.flat.weights(),
                C.Momenta.of([trainer.flat.momentum(trainer.opt)], trainer.flat.n_params),
                epochs_done,
                [epochs_done],
                elapsed + time.perf_counter() - t0,
                log.offset(),
                cfg.to_dict(),
                {"average_count": tail.count} if tail is not None else {},
                average=tail.mean.cpu().numpy() if tail is not None else None,
            ),
            keep=cfg.checkpoint.keep,
        )

    def lr_in(epoch: int) -> Any:
        """The LR at the fractional epoch, set per step inside a warm-up (as Horovod's ImageNet
        example does); one rate per epoch elsewhere."""
        if epoch >= cfg.schedule.warmup_epochs:
            return stage_at(epoch, cfg.schedule).lr
        return lambda frac: lr_at(epoch + frac, cfg.schedule)

    for epoch in range(start, cfg.schedule.epochs):
        stage = stage_at(epoch, cfg.schedule)
        batch = st.plan.at(stage.resolution).B_L * topo.group_size
        work = MiniEpoch(epoch, [d], stage.resolution, batch, lr_in(epoch), stage.dropout)
        if tail is not None and lr_stage(epoch, cfg.schedule) == len(cfg.schedule.lr) - 1:
            local = train_averaged(trainer, work, tail)
        else:
            local = trainer.train_mini_epoch(work)
        s, stop = reduce_stats(comm, local, flag.raised)
        if not math.isfinite(s.loss_sum) and log is not None:  # rank 0 ends the job (MPI_Abort)
            log.close()
            finish(cfg, "diverged", epoch, elapsed + time.perf_counter() - t0, None)
            mean = s.loss_sum / max(s.samples, 1)
            raise DivergedError(
                f"training diverged in epoch {epoch + 1}: the train loss is {mean}, at lr {stage.lr:g}, "
                f"optim.momentum {cfg.optim.momentum:g}, batch {batch}, {stage.resolution} px. Lower "
                f"schedule.lr or optim.momentum and start again, or resume from the last checkpoint in "
                f"{cfg.out}/checkpoints"
            )
        bn_secs, trained = None, None
        if tail is not None and tail.count:  # evaluate the mean; train on from the iterate
            trained = trainer.flat.weights()
            with torch.no_grad():
                flat[:n_p].copy_(tail.mean)
        if cfg.sync.bn == "recalibrate":  # MPI: the group's mean statistics (trainer.group_sum)
            bn_secs = trainer.recalibrate(stage.resolution)
        loss, acc, n, secs = trainer.evaluate(stage.resolution)
        if trained is not None and epoch + 1 < cfg.schedule.epochs:  # (the last: the model saved)
            trainer.flat.load_weights(trained)
        wall = elapsed + time.perf_counter() - t0
        if log is not None:
            log.write(
                commit_record(
                    commit=epoch + 1,
                    epoch=epoch + 1,
                    group=0,
                    round_idx=epoch,
                    small=False,
                    samples=s.samples,
                    seconds=s.seconds,
                    train_loss=s.loss_sum / max(s.samples, 1),
                    train_acc=s.correct / max(s.samples, 1),
                    lr=stage.lr,
                    resolution=stage.resolution,
                    batch=batch,
                    wall=wall,
                )
            )
            log.write(
                eval_record(
                    epoch=epoch + 1,
                    group=0,
                    test_loss=loss,
                    test_acc=acc,
                    samples=n,
                    seconds=secs,
                    resolution=stage.resolution,
                    wall=wall,
                    bn=cfg.sync.bn,
                    bn_seconds=bn_secs,
                    averaged=tail.count if tail is not None else None,
                )
            )
            progress.line(
                f"epoch {epoch + 1}/{cfg.schedule.epochs} {stage.resolution}px batch {batch} "
                f"train loss {s.loss_sum / max(s.samples, 1):.3f} test acc {acc:.4f} wall {wall:.0f}s"
            )
        # A signal on any rank (reduced above) stops all of them after this epoch's checkpoint.
        every = cfg.checkpoint.every_epochs
        if stop or (every and (epoch + 1) % every == 0):
            save(epoch + 1)
        if stop:
            state = "preempted" if epoch + 1 < cfg.schedule.epochs else "done"
            epoch += 1
            break
    else:
        epoch = cfg.schedule.epochs
    hvd.shutdown()
    if log is not None:
        path = save(epoch) if state == "done" else C.latest(cfg.out)
        wall = elapsed + time.perf_counter() - t0
        log.write({"type": "end", "state": state, "commits": epoch, "wall": round(wall, 3)})
        log.close()
        finish(cfg, state, epoch, wall, path)


def train_averaged(trainer: Any, work: MiniEpoch, tail: TailAverage) -> MiniEpochStats:
    """A mini-epoch with the parameters added to `tail` after every step: at the trainer's push
    points (after every step but the last, with more parts than steps) and after the last."""
    params = trainer.flat.flat[: trainer.flat.n_params]
    local = trainer.train_mini_epoch(dataclasses.replace(work, pushes=1 << 31), lambda: tail.add(params))
    tail.add(params)
    return local
