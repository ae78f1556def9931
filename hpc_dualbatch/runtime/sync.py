"""Conventional synchronous data-parallel training: the baseline, in the same harness.

Every rank is in one Horovod group (no server); each rank trains at B_L of the
current resolution (the group's batch is B_L x ranks) on its part of the whole
training set every epoch, with the same schedule, model, initial weights,
data pipeline, evaluation, metrics file and checkpoints as the
parameter-server runs, so the results compare directly. Its evaluations use each rank's
running BN statistics, as plain Horovod training does, or (`sync.bn: recalibrate`) statistics
recomputed as the server's are.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from hpc_dualbatch.errors import DivergedError
from hpc_dualbatch.method.schedule import lr_at, stage_at
from hpc_dualbatch.ps.worker import SignalFlag, group_trainer, reduce_stats
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.events import open_log
from hpc_dualbatch.runtime.flat import initial_weights
from hpc_dualbatch.runtime.metrics import Progress, commit_record, eval_record
from hpc_dualbatch.runtime.runfolder import finish
from hpc_dualbatch.runtime.topology import Topology, init_horovod
from hpc_dualbatch.runtime.trainer import MiniEpoch


def run_sync(st: Any, topo: Topology) -> None:
    cfg, comm = st.cfg, topo.group_comm
    hvd = init_horovod(topo)
    flag = SignalFlag()
    trainer = group_trainer(cfg, st.staged, topo, hvd)
    weights, _ = initial_weights(cfg, st.staged)
    momentum = np.zeros(trainer.flat.n_params, np.float32)
    counters = np.zeros(2, np.float64)  # epochs done, elapsed seconds
    ck = st.ckpt
    if ck is not None:  # rank 0 loaded it; everyone gets it by broadcast
        weights[:], momentum[:], counters[:] = ck.weights, ck.momentum.get(0), (ck.commits, ck.elapsed)
    comm.Bcast(weights, root=0)  # MPI: group
    comm.Bcast(momentum, root=0)  # MPI
    comm.Bcast(counters, root=0)  # MPI
    trainer.flat.load_weights(weights)
    if ck is not None:
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
        s, stop = reduce_stats(comm, trainer.train_mini_epoch(work), flag.raised)
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
        bn_secs = None
        if cfg.sync.bn == "recalibrate":  # MPI: the group's mean statistics (trainer.group_sum)
            bn_secs = trainer.recalibrate(stage.resolution)
        loss, acc, n, secs = trainer.evaluate(stage.resolution)
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
