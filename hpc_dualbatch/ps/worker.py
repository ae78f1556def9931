"""A worker group's driver: Horovod data-parallel training of mini-epochs, driven by the server.

`worker_loop` is the group's side of the protocol in `protocol.py`: the leader
talks to the server, the other ranks of the group receive what it got by a
broadcast on the group communicator. The training itself is `trainer.GroupTrainer`,
which knows no communicator; `group_trainer` builds it with Horovod's optimizer and
the group's MPI sum (the synchronous baseline and the profiler use it too).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from mpi4py import MPI

from hpc_dualbatch.config import Config
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.method.merge import pushes_update
from hpc_dualbatch.method.schedule import eval_resolution, task_momentum, task_rate
from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.ps.shards import slices, split
from hpc_dualbatch.runtime.flat import push_body
from hpc_dualbatch.runtime.topology import Topology
from hpc_dualbatch.runtime.trainer import GroupTrainer, MiniEpoch, MiniEpochStats


def group_trainer(cfg: Config, staged: Any, topo: Topology, hvd: Any) -> GroupTrainer:
    """A GroupTrainer whose gradients Horovod averages over the rank's group (hvd was
    initialised on topo.group_comm: topology.init_horovod)."""
    comm = topo.group_comm

    def wrap(opt: Any, named_parameters: Any) -> Any:
        return hvd.DistributedOptimizer(opt, named_parameters=named_parameters)  # Horovod: group allreduce

    def group_sum(a: np.ndarray) -> None:
        comm.Allreduce(MPI.IN_PLACE, a)  # MPI: sum over the group's ranks

    return GroupTrainer(cfg, staged, topo, wrap, group_sum)


def reduce_stats(comm: Any, st: MiniEpochStats, flag: int) -> tuple[MiniEpochStats, bool]:
    """Group sums of a mini-epoch's stats (seconds and wait stay this rank's), and whether any
    rank was signalled (SIGTERM/SIGUSR1 may reach any rank; the leader must learn of it)."""
    tot = np.array([st.loss_sum, st.correct, st.samples, 1 if flag else 0], np.float64)
    comm.Allreduce(MPI.IN_PLACE, tot)  # MPI: group sums of loss, correct, samples, signals
    return MiniEpochStats(int(tot[2]), st.seconds, float(tot[0]), int(tot[1]), st.wait), bool(tot[3])


class SignalFlag:
    """Set by SIGTERM / SIGUSR1 (what Slurm sends before a time limit): the run checkpoints and stops.

    Workers must not die on these signals: the server needs them for the checkpoint barrier.
    """

    def __init__(self) -> None:
        self.raised = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = signum


# Python hands the GIL to a waiting thread after this many seconds (default 5 ms). A leader
# asleep in Backoff while its loader thread holds the GIL woke up to 6 ms late at 5 ms and 0.7 ms
# at 0.5 ms (a sleeping thread beside a busy Python thread, this machine); the simulator's fitted
# wake-up of a worker (2.5 ms mean, simulate check) is that wait.
SWITCH_INTERVAL_S = 0.0005


def run_worker(cfg: Config, topo: Topology, staged: Any, shares: list[int]) -> None:
    """A worker rank of a parameter-server run: Horovod on the group, the real trainer, the loop."""
    from hpc_dualbatch.runtime.topology import init_horovod

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if cfg.server.overlap and MPI.Query_thread() < MPI.THREAD_MULTIPLE:  # (the push's thread calls MPI)
        raise ConfigError(
            "config key 'server.overlap' is true, but this MPI library gives threads less than "
            "MPI_THREAD_MULTIPLE support; set server.overlap: false, or use an MPI built with it"
        )
    hvd = init_horovod(topo)
    worker_loop(cfg, topo, group_trainer(cfg, staged, topo, hvd), shares, SignalFlag())
    hvd.shutdown()


class Trainer(Protocol):
    """What the worker loop needs of a group's trainer (`trainer.GroupTrainer`; tests fake it)."""

    flat: Any  # flat.FlatModel: the weights and momentum as flat float32 buffers
    opt: Any

    def train_mini_epoch(self, work: MiniEpoch, exchange: Callable[[], None] | None) -> MiniEpochStats: ...

    def recalibrate(self, resolution: int, slot: int = 0, slots: int = 0) -> float: ...

    def evaluate(self, resolution: int, slot: int = 0, slots: int = 0) -> tuple[float, float, int, float]: ...


