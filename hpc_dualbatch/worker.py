"""A worker group: Horovod data-parallel training of mini-epochs, driven by the server.

`GroupTrainer` is one rank's model, optimiser and data: it trains one
mini-epoch (the group's share of samples at the group's batch, split across
its ranks) in `pushes` parts, recalibrates batch-norm statistics and
evaluates. The synchronous baseline uses it too.

`run_worker` is the group's side of the protocol in `protocol.py`: the leader
talks to the server, the other ranks of the group receive what it got by a
broadcast on the group communicator.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import protocol as P
from .config import Config
from .data.loader import EvalLoader, TrainLoader, eval_indices, shard_indices
from .engine import evaluate, make_optimizer, pick_device, recalibrate_bn, set_lr, train_step
from .flat import FlatModel
from .model import build_model, set_dropout
from .topology import Topology


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from counters: every random choice of a run is a function of
    (seed, group, round, rank), so a resumed run repeats it without saved RNG state."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class MiniEpochStats:
    """One rank's sums over a mini-epoch (the drivers reduce them over the group)."""

    samples: int
    seconds: float  # wall seconds training, exchanges inside the task excluded
    loss_sum: float
    correct: int
    wait: float = 0.0  # wall seconds in the exchanges between the task's parts


def part_ends(steps: int, parts: int) -> list[int]:
    """Step counts after which each of `parts` near-equal parts of `steps` steps ends.

    At most one part per step; the last end is always `steps` (the task's commit)."""
    parts = max(1, min(parts, steps))
    return [round((i + 1) * steps / parts) for i in range(parts)]


def bn_indices(n_train: int, samples: int, seed: int) -> np.ndarray:
    """The fixed training samples every BN recalibration of a run uses (seeded by the run's seed)."""
    rng = np.random.default_rng(derive_seed(seed, 0xB2))
    return np.sort(rng.choice(n_train, min(samples, n_train), replace=False))


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
        self.slowdown = cfg.workers.slowdown.get(self.group, 1.0)

    def train_mini_epoch(
        self,
        round_idx: int,
        shares: list[int],
        resolution: int,
        batch: int,
        lr: float | Callable[[float], float],
        dropout: float,
        pushes: int = 1,
        exchange: Callable[[], None] | None = None,
    ) -> MiniEpochStats:
        """Train this rank's part of the group's mini-epoch; after each of the first
        `pushes - 1` parts call `exchange` (the driver's push and pull). `lr`: one rate, or
        the rate as a function of the fraction of the mini-epoch done (set before every step,
        for a warm-up that ramps per step). Returns local sums."""
        cfg = self.cfg
        order = shard_indices(
            self.n_train, shares, self.group, 0, 1, round_idx, cfg.seed, cfg.data.assignment
        )
        mine, per_rank_batch = rank_batches(order, batch, self.rank, self.size)
        seed = derive_seed(cfg.seed, self.group, round_idx, self.rank)
        torch.manual_seed(seed)  # dropout draws
        lr_of = lr if callable(lr) else None
        set_lr(self.opt, lr_of(0.0) if lr_of else lr)  # type: ignore[arg-type]
        set_dropout(self.model, dropout)
        self.model.train()
        loss_sum, correct, n, wait = 0.0, 0, 0, 0.0
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
            ends = set(part_ends(len(loader), pushes)[:-1]) if exchange else set()
            steps = len(loader)
            for step, (x, y) in enumerate(loader, 1):
                if lr_of is not None:
                    set_lr(self.opt, lr_of((step - 1) / steps))
                ts = time.perf_counter()
                ls, c = train_step(self.model, self.opt, x, y)
                if self.slowdown > 1:  # workers.slowdown: a simulated slower node
                    time.sleep((self.slowdown - 1) * (time.perf_counter() - ts))
                loss_sum, correct, n = loss_sum + ls, correct + c, n + len(y)
                if step in ends:
                    t1 = time.perf_counter()
                    exchange()
                    self.model.train()
                    wait += time.perf_counter() - t1
        seconds = time.perf_counter() - t0 - wait
        return MiniEpochStats(n, seconds, loss_sum, correct, wait)

    def recalibrate(self, resolution: int) -> float:
        """Recompute the BN statistics of the current weights on the run's fixed training samples
        (each rank a part, then the group's mean); returns wall seconds."""
        t0 = time.perf_counter()
        idx = np.array_split(bn_indices(self.n_train, self.cfg.server.bn_samples, self.cfg.seed), self.size)
        mine = idx[self.rank]
        n_batches = max(1, math.ceil(len(mine) / self.cfg.data.eval_batch))
        batch = max(1, math.ceil(len(mine) / n_batches))  # equal batches: each weighs the same
        recalibrate_bn(
            self.model, EvalLoader(self.staged, resolution, mine, batch, self.device, split="train")
        )
        if self.size > 1:
            bufs = self.flat.buffers_flat()
            self.comm.Allreduce(MPI.IN_PLACE, bufs)  # MPI: group sum of the ranks' statistics
            self.flat.load_buffers(bufs / self.size)
        return time.perf_counter() - t0

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


