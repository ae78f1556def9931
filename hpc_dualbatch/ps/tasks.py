"""What task a group is handed next (no MPI): the schedule position, learning rate, resolution,
batch, share, dropout and push count of a mini-epoch, and adaptive planning's decisions.

A task's stage follows its index among the tasks handed out (`server.stage_by: task`: task t
is part of epoch t // n) or, as in the method, the commit count when it is handed out
(`commit`); `schedule.stage_for_count` either way. The push count follows `server.push_every`,
or `server.push_every_by_lr` per learning-rate stage (post-local SGD, Lin et al. 2020, arXiv
1808.07217, pushes often while the rate is high and seldom after its decay). A small group's
rate is the large groups' (the method), or scaled by (B_S/B_L)^(1/2) or B_S/B_L
(`schedule.small_lr: sqrt | linear`; Hoffer et al. 2017, Goyal et al. 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpc_dualbatch.config import Config
from hpc_dualbatch.method.adapt import Adapter
from hpc_dualbatch.method.schedule import lr_at, lr_stage, stage_for_count
from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.runtime.metrics import MetricsLog, plan_record


@dataclass
class GroupSpec:
    share: int  # samples per mini-epoch (d_L or d_S)
    batch: dict[int, int]  # batch per resolution (B_L or B_S)
    factor: float  # contribution factor f
    small: bool


@dataclass
class TaskStage:
    """What a group's task in flight trains at (its commit record, a divergence message)."""

    lr: float = 0.0
    lr_stage: int = 0  # index into schedule.lr of the stage the task trains in
    resolution: int = 0  # px; 0: no task handed out in this process
    batch: int = 0
    predicted: float | None = None  # adaptive planning's predicted seconds for the task


def pushes_per_task(share_L: int, batch_L: int, push_every: int) -> int:
    """Pushes in one task: the large group's steps per mini-epoch / push_every, at least 1.

    Every group pushes this many times per task, whatever its batch, so that groups push at
    the same pace (the plan gives small and large mini-epochs equal time) and a small group's
    push weight f means what it means in the method. 0 = one push per task (the method).
    """
    if push_every <= 0:
        return 1
    return max(1, round(math.ceil(share_L / batch_L) / push_every))


def small_lr_scale(rule: str, batch: int, batch_L: int) -> float:
    """A small group's learning rate relative to the large groups' (`schedule.small_lr`)."""
    ratio = batch / batch_L
    return {"same": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


class Tasks:
    def __init__(self, cfg: Config, groups: list[GroupSpec], adapter: Adapter | None, log: MetricsLog):
        self.cfg, self.groups, self.adapter, self.log, self.n = cfg, groups, adapter, log, len(groups)
        self.ref = next((g for g in groups if not g.small), groups[0])  # push pace: a large group
        self.stage: dict[int, TaskStage] = {}  # each group's task in flight
        self.newest_lr_stage = 0  # the learning-rate stage of the newest task handed out

    def next(
        self, g: int, status: P.Status, handed_out: int, commits: int, round_idx: int, wall: float
    ) -> P.Task:
        """Group g's task (status RUN), or the fields of a STOP; `handed_out`: tasks handed
        out so far, `commits`: merged, `round_idx`: group g's mini-epoch count."""
        cfg, spec, run = self.cfg, self.groups[g], status == P.Status.RUN
        at = handed_out if cfg.server.stage_by == "task" else commits  # server.stage_by
        stage = stage_for_count(at, self.n, cfg.schedule)
        res = stage.resolution
        predicted = self._adapt(g, res, commits / self.n, wall) if run and self.adapter else None
        lr = lr_at(at / self.n, cfg.schedule)  # at the fractional epoch: a warm-up ramps per task
        if spec.small:
            lr *= small_lr_scale(cfg.schedule.small_lr, spec.batch[res], self.ref.batch[res])
        share = self.adapter.share(g, res) if self.adapter else spec.share
        every = cfg.server.push_every
        k = lr_stage(at / self.n, cfg.schedule)
        if cfg.server.push_every_by_lr:  # one period per learning-rate stage
            every = cfg.server.push_every_by_lr[k]
        pushes = pushes_per_task(self.ref.share, self.ref.batch[res], every)
        if run:
            self.stage[g] = TaskStage(lr, k, res, spec.batch[res], predicted)
            self.newest_lr_stage = k
        return P.Task(
            status, lr, res, spec.batch[res], share, commits / self.n, commits, round_idx if run else 0,
            stage.dropout, pushes=pushes, lr_epoch=at / self.n,
        )  # fmt: skip

    def batches(self, res: int) -> list[int]:
        """Every group's batch at `res` (the nova rule's weights)."""
        return [spec.batch[res] for spec in self.groups]

    def _adapt(self, g: int, res: int, epoch: float, wall: float) -> float | None:
        """plan.adaptive: re-plan the small groups at `res`, set the groups' batches, log a plan
        record when a batch or share changed; returns g's predicted seconds (None: no fit)."""
        ad = self.adapter
        assert ad is not None
        if res not in ad.fits:
            return None
        rp, changed = ad.step(res)
        for h, spec in enumerate(self.groups):  # (after a resume the specs start from the static plan)
            spec.batch[res] = ad.batches[h][res]
        if changed and rp is not None:
            self.log.write(plan_record(epoch=epoch, resolution=res, replan=rp, changed=changed, wall=wall))
        return ad.predicted(g, res)