def worker_loop(cfg: Config, topo: Topology, trainer: Trainer, shares: list[int], flag: Any) -> None:
    """The group's loop: pull, (evaluate,) train in parts with a push after each, until STOP.

    `flag.raised`: a signal number, or 0. The leader talks to the server; every rank of the group
    gets the reply (`P.Task`) and the weights by a broadcast.
    """
    back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    world, gcomm, n_p = topo.world, topo.group_comm, trainer.flat.n_params
    rep = np.zeros(P.HDR_LEN, np.float64)
    w = np.empty(trainer.flat.n_weights, np.float32)
    state = np.empty(n_p, np.float32)
    # delta, nova: the leader keeps the parameters it pulled and pushes its update (merge.py)
    pulled = np.empty(n_p, np.float32) if topo.is_leader and pushes_update(cfg.server.merge) else None
    # each server shard's slice of the flat weights: its parameters and its BN buffers (shards.py)
    parts = [
        (rank, *split(lo, hi, n_p)) for rank, (lo, hi) in zip(topo.servers, slices(w.size, len(topo.servers)))
    ]

    def exchange(req: P.Request, push: bool) -> None:
        """Leader: send a request (and weights), wait for the reply; answer state requests."""
        nonlocal waited
        if push:  # the update since the pull (delta, nova) or the weights (paper), and its norm
            req = replace(req, norm=trainer.flat.push_body(pulled, w))
        t0 = time.perf_counter()
        world.Send(req.pack(), dest=0, tag=P.TAG_REQ)  # PS: request header (shard 0 decides)
        if push:
            for rank, prm, buf in parts:  # each shard its slice: parameters (or update), BN buffers
                world.Send(w[prm.start : buf.stop], dest=rank, tag=P.TAG_W)  # PS
        receive()
        if req.kind == P.Kind.MERGE:  # (Request.waited: the server's part of a push inside a task)
            waited += time.perf_counter() - t0

    def receive() -> None:
        """Leader: the reply to a request (answering state requests first), its weights into `w`."""
        while True:
            P.recv(world, rep, 0, P.TAG_REP, back)  # PS: reply header
            if P.Task.unpack(rep).status != P.Status.SEND_STATE:
                break
            trainer.flat.momentum(trainer.opt, state)
            for rank, prm, _ in parts:
                world.Send(state[prm], dest=rank, tag=P.TAG_OPT)  # PS: checkpoint (each shard its slice)
        recv_slices(world, parts, w, back)  # PS: merged parameters and BN buffers
        if pulled is not None:
            pulled[:] = w[:n_p]
        if P.Task.unpack(rep).has_state:
            for rank, prm, _ in parts:
                P.recv(world, state[prm], rank, P.TAG_OPT, back)  # PS: momentum on resume

    waited = 0.0  # since the last commit (Request.waited)
    # server.overlap: the leader's mid-task push travels on a thread while the group trains on
    ahead = Ahead(world, parts, back, n_p, w.size, pulled) if cfg.server.overlap and topo.is_leader else None
    in_flight = False  # (every rank of the group keeps it: they share the leader's corrections)

    def settle_ahead() -> None:
        """All ranks: the push in flight answered; every rank takes the leader's corrected weights."""
        nonlocal in_flight
        if in_flight:
            if ahead is not None:
                trainer.flat.weights(w)
                ahead.settle(w)
            P.bcast(gcomm, w, back)  # MPI: the leader's weights to the whole group
            trainer.flat.load_weights(w)
            in_flight = False

    def push_ahead() -> None:
        """All ranks, at a push point inside a task (server.overlap): the push before it settled,
        this one started; the group trains on."""
        nonlocal in_flight
        if in_flight:
            settle_ahead()  # (w now holds the weights the group has)
        elif ahead is not None:
            trainer.flat.weights(w)
        if ahead is not None:
            ahead.start(P.Request(P.Kind.MERGE, topo.group, task.round), w)
        in_flight = True

    def share_reply() -> P.Task:
        P.bcast(gcomm, rep, back)  # MPI: the leader's reply to the whole group
        P.bcast(gcomm, w, back)  # MPI
        task = P.Task.unpack(rep)
        if task.has_state:
            P.bcast(gcomm, state, back)  # MPI
        return task

    def share_statistics() -> None:
        """All ranks, in a shared final evaluation: the group's BN statistics to the server, the
        mean over every group's back (`evaluation.py`)."""
        bufs = trainer.flat.buffers_flat()
        if topo.is_leader:
            world.Send(P.Request(P.Kind.STATS, topo.group).pack(), dest=0, tag=P.TAG_REQ)  # PS: header
            world.Send(bufs, dest=0, tag=P.TAG_BN)  # PS: the group's statistics
            P.recv(world, rep, 0, P.TAG_REP, back)  # PS: header (STOP)
            P.recv(world, bufs, 0, P.TAG_BN, back)  # PS: the mean over all groups' ranks
        P.bcast(gcomm, bufs, back)  # MPI: to the whole group
        trainer.flat.load_buffers(bufs)

    def mid_task_push() -> None:
        """All ranks: the leader pushes the weights so far and pulls the merged ones."""
        if topo.is_leader:
            exchange(P.Request(P.Kind.MERGE, topo.group, task.round), push=True)
        share_reply()
        trainer.flat.load_weights(w)

    if topo.is_leader:
        exchange(P.Request(P.Kind.HELLO, topo.group), push=False)
    slept = (back.sleeps, back.late)  # the leader's Backoff at its last commit (Request.sleeps)
    task = share_reply()
    while True:
        trainer.flat.load_weights(w)
        if task.has_state:
            trainer.flat.load_momentum(trainer.opt, state)
        if task.eval_epoch >= 0:
            res = eval_resolution(task.eval_epoch, cfg.schedule)  # (not the new task's: see there)
            part = (task.eval_slot, task.eval_slots)  # (slots 0: the group alone)
            bn_secs = trainer.recalibrate(res, *part) if cfg.server.bn == "recalibrate" else 0.0
            if task.eval_slots:
                share_statistics()
            loss, acc, n, secs = trainer.evaluate(res, *part)
            if topo.is_leader:
                ev = P.Evaluation(task.eval_epoch, loss, acc, n, secs, res, bn_secs)
                world.Send(
                    P.Request(P.Kind.EVAL, topo.group, evaluation=ev).pack(), dest=0, tag=P.TAG_REQ
                )  # PS
                world.Send(trainer.flat.buffers_flat(), dest=0, tag=P.TAG_BN)  # PS: the BN buffers used
            if task.status != P.Status.STOP:  # the weights merged meanwhile: train on from them
                if topo.is_leader:
                    receive()  # (the server answers an evaluation with its pull: ParameterServer.on_eval)
                P.bcast(gcomm, w, back)  # MPI: the leader's pull to the whole group
                trainer.flat.load_weights(w)
        if task.status == P.Status.STOP:
            break
        # the server's share for this task (adaptive planning may cut a slow small group's):
        # the group keeps its place in the partition and takes a prefix of its slice
        task_shares = [*shares[: topo.group], task.samples, *shares[topo.group + 1 :]]
        lr = task_rate(task.lr, task.lr_epoch, topo.n_groups, cfg.schedule)  # (a warm-up may ramp per step)
        mom = task_momentum(task.lr_epoch, cfg.optim, cfg.schedule)  # (optim.ps_momentum_by_lr)
        work = MiniEpoch(
            task.round, task_shares, task.resolution, task.batch, lr, task.dropout, task.pushes, mom
        )  # fmt: skip
        local = trainer.train_mini_epoch(work, push_ahead if cfg.server.overlap else mid_task_push)
        t_settle = time.perf_counter()
        settle_ahead()  # (the task's last push is blocking: its reply is the next task)
        local = replace(local, wait=local.wait + time.perf_counter() - t_settle)
        st, signalled = reduce_stats(gcomm, local, flag.raised)
        if topo.is_leader:
            sleeps, late = back.sleeps - slept[0], back.late - slept[1]  # (since the last commit)
            slept = (back.sleeps, back.late)
            done = P.Request(
                P.Kind.PUSH,
                topo.group,
                task.round,
                st.samples,
                st.seconds,
                st.loss_sum / max(st.samples, 1),
                st.correct / max(st.samples, 1),
                signalled,
                st.wait,
                sleeps=sleeps,
                late=late,
                waited=waited,
            )
            waited = 0.0
            exchange(done, push=True)
        task = share_reply()


