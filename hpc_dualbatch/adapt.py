"""Adaptive planning (`plan.adaptive`): re-plan B_S from the mini-epoch times the run measures.

A plan made from a profile holds only where and how the profile ran. In a run, 4-5 ranks share
the cores, a small group pays per step for its loader, Horovod's optimizer wrapper and more
Python, and a neighbour's process may slow one group: the small groups' mini-epochs then end
before or after the large groups', and an epoch takes more or less than k times an all-large one.

The server therefore keeps, per group and resolution, the seconds per sample of the group's last
`WINDOW` mini-epochs (training only: loading, forward/backward, allreduce, optimizer; the
exchanges with the server excluded) and describes the group by the profile's model times a
measured scale:

    t_g(B) = s_g * (a + b/B)          s/sample of group g at batch B (a, b: the profile's fit)
    s_g    = median over the window of  measured s/sample / (a + b/B_used)

A scale keeps the profile's shape (the ratio of per-step to per-sample cost) and is re-anchored
at the batch the group last ran, so repeated re-planning is a secant iteration on the measured
times; with one or two distinct batches per group a two-parameter refit would be ill-posed. The
median ignores one outlier (a first task's warm-up, a checkpoint write).

Re-planning keeps the shares d_L, d_S (so the data assignment and the contribution factors stay
those of the plan) and solves, for every small group h, the batch at which its mini-epoch takes
the large groups' measured mini-epoch time T:

    T   = mean over large groups g of t_g(B_L) * d_L       = k * T0 as measured in this run
    B_h = s_h * b / (T/d_S - s_h * a)                      the method's formula, per group

capped to [ranks of h, B_L]: a small group that is slower than the large ones even at B_L (a
group slowed by more than k) runs at B_L and is reported as capped. A group without
measurements at a resolution borrows its own scale from the resolution it last ran, else the
mean scale of the groups that have run there, else 1 (the profile as is).

Everything here is a pure function of the observations, so it is table-tested, and its whole
state (`Adapter.state`) is JSON stored with every checkpoint: a resumed run continues with the
batches and windows it had.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .timing import TimeFit

WINDOW = 3  # mini-epochs per group and resolution the scale is taken over (the median of 3)


@dataclass(frozen=True)
class Obs:
    """One measured mini-epoch of a group."""

    batch: int  # samples per step the group ran
    samples: int  # samples it trained
    seconds: float  # wall seconds of training (exchanges excluded)
    warm: bool = False  # the group's first task in this process: warm-up included


def per_sample(fit: TimeFit, batch: float) -> float:
    """Profile seconds per sample at `batch`: a + b/batch."""
    return fit.a + fit.b / batch


def scale_of(fit: TimeFit, obs: Sequence[Obs]) -> float | None:
    """Median of measured / profiled seconds per sample over `obs` (warm tasks only if nothing else).

    None when there is no usable observation."""
    usable = [o for o in obs if o.samples > 0 and o.seconds > 0 and math.isfinite(o.seconds)]
    cold = [o for o in usable if not o.warm]
    pick = cold or usable
    if not pick:
        return None
    return statistics.median(o.seconds / o.samples / per_sample(fit, o.batch) for o in pick)


def small_batch_for(
    fit: TimeFit, scale: float, target: float, share: int, lo: int, hi: int
) -> tuple[int, bool]:
    """The batch at which `share` samples take `target` seconds under t(B) = scale*(a + b/B).

    Rounded half up and clipped to [lo, hi]; returns (batch, capped), capped when even `hi`
    is too slow (the group cannot finish in time at any allowed batch)."""
    denom = target / share - scale * fit.a  # s/sample left for the per-step cost
    if denom <= 0:
        return hi, True
    raw = scale * fit.b / denom
    if not math.isfinite(raw) or raw > hi:
        return hi, raw > hi or not math.isfinite(raw)
    return max(lo, int(math.floor(raw + 0.5))), False


@dataclass(frozen=True)
class Replan:
    """The outcome of one re-plan at one resolution."""

    batches: dict[int, int]  # group -> batch for its next task at this resolution
    target: float  # s, T: the large groups' predicted mini-epoch time
    scales: dict[int, float]  # group -> s_g used
    capped: tuple[int, ...]  # small groups that cannot reach T even at B_L


def replan(
    fit: TimeFit,
    scales: Mapping[int, float],
    large: Sequence[int],
    small: Sequence[int],
    B_L: int,
    d_L: int,
    d_S: int,
    min_batch: Mapping[int, int],
    small_fit: TimeFit | None = None,
) -> Replan:
    """B_S per small group so that its mini-epoch of d_S samples takes the large groups' time.

    `scales` has a scale for every group; `min_batch[g]` is the group's rank count (every rank
    needs a sample per step); `small_fit`: the small groups' own profile (default `fit`). Large
    groups keep B_L."""
    if not large:
        raise ValueError("re-planning needs at least one large group to set the pace")
    target = statistics.fmean(scales[g] * per_sample(fit, B_L) * d_L for g in large)
    batches = {g: B_L for g in large}
    capped = []
    for h in small:
        batches[h], cap = small_batch_for(small_fit or fit, scales[h], target, d_S, min_batch.get(h, 1), B_L)
        if cap:
            capped.append(h)
    return Replan(batches, target, dict(scales), tuple(capped))


class Adapter:
    """The server's adaptive plan: observations in, the batch of each group's next task out.

    Plain Python, no MPI: the server calls `observe` for every commit and `batch_for` when it
    hands out a task; `state`/`from_state` go into and out of checkpoints.
    """

    def __init__(
        self,
        fits: Mapping[int, TimeFit],
        large_batch: Mapping[int, int],
        planned: Mapping[int, Mapping[int, int]],
        small: Sequence[bool],
        shares: tuple[int, int],
        ranks: Sequence[int],
        small_fits: Mapping[int, TimeFit] | None = None,
        window: int = WINDOW,
    ) -> None:
        """fits, large_batch: per resolution; planned[g][res]: the static plan's batch (the
        start, and what a resolution without a fit keeps); small[g]: the group's role;
        shares: (d_L, d_S); ranks[g]: ranks of group g; small_fits: the small groups' own
        profile where the timing file has one."""
        self.fits, self.large_batch = dict(fits), dict(large_batch)
        self.small_fits = dict(small_fits or {})
        self.small = list(small)
        self.d_L, self.d_S = shares
        self.ranks = list(ranks)
        self.window = window
        self.batches = {g: dict(b) for g, b in planned.items()}
        self.obs: dict[tuple[int, int], list[Obs]] = {}
        self.last_res: dict[int, int] = {}  # group -> resolution of its latest observation

    @property
    def active(self) -> bool:
        """Whether there is anything to re-plan: small groups next to large ones, and a fit."""
        return any(self.small) and not all(self.small) and bool(self.fits)

    def observe(self, g: int, res: int, obs: Obs) -> None:
        win = self.obs.setdefault((g, res), [])
        win.append(obs)
        del win[: -self.window]
        self.last_res[g] = res

    def fit(self, g: int, res: int) -> TimeFit:
        """The profile group g is measured against: its role's fit at `res`."""
        return self.small_fits.get(res, self.fits[res]) if self.small[g] else self.fits[res]

    def scale(self, g: int, res: int) -> float:
        own = scale_of(self.fit(g, res), self.obs.get((g, res), []))
        if own is not None:
            return own
        if g in self.last_res and self.last_res[g] in self.fits:  # the group's own scale elsewhere
            r = self.last_res[g]
            s = scale_of(self.fit(g, r), self.obs[(g, r)])
            if s is not None:
                return s
        here = [scale_of(self.fit(h, res), self.obs.get((h, res), [])) for h in range(len(self.small))]
        known = [s for s in here if s is not None]
        return statistics.fmean(known) if known else 1.0

    def replan(self, res: int) -> Replan | None:
        """Re-plan at `res` from the current observations and keep the result; None when there is
        nothing to re-plan there (no small groups, no large ones, or no fit at `res`)."""
        if not self.active or res not in self.fits:
            return None
        n = len(self.small)
        scales = {g: self.scale(g, res) for g in range(n)}
        out = replan(
            self.fits[res],
            scales,
            [g for g in range(n) if not self.small[g]],
            [g for g in range(n) if self.small[g]],
            self.large_batch[res],
            self.d_L,
            self.d_S,
            dict(enumerate(self.ranks)),
            self.small_fits.get(res),
        )
        for g, b in out.batches.items():
            self.batches[g][res] = b
        return out

    def predicted(self, g: int, res: int, share: int) -> float | None:
        """Seconds the group's next task at `res` should take under the current model."""
        if res not in self.fits:
            return None
        return self.scale(g, res) * per_sample(self.fit(g, res), self.batches[g][res]) * share

    # --- checkpoint ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "batches": {str(g): {str(r): b for r, b in bs.items()} for g, bs in self.batches.items()},
            "obs": [
                [g, r, [[o.batch, o.samples, o.seconds, o.warm] for o in win]]
                for (g, r), win in sorted(self.obs.items())
            ],
            "last_res": {str(g): r for g, r in self.last_res.items()},
        }

    def load_state(self, raw: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's `state()`: the batches and windows it had."""
        self.batches = {int(g): {int(r): int(b) for r, b in bs.items()} for g, bs in raw["batches"].items()}
        self.obs = {
            (int(g), int(r)): [Obs(int(b), int(s), float(t), bool(w)) for b, s, t, w in win]
            for g, r, win in raw["obs"]
        }
        self.last_res = {int(g): int(r) for g, r in raw["last_res"].items()}
