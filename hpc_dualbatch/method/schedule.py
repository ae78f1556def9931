"""Learning-rate, resolution and dropout schedules: pure functions of the epoch.

Epochs are 0-based here (the paper counts from 1: its "epochs 1-40" are our
epochs 0-39). The parameter server counts progress in commits; one epoch is
one commit per worker group, so `epoch = commits / n_groups` (a float for
`lr_at`, floored for the stage).

Learning rate (method section 1): a step schedule, `lr[i]` from epoch
`milestones[i-1]` on, optionally with a linear warm-up from `lr[0]/10` to
`lr[0]` over the first `warmup_epochs` epochs.

Resolution (method section 2), by `resolution_mode`:

* `cyclic` (CPL): inside each LR stage the resolutions rise low -> high in
  equal sub-stages, then drop back to the lowest at the next stage. When a
  stage's length L is not divisible by the number of resolutions R, the
  first `L % R` sub-stages get one extra epoch (earlier = lower resolution =
  cheaper). A stage shorter than R epochs never reaches the highest
  resolutions.
* `progressive`: low -> high once over the whole run, equal parts, the same
  split rule.
* `fixed`: the highest resolution throughout.

Dropout rises with resolution (`schedule.dropout`, missing = 0).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

from hpc_dualbatch.config import CHOICES, OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class Stage:
    """What one epoch trains with."""

    epoch: int  # 0-based
    lr: float
    resolution: int  # px
    dropout: float


def _split(length: int, parts: int) -> list[int]:
    """Sizes of `parts` consecutive sub-stages covering `length` epochs; earlier ones take the extra."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def lr_stages(sched: ScheduleConfig) -> list[tuple[int, int]]:
    """[start, end) epochs of each learning-rate stage."""
    bounds = [0, *sched.milestones, sched.epochs]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def lr_stage(epoch: float, sched: ScheduleConfig) -> int:
    """Index into schedule.lr of the learning-rate stage a (fractional) epoch is in."""
    return bisect.bisect_right(sched.milestones, epoch)