def recv_slices(world: Any, parts: list, into: np.ndarray, back: P.Backoff) -> None:
    """Each server shard's slice of the merged weights into `into`: parameters, BN buffers."""
    for rank, prm, buf in parts:
        P.recv(world, into[prm], rank, P.TAG_W, back)  # PS: merged parameters
        P.recv(world, into[buf], rank, P.TAG_BN, back)  # PS: BN buffers


class Ahead:
    """The leader's push in flight (server.overlap): a thread sends a mid-task push and receives
    its reply while the group trains on; `settle` folds the reply in as reply + the steps taken
    since the push. Only this thread talks to the server meanwhile (mpi4py's MPI is initialised
    THREAD_MULTIPLE; Horovod's own thread uses the group's communicator)."""

    def __init__(self, world: Any, parts: list, back: P.Backoff, n_p: int, n_weights: int, pulled: Any):
        self.world, self.parts, self.back, self.n_p = world, parts, back, n_p
        self.pulled = pulled  # delta, nova: the parameters last pulled (the update is relative to them)
        self.snap = np.empty(n_p, np.float32)  # the parameters pushed
        self.out = np.empty(n_weights, np.float32)  # the push's body, then the reply
        self.rep = np.zeros(P.HDR_LEN, np.float64)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, req: P.Request, w: np.ndarray) -> None:
        """Push `w` (the group's weights now) on the thread."""
        self.snap[:] = w[: self.n_p]
        req = replace(req, norm=push_body(torch.from_numpy(w), self.pulled, self.out, self.n_p))
        self.thread = threading.Thread(target=self._exchange, args=(req,), name="hpc_dualbatch-push")
        self.thread.daemon = True  # (an error on the training thread ends the process meanwhile)
        self.thread.start()

    def _exchange(self, req: P.Request) -> None:
        world, out = self.world, self.out
        try:
            world.Send(req.pack(), dest=0, tag=P.TAG_REQ)  # PS: request header (shard 0 decides)
            for rank, prm, buf in self.parts:  # (a sleeping send: a blocking one would spin beside training)
                P.send(world, out[prm.start : buf.stop], rank, P.TAG_W, self.back, None)  # PS: update, BN
            P.recv(world, self.rep, 0, P.TAG_REP, self.back)  # PS: reply header
            status = P.Task.unpack(self.rep).status
            if status != P.Status.CONTINUE:
                raise RuntimeError(f"protocol error: a push inside a task was answered {status.name}")
            # (the sends are done: the reply lands in their buffer; its BN buffers unused, see settle)
            recv_slices(world, self.parts, out, self.back)  # PS: merged parameters and BN buffers
        except BaseException as e:  # raised again on the training thread by settle
            self.error = e

    def settle(self, w: np.ndarray) -> None:
        """Wait for the reply; `w` (the group's weights now) becomes reply + (w - pushed) in its
        parameters. The BN buffers stay the group's: training normalises with batch statistics,
        and an evaluation's come from the server with the task's last, blocking, pull."""
        assert self.thread is not None
        self.thread.join()
        self.thread = None
        if self.error is not None:
            raise self.error
        n_p, reply = self.n_p, self.out[: self.n_p]
        np.subtract(w[:n_p], self.snap, out=w[:n_p])
        w[:n_p] += reply
        if self.pulled is not None:
            self.pulled[:] = reply
