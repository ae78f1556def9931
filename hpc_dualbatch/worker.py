"""A worker group: Horovod data-parallel training of mini-epochs, driven by the server.

`GroupTrainer` is one rank's model, optimiser and data: it trains one
mini-epoch (the group's share of samples at the group's batch, split across
its ranks) and evaluates. The synchronous baseline uses it too.

`run_worker` is the group's side of the protocol in `protocol.py`: the leader
talks to the server, the other ranks of the group receive what it got by a
broadcast on the group communicator.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import protocol as P
from .config import Config
from .data.loader import EvalLoader, TrainLoader, eval_indices, shard_indices
from .engine import evaluate, make_optimizer, pick_device, set_lr, train_step
from .flat import FlatModel
from .model import build_model, set_dropout
from .topology import Topology


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from counters: every random choice of a run is a function of
    (seed, group, round, rank), so a resumed run repeats it without saved RNG state."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class MiniEpochStats:
    samples: int
    seconds: float
    loss_sum: float
    correct: int


def rank_batches(
    group_order: np.ndarray, batch: int, group_rank: int, group_size: int
) -> tuple[np.ndarray, int]:
    """Split a group's ordered samples into steps of `batch` and give each rank its part of each step.

    Every rank of a group must take the same number of steps (each step is one
    Horovod allreduce). Returns this rank's indices and its per-step batch;
    its last step may be shorter. A last group step smaller than the group is
    dropped, so no rank gets an empty step.
    """
    steps = math.ceil(len(group_order) / batch)
    if steps and len(group_order) - (steps - 1) * batch < group_size:
        steps -= 1
    parts = [
        np.array_split(group_order[i * batch : (i + 1) * batch], group_size)[group_rank] for i in range(steps)
    ]
    if not parts:
        return np.empty(0, np.int64), 0
    return np.concatenate(parts), len(parts[0])


class GroupTrainer:
    def __init__(self, cfg: Config, staged: Any, hvd: Any, topo: Topology, group_comm: Any) -> None:
        self.cfg, self.staged, self.hvd, self.comm = cfg, staged, hvd, group_comm
        self.group, self.rank, self.size = topo.group, topo.group_rank, topo.group_size
        self.device = pick_device(cfg.device, topo.local_rank)
        self.model = build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width).to(
            self.device
        )
        self.flat = FlatModel(self.model)
        opt = make_optimizer(self.model, cfg.optim, cfg.schedule.lr[0])
        # Horovod: gradients are averaged over the group's ranks; momentum stays in the group.
        self.opt = hvd.DistributedOptimizer(opt, named_parameters=self.model.named_parameters())
        self.n_train = staged.num_samples("train")
        self.n_test = staged.num_samples("test")

    def train_mini_epoch(
        self, round_idx: int, shares: list[int], resolution: int, batch: int, lr: float, dropout: float
    ) -> MiniEpochStats:
        cfg = self.cfg
        order = shard_indices(
            self.n_train, shares, self.group, 0, 1, round_idx, cfg.seed, cfg.data.assignment
        )
        mine, per_rank_batch = rank_batches(order, batch, self.rank, self.size)
        seed = derive_seed(cfg.seed, self.group, round_idx, self.rank)
        torch.manual_seed(seed)  # dropout draws
        set_lr(self.opt, lr)
        set_dropout(self.model, dropout)
        self.model.train()
        loss_sum, correct, n = 0.0, 0, 0
        t0 = time.perf_counter()
        if len(mine):
            loader = TrainLoader(
                self.staged,
                "train",
                resolution,
                mine,
                per_rank_batch,
                augment=cfg.data.augment,
                flip=cfg.data.flip,
                pad=cfg.data.pad,
                seed=seed,
                device=self.device,
                prefetch=cfg.data.prefetch,
                in_memory=cfg.data.in_memory,
                in_memory_max_mb=cfg.data.in_memory_max_mb,
            )
            for x, y in loader:
                ls, c = train_step(self.model, self.opt, x, y)
                loss_sum, correct, n = loss_sum + ls, correct + c, n + len(y)
        seconds = time.perf_counter() - t0
        tot = np.array([loss_sum, correct, n], np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, tot)  # MPI: group sums of loss, correct, samples
        return MiniEpochStats(int(tot[2]), seconds, float(tot[0]), int(tot[1]))

    def evaluate(self, resolution: int) -> tuple[float, float, int, float]:
        """Test loss and accuracy of the current weights, summed over the group's ranks."""
        t0 = time.perf_counter()
        idx = eval_indices(self.n_test, self.rank, self.size)
        loss_sum, correct, n = evaluate(
            self.model, EvalLoader(self.staged, resolution, idx, self.cfg.data.eval_batch, self.device)
        )
        tot = np.array([loss_sum, correct, n], np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, tot)  # MPI: group sums
        return tot[0] / max(tot[2], 1), tot[1] / max(tot[2], 1), int(tot[2]), time.perf_counter() - t0


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


