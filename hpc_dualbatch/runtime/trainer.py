"""One rank's part of a worker group's training, free of MPI: the model, optimiser and data
of a rank, one mini-epoch (the group's share of samples at the group's batch, split across its
ranks) in `pushes` parts, batch-norm recalibration and evaluation. The drivers (worker.py for
the parameter server's groups, sync.py for the synchronous baseline) own the communicators and
hand the trainer what it needs of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpc_dualbatch.config import Config
from hpc_dualbatch.data.loader import EvalLoader, TrainLoader, eval_indices, shard_indices
from hpc_dualbatch.runtime.engine import (
    evaluate,
    make_optimizer,
    pick_device,
    recalibrate_bn,
    set_lr,
    train_step,
)
from hpc_dualbatch.runtime.flat import FlatModel
from hpc_dualbatch.runtime.model import build_model, set_dropout
from hpc_dualbatch.runtime.topology import Topology


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from counters: every random choice of a run is a function of
    (seed, group, round, rank), so a resumed run repeats it without saved RNG state."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class MiniEpoch:
    """One mini-epoch of a group, as a task of the server or a step of the drivers gives it."""

    round_idx: int  # the group's mini-epoch count: fixes its data order (data.shard_indices)
    shares: list[int]  # samples per mini-epoch of every group (this group's slice of the order)
    resolution: int  # px
    batch: int  # the group's batch per step (summed over its ranks)
    lr: float | Callable[[float], float]  # one rate, or the rate at the fraction of the mini-epoch done
    dropout: float
    pushes: int = 1  # parts, with the driver's push and pull after each but the last
    momentum: float | None = None  # SGD momentum for this mini-epoch; None: the optimiser's as it is


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
    """One rank's model, optimiser and data. It never touches a communicator: the driver hands
    it `wrap_optimizer` (Horovod's DistributedOptimizer, which averages gradients over the
    group) and `group_sum` (an in-place sum of a float array over the group's ranks)."""

    def __init__(
        self,
        cfg: Config,
        staged: Any,
        topo: Topology,
        wrap_optimizer: Callable[[Any, Any], Any],
        group_sum: Callable[[np.ndarray], None],
    ) -> None:
        self.cfg, self.staged, self.group_sum = cfg, staged, group_sum
        self.group, self.rank, self.size = topo.group, topo.group_rank, topo.group_size
        self.device = pick_device(cfg.device, topo.local_rank)
        self.model = build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width).to(
            self.device
        )
        self.flat = FlatModel(self.model)
        opt = make_optimizer(self.model, cfg.optim, cfg.schedule.lr[0], cfg.momentum[1])
        # gradients are averaged over the group's ranks; momentum stays in the group
        self.opt = wrap_optimizer(opt, self.model.named_parameters())
        self.n_train = staged.num_samples("train")
        self.n_test = staged.num_samples("test")
        self.slowdown = cfg.workers.slowdown.get(self.group, 1.0)

    def train_mini_epoch(self, work: MiniEpoch, exchange: Callable[[], None] | None = None) -> MiniEpochStats:
        """Train this rank's part of the group's mini-epoch; after each of the first
        `work.pushes - 1` parts call `exchange` (the driver's push and pull). A callable
        `work.lr` is set before every step (a warm-up that ramps per step). Returns local sums."""
        cfg = self.cfg
        order = shard_indices(
            self.n_train, work.shares, self.group, 0, 1, work.round_idx, cfg.seed, cfg.data.assignment
        )
        mine, per_rank_batch = rank_batches(order, work.batch, self.rank, self.size)
        seed = derive_seed(cfg.seed, self.group, work.round_idx, self.rank)
        torch.manual_seed(seed)  # dropout draws
        lr_of = work.lr if callable(work.lr) else None
        set_lr(self.opt, lr_of(0.0) if lr_of else work.lr)  # type: ignore[arg-type]
        if work.momentum is not None:
            for g in self.opt.param_groups:
                g["momentum"] = work.momentum
        set_dropout(self.model, work.dropout)
        self.model.train()
        loss_sum, correct, n, wait = 0.0, 0, 0, 0.0
        t0 = time.perf_counter()
        if len(mine):
            loader = TrainLoader(
                self.staged,
                "train",
                work.resolution,
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
            ends = set(part_ends(len(loader), work.pushes)[:-1]) if exchange else set()
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

    def _part(self, slot: int, slots: int) -> tuple[int, int]:
        """This rank's part and the number of parts: one per rank of the group, or (`slots` > 0)
        the group's ranks as slots `slot`, `slot` + 1, ... of a shared final evaluation's."""
        return (slot + self.rank, slots) if slots else (self.rank, self.size)

    def recalibrate(self, resolution: int, slot: int = 0, slots: int = 0) -> float:
        """Recompute the BN statistics of the current weights on the run's fixed training samples
        (each rank a part, then the group's mean); returns wall seconds. `slots` > 0: the group's
        ranks take parts `slot`, `slot` + 1, ... of that many (a shared final evaluation)."""
        t0 = time.perf_counter()
        part, parts = self._part(slot, slots)
        fixed = bn_indices(self.n_train, self.cfg.server.bn_samples, self.cfg.seed)
        mine = np.array_split(fixed, parts)[part]
        n_batches = max(1, math.ceil(len(mine) / self.cfg.data.eval_batch))
        batch = max(1, math.ceil(len(mine) / n_batches))  # equal batches: each weighs the same
        recalibrate_bn(
            self.model, EvalLoader(self.staged, resolution, mine, batch, self.device, split="train")
        )
        if self.size > 1:
            bufs = self.flat.buffers_flat()
            self.group_sum(bufs)  # the group's sum of the ranks' statistics
            self.flat.load_buffers(bufs / self.size)
        return time.perf_counter() - t0

    def evaluate(self, resolution: int, slot: int = 0, slots: int = 0) -> tuple[float, float, int, float]:
        """Test loss and accuracy of the current weights, summed over the group's ranks (on their
        parts `slot`, `slot` + 1, ... of `slots` parts of the test split where `slots` > 0)."""
        t0 = time.perf_counter()
        idx = eval_indices(self.n_test, *self._part(slot, slots))
        loss_sum, correct, n = evaluate(
            self.model, EvalLoader(self.staged, resolution, idx, self.cfg.data.eval_batch, self.device)
        )
        tot = np.array([loss_sum, correct, n], np.float64)
        self.group_sum(tot)
        return tot[0] / max(tot[2], 1), tot[1] / max(tot[2], 1), int(tot[2]), time.perf_counter() - t0