def lr_at(epoch: float, sched: ScheduleConfig) -> float:
    """Learning rate at a (fractional) epoch >= 0; past the last epoch the last LR holds."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    lr = sched.lr[lr_stage(epoch, sched)]
    if sched.warmup_epochs > 0 and epoch < sched.warmup_epochs:
        # Linear from lr[0]/10 at epoch 0 to lr[0] at warmup_epochs (Goyal et al. 2017 style).
        base = sched.lr[0]
        warm = base / 10 + (base - base / 10) * epoch / sched.warmup_epochs
        return min(lr, warm)
    return lr


def task_rate(lr: float, e0: float, n_groups: int, sched: ScheduleConfig) -> float | Callable[[float], float]:
    """The rate a parameter-server task trains at: `lr`, the rate the server gave it at its place
    e0 (a fractional epoch) in the schedule; or, under `schedule.warmup_ramp: step` inside a
    warm-up, the rate at each fraction f of the task, lr_at(e0 + f/n) scaled as `lr` is (a small
    group's `small_lr`): the task covers 1/n of the epoch from e0. With one group that is the
    synchronous run's per-step ramp."""
    if sched.warmup_ramp != "step" or e0 >= sched.warmup_epochs:
        return lr
    scale = lr / lr_at(e0, sched)
    return lambda f: scale * lr_at(e0 + f / n_groups, sched)


def task_momentum(e0: float, optim: OptimConfig, sched: ScheduleConfig) -> float:
    """The SGD momentum a parameter-server task trains at: optim.ps_momentum, or the
    optim.ps_momentum_by_lr of the learning-rate stage of its place e0 (a fractional epoch) in the
    schedule, the stage the server gave the task its rate from (tasks.Tasks.next)."""
    by_lr = optim.ps_momentum_by_lr
    return by_lr[lr_stage(e0, sched)] if by_lr else optim.ps_momentum


def _sub_stage(epoch: int, start: int, end: int, resolutions: list[int]) -> int:
    pos = epoch - start
    for res, size in zip(resolutions, _split(end - start, len(resolutions))):
        if pos < size:
            return res
        pos -= size
    raise AssertionError("unreachable: epoch lies inside [start, end)")


def resolution_at(epoch: int, sched: ScheduleConfig) -> int:
    """Training resolution (px) of a 0-based integer epoch in [0, epochs)."""
    if not 0 <= epoch < sched.epochs:
        raise ValueError(f"epoch must be in [0, {sched.epochs}), got {epoch}")
    res = list(sched.resolutions)
    mode = sched.resolution_mode
    if mode == "fixed":
        return res[-1]
    if mode == "progressive":
        return _sub_stage(epoch, 0, sched.epochs, res)
    if mode == "cyclic":
        for start, end in lr_stages(sched):
            if start <= epoch < end:
                return _sub_stage(epoch, start, end, res)
    raise ValueError(
        f"unknown resolution_mode {mode!r}; valid: {', '.join(CHOICES['schedule.resolution_mode'])}"
    )


def eval_resolution(epochs_done: float, sched: ScheduleConfig) -> int:
    """Resolution (px) of the evaluation after `epochs_done` epochs (> 0): that of the last epoch
    trained, as the method's code evaluates at the current training resolution. (A server hands
    out the evaluation with the next epoch's first task, whose resolution may already be the next
    sub-stage's: a cycle's first low-resolution task would otherwise evaluate the weights trained
    at the highest.)"""
    if not 0 < epochs_done <= sched.epochs:
        raise ValueError(f"epochs_done must be in (0, {sched.epochs}], got {epochs_done}")
    return resolution_at(math.ceil(epochs_done) - 1, sched)


def dropout_at(resolution: int, sched: ScheduleConfig) -> float:
    """Dropout rate at a resolution (schedule.dropout; 0 where not given)."""
    return float(sched.dropout.get(resolution, 0.0))


def stage_at(epoch: int, sched: ScheduleConfig) -> Stage:
    res = resolution_at(epoch, sched)
    return Stage(epoch=epoch, lr=lr_at(epoch, sched), resolution=res, dropout=dropout_at(res, sched))


def stage_table(sched: ScheduleConfig) -> list[Stage]:
    """One Stage per epoch, for printing and for the predicted run time."""
    return [stage_at(e, sched) for e in range(sched.epochs)]


def epoch_of_commit(commits: int, n_groups: int, sched: ScheduleConfig) -> int:
    """0-based epoch that `commits` merged pushes fall in (n_groups commits = one epoch), clamped."""
    if commits < 0 or n_groups < 1:
        raise ValueError(f"need commits >= 0 and n_groups >= 1, got {commits} and {n_groups}")
    return min(commits // n_groups, sched.epochs - 1)


def stage_for_count(commits: int, n_groups: int, sched: ScheduleConfig) -> Stage:
    """The stage after `commits` of n_groups mini-epochs (clamped to the last epoch): the server
    counts the tasks handed out (`server.stage_by: task`) or the commits merged (`commit`).

    The LR is the integer epoch's (a stage changes only at whole epochs, so
    all groups of one epoch train alike); use `lr_at(commits / n_groups)` for
    a warm-up that moves within an epoch.
    """
    return stage_at(epoch_of_commit(commits, n_groups, sched), sched)


def format_stage_table(sched: ScheduleConfig) -> str:
    """Runs of equal (lr, resolution, dropout) as '1-40  lr 0.2  24 px  dropout 0.1' (1-based epochs)."""
    rows: list[str] = []
    table = stage_table(sched)
    i = 0
    while i < len(table):
        j = i
        key = (table[i].lr, table[i].resolution, table[i].dropout)
        while j + 1 < len(table) and (table[j + 1].lr, table[j + 1].resolution, table[j + 1].dropout) == key:
            j += 1
        rows.append(f"epochs {i + 1:>4}-{j + 1:<4} lr {key[0]:<8g} {key[1]:>4} px  dropout {key[2]:g}")
        i = j + 1
    return "\n".join(rows)