def run_worker(cfg: Config, topo: Topology, staged: Any, shares: list[int]) -> None:
    """The group's loop: pull, (evaluate,) train, push, until the server says STOP."""
    from .topology import init_horovod

    hvd = init_horovod(topo)
    flag = SignalFlag()
    trainer = GroupTrainer(cfg, staged, hvd, topo, topo.group_comm)
    back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    world, gcomm = topo.world, topo.group_comm
    rep = np.zeros(P.HDR_LEN, np.float64)
    w = np.empty(trainer.flat.n_weights, np.float32)
    state = np.empty(trainer.flat.n_params, np.float32)

    def exchange(req: np.ndarray, push: bool) -> None:
        """Leader: send a request (and weights), wait for the reply; answer state requests."""
        world.Send(req, dest=0, tag=P.TAG_REQ)  # PS: request header
        if push:
            world.Send(trainer.flat.weights(w), dest=0, tag=P.TAG_W)  # PS: the group's weights
        while True:
            P.recv(world, rep, 0, P.TAG_REP, back)  # PS: reply header
            if rep[P.Rep.STATUS] != P.Status.SEND_STATE:
                break
            world.Send(trainer.flat.momentum(trainer.opt, state), dest=0, tag=P.TAG_OPT)  # PS: checkpoint
        P.recv(world, w, 0, P.TAG_W, back)  # PS: merged weights
        if rep[P.Rep.HAS_STATE]:
            P.recv(world, state, 0, P.TAG_OPT, back)  # PS: momentum on resume

    def share_reply() -> None:
        P.bcast(gcomm, rep, back)  # MPI: the leader's reply to the whole group
        P.bcast(gcomm, w, back)  # MPI
        if rep[P.Rep.HAS_STATE]:
            P.bcast(gcomm, state, back)  # MPI

    if topo.is_leader:
        exchange(P.request(P.Kind.HELLO, topo.group), push=False)
    share_reply()
    while True:
        trainer.flat.load_weights(w)
        if rep[P.Rep.HAS_STATE]:
            trainer.flat.load_momentum(trainer.opt, state)
        resolution = int(rep[P.Rep.RESOLUTION])
        if rep[P.Rep.EVAL_EPOCH] >= 0:
            loss, acc, n, secs = trainer.evaluate(resolution)
            if topo.is_leader:
                req = P.request(P.Kind.EVAL, topo.group)
                fields = [
                    P.Req.EVAL_EPOCH,
                    P.Req.EVAL_LOSS,
                    P.Req.EVAL_ACC,
                    P.Req.EVAL_SAMPLES,
                    P.Req.EVAL_SECONDS,
                    P.Req.EVAL_RESOLUTION,
                ]
                req[fields] = (rep[P.Rep.EVAL_EPOCH], loss, acc, n, secs, resolution)
                world.Send(req, dest=0, tag=P.TAG_REQ)  # PS: evaluation result, no reply
        if rep[P.Rep.STATUS] == P.Status.STOP:
            break
        round_idx = int(rep[P.Rep.ROUND])
        st = trainer.train_mini_epoch(
            round_idx,
            shares,
            resolution,
            int(rep[P.Rep.BATCH]),
            float(rep[P.Rep.LR]),
            float(rep[P.Rep.DROPOUT]),
        )
        if topo.is_leader:
            req = P.request(P.Kind.PUSH, topo.group)
            req[[P.Req.ROUND, P.Req.SAMPLES, P.Req.SECONDS, P.Req.LOSS, P.Req.ACC, P.Req.PREEMPT]] = (
                round_idx,
                st.samples,
                st.seconds,
                st.loss_sum / max(st.samples, 1),
                st.correct / max(st.samples, 1),
                1 if flag.raised else 0,
            )
            exchange(req, push=True)
        share_reply()
    hvd.shutdown()