def run_worker(cfg: Config, topo: Topology, staged: Any, shares: list[int]) -> None:
    """The group's loop: pull, (evaluate,) train in parts with a push after each, until STOP."""
    from .topology import init_horovod

    hvd = init_horovod(topo)
    flag = SignalFlag()
    trainer = GroupTrainer(cfg, staged, hvd, topo, topo.group_comm)
    back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    world, gcomm, n_p = topo.world, topo.group_comm, trainer.flat.n_params
    rep = np.zeros(P.HDR_LEN, np.float64)
    w = np.empty(trainer.flat.n_weights, np.float32)
    state = np.empty(n_p, np.float32)

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
        P.recv(world, w[:n_p], 0, P.TAG_W, back)  # PS: merged parameters
        P.recv(world, w[n_p:], 0, P.TAG_BN, back)  # PS: BN buffers
        if rep[P.Rep.HAS_STATE]:
            P.recv(world, state, 0, P.TAG_OPT, back)  # PS: momentum on resume

    def share_reply() -> None:
        P.bcast(gcomm, rep, back)  # MPI: the leader's reply to the whole group
        P.bcast(gcomm, w, back)  # MPI
        if rep[P.Rep.HAS_STATE]:
            P.bcast(gcomm, state, back)  # MPI

    def mid_task_push() -> None:
        """All ranks: the leader pushes the weights so far and pulls the merged ones."""
        if topo.is_leader:
            req = P.request(P.Kind.MERGE, topo.group)
            req[P.Req.ROUND] = round_idx
            exchange(req, push=True)
        share_reply()
        trainer.flat.load_weights(w)

    if topo.is_leader:
        exchange(P.request(P.Kind.HELLO, topo.group), push=False)
    share_reply()
    while True:
        trainer.flat.load_weights(w)
        if rep[P.Rep.HAS_STATE]:
            trainer.flat.load_momentum(trainer.opt, state)
        resolution = int(rep[P.Rep.RESOLUTION])
        if rep[P.Rep.EVAL_EPOCH] >= 0:
            bn_secs = trainer.recalibrate(resolution) if cfg.server.bn == "recalibrate" else 0.0
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
                    P.Req.EVAL_BN_SECONDS,
                ]
                req[fields] = (rep[P.Rep.EVAL_EPOCH], loss, acc, n, secs, resolution, bn_secs)
                world.Send(req, dest=0, tag=P.TAG_REQ)  # PS: evaluation result, no reply
                world.Send(trainer.flat.buffers_flat(), dest=0, tag=P.TAG_BN)  # PS: the BN buffers used
        if rep[P.Rep.STATUS] == P.Status.STOP:
            break
        round_idx = int(rep[P.Rep.ROUND])
        # the server's share for this task (adaptive planning may cut a slow small group's):
        # the group keeps its place in the partition and takes a prefix of its slice
        task_shares = [*shares[: topo.group], int(rep[P.Rep.SAMPLES]), *shares[topo.group + 1 :]]
        local = trainer.train_mini_epoch(
            round_idx,
            task_shares,
            resolution,
            int(rep[P.Rep.BATCH]),
            float(rep[P.Rep.LR]),
            float(rep[P.Rep.DROPOUT]),
            int(rep[P.Rep.PUSHES]),
            mid_task_push,
        )
        st, signalled = reduce_stats(gcomm, local, flag.raised)
        if topo.is_leader:
            req = P.request(P.Kind.PUSH, topo.group)
            fields = [
                P.Req.ROUND,
                P.Req.SAMPLES,
                P.Req.SECONDS,
                P.Req.LOSS,
                P.Req.ACC,
                P.Req.PREEMPT,
                P.Req.WAIT,
            ]
            req[fields] = (
                round_idx,
                st.samples,
                st.seconds,
                st.loss_sum / max(st.samples, 1),
                st.correct / max(st.samples, 1),
                1 if signalled else 0,
                st.wait,
            )
            exchange(req, push=True)
        share_reply()
    hvd.shutdown()
