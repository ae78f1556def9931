"""Adaptive planning (`plan.adaptive`): re-plan B_S (and where that is not enough, a small
group's share) from the mini-epoch times the run measures.

A plan made from a profile holds only where and how the profile ran. In a run, 4-5 ranks share
the cores, a small group pays per step for its loader, Horovod's optimizer wrapper and more
Python, and a neighbour's process may slow one group: the small groups' mini-epochs then end
before or after the large groups', and an epoch takes more or less than k times an all-large one.

The server therefore keeps the seconds per sample of each group's last `WINDOW` mini-epochs
(training only: loading, forward/backward, allreduce, optimizer; the exchanges with the server
excluded) and describes the group by the profile's model times a measured scale:

    t_g(B) = s_g * (a_r + b_r/B)      s/sample of group g at batch B and resolution r (a_r, b_r:
                                      the profile's fit there)
    s_g    = median over the window of  measured s/sample / (a_r + b_r/B_used)   (each task at
                                      its own resolution)

A scale keeps the profile's shape (the ratio of per-step to per-sample cost) and is anchored
at the batches the group ran, so repeated re-planning is a secant iteration on the measured
times (with one or two distinct batches per group a two-parameter refit would be ill-posed).
The profile's shape is good only near its anchor, so:
- the scale comes from the window's tasks run within `DAMP` of the batch the group now has at
  their resolution (the whole window when none is);
- a small group's B_S is re-planned only after the group has measured the batch it was given,
  and moves by at most a factor `DAMP` per re-plan.
The median ignores outliers (a first task's warm-up, a task that overlapped another group's
evaluation: on 2 shared cores single tasks ran 30 % off their neighbours). The window holds a
group's tasks at every resolution (a cyclic schedule visits each too rarely for a window of
its own); the scale at a resolution comes from the tasks there, and from all of them while
there are none (how much slower a node runs than the profile is mostly a property of the
group; how resolutions compare, the profile's).

Re-planning solves, for every small group h, the batch at which its mini-epoch of d_S samples
takes the large groups' measured mini-epoch time T (the method's formula, per group):

    T   = mean over large groups g of t_g(B_L) * d_L       = k * T0 as measured in this run
    B_h = s_h * b / (T/d_S - s_h * a)

with three guards, because a time measured on shared cores is noisy and, where the per-step
cost b is small against a*B (a CPU: b/a ~ 8 samples), the time barely depends on B, so a few
per cent of noise in T or s_h moves the solved B_h by 2x:
- a dead band: h keeps its batch and share while its predicted mini-epoch is within `tol` of
  T, tol = max(TOL, the standard error of its and the large groups' window medians);
- a move is at most a factor DAMP per re-plan (and only after h measured what it was given),
  aims at the band's near edge rather than at T, and never goes below the floor
  (plan.min_small_batch, the smallest batch that still trains at the schedule's rate);
- B_h stays at or below `useful_batch`: the batch past which even B_L would save less than TOL
  of the mini-epoch time. Past it the method's small batch would be spent for nothing, so a
  group that cannot reach T there (a slow node, a group slowed by more than k) climbs to that
  batch (damped) and trains fewer samples instead: its share is cut to what fits in T (never
  above d_S, never below one step; d_S again once it fits), and the group is reported as
  `capped`. The samples it leaves out are left
  out of that epoch (the large groups' d_L, which set T, stay).
The data assignment keeps each group's place in the partition (a cut share is a prefix of the
group's slice) and the contribution factors stay the static plan's d_S / d_L. A group without
measurements borrows the mean scale of the groups that have them, else 1 (the profile as is).

Everything here is a pure function of the observations, so it is table-tested, and its whole
state (`Adapter.state`) is JSON stored with every checkpoint: a resumed run continues with the
batches, shares and windows it had.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpc_dualbatch.method.timing import TimeFit, fit_linear

WINDOW = 5  # mini-epochs per group the scale is the median of
DAMP = 1.5  # most a re-plan may multiply or divide a group's B_S by
TOL = 0.03  # relative time error left alone (bench promise's goal: +-3 % of k)
# Relative s.d. of one mini-epoch's time assumed until a window holds MIN_SPREAD tasks to measure
# it: single tasks on the shared 2-core machines ran ~10 % off their neighbours (docs/planning.md)
TASK_NOISE = 0.10
MIN_SPREAD = 3


@dataclass(frozen=True)
class Obs:
    """One measured mini-epoch of a group."""

    resolution: int  # px
    batch: int  # samples per step the group ran
    samples: int  # samples it trained
    seconds: float  # wall seconds of training (exchanges excluded)
    warm: bool = False  # the group's first task in this process: warm-up included


def positive_model(fit: TimeFit, B_L: int) -> TimeFit:
    """The profile the adapter scales. A sound fit (a > 0, fixed cost known) as it is. Otherwise,
    where the measured per-sample time falls and then rises again (a CPU past its cache: the
    line through all points then has b ~ 0 or < 0), the line through the falling part: the
    measured points up to the lowest per-sample time at or below B_L, where that line has a > 0
    and b > 0 (a larger batch there does buy time, as the measurement shows). Else a flat model,
    a = the s/sample at B_L (fit, else measured), b = 0: a smaller batch costs no more as far as
    the profile can tell, so re-plans keep B_S where it is and a group that is too slow has its
    share cut (`replan`)."""
    if fit.sound:
        return fit
    pts = sorted((x, t) for x, t in fit.points if x <= B_L and t > 0)
    if pts:
        low = min(range(len(pts)), key=lambda i: pts[i][1] / pts[i][0])
        falling = pts[: low + 1]
        if len(falling) >= 2:
            line = fit_linear(falling)
            if line.a > 0 and line.b > 0:
                return line
    p = fit.per_sample(B_L)
    if not p > 0:
        p = pts[-1][1] / pts[-1][0] if pts else 1.0  # 1 s/sample: only the measured scales matter
    return TimeFit(a=p, b=0.0, r2=fit.r2, points=fit.points)


def _usable(fits: Mapping[int, TimeFit], obs: Sequence[Obs]) -> list[float]:
    """measured / profiled seconds per sample of each usable task (warm tasks only if nothing
    else): a task without samples or time, or at a resolution without a fit, says nothing."""
    usable = [
        o
        for o in obs
        if o.samples > 0 and o.seconds > 0 and math.isfinite(o.seconds) and o.resolution in fits
    ]
    pick = [o for o in usable if not o.warm] or usable
    return [o.seconds / o.samples / fits[o.resolution].per_sample(o.batch) for o in pick]


def scale_of(fits: Mapping[int, TimeFit], obs: Sequence[Obs]) -> float | None:
    """Median of measured / profiled seconds per sample over `obs`, each against the fit of its
    resolution (warm tasks only if nothing else). None when there is no usable observation."""
    ratios = _usable(fits, obs)
    return statistics.median(ratios) if ratios else None


def noise_of(fits: Mapping[int, TimeFit], obs: Sequence[Obs]) -> float:
    """Relative standard error of `scale_of` over `obs`: 1.25 * sigma / sqrt(m), sigma from the
    median absolute deviation (1.4826 * MAD, robust to the outliers the median ignores); with
    fewer than MIN_SPREAD tasks, whose spread says nothing yet, sigma = TASK_NOISE."""
    ratios = _usable(fits, obs)
    m = max(1, len(ratios))
    if len(ratios) < MIN_SPREAD:
        return 1.2533 * TASK_NOISE / math.sqrt(m)
    med = statistics.median(ratios)
    mad = statistics.median(abs(r - med) for r in ratios)
    return 1.2533 * 1.4826 * mad / med / math.sqrt(m)


def useful_batch(fit: TimeFit, B_L: int, tol: float = TOL) -> int:
    """The largest batch below which a larger one still saves time: past it even B_L would save
    less than `tol` of the time per sample, (a + b/B) / (a + b/B_L) - 1 < tol. A scale
    multiplies both sides, so this is a property of the profile's shape alone.
    B = b / (tol*a + (1 + tol)*b/B_L); at least 1, at most B_L."""
    if fit.b <= 0:  # no per-step cost: the batch buys no time at all
        return 1
    raw = fit.b / (tol * max(fit.a, 0.0) + (1 + tol) * fit.b / B_L)
    return max(1, min(B_L, int(raw)))


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
    if not raw <= hi:  # also inf and nan
        return hi, True
    return max(lo, int(math.floor(raw + 0.5))), False


@dataclass(frozen=True)
class Replan:
    """The outcome of one re-plan at one resolution."""

    batches: dict[int, int]  # group -> batch for its next task at this resolution
    shares: dict[int, int]  # group -> samples of its next task (d_L, d_S or a cut d_S)
    target: float  # s, T: the large groups' predicted mini-epoch time
    scales: dict[int, float]  # group -> s_g used
    capped: tuple[int, ...]  # small groups that cannot reach T at d_S: their share is cut


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
    previous: Mapping[int, int] | None = None,
    damp: float = DAMP,
    shares: Mapping[int, int] | None = None,
    tol: Mapping[int, float] | None = None,
    ceiling: int | None = None,
) -> Replan:
    """B_S and share per small group so that its mini-epoch takes the large groups' time.

    `scales` has a scale for every group; `min_batch[g]` is the group's rank count (every rank
    needs a sample per step); `small_fit`: the small groups' own profile (default `fit`);
    `previous[h]`, `shares[h]`: h's batch and share so far (default: none, d_S); `tol[h]`: the
    relative error h is left alone within while it has a previous batch (default TOL);
    `ceiling`: the largest B_S (default B_L), past which a group that is still too slow has its
    share cut instead. Large groups keep B_L and d_L."""
    if not large:
        raise ValueError("re-planning needs at least one large group to set the pace")
    sfit = small_fit or fit
    target = statistics.fmean(scales[g] * fit.per_sample(B_L) * d_L for g in large)
    batches, out_shares = dict.fromkeys(large, B_L), dict.fromkeys(large, d_L)
    capped = []
    for h in small:
        s, lo = scales[h], min_batch.get(h, 1)
        hi = max(lo, min(B_L, ceiling or B_L))
        prev = previous.get(h) if previous else None
        share = shares.get(h, d_S) if shares else d_S
        band = (tol or {}).get(h, TOL)
        # within the noise: leave it, unless it is a cut group that may still climb to the ceiling
        if (
            prev is not None
            and lo <= prev <= hi
            and not (share < d_S and prev < hi)
            and abs(s * sfit.per_sample(prev) * share / target - 1) <= band
        ):
            b = prev
            if share < d_S and s * sfit.per_sample(prev) * d_S / target - 1 <= band:
                share = d_S  # the whole share fits again
            cap = share < d_S
        else:
            aim = target
            if prev is not None and lo <= prev <= hi:
                # outside the band: correct only the excess, to the band's near edge; a task's
                # noise then moves B_S by what it exceeds the band by, not by all of it
                err = s * sfit.per_sample(prev) * d_S / target - 1
                aim = target * (1 + math.copysign(min(band, abs(err)), err))
            b, cap = small_batch_for(sfit, s, aim, d_S, lo, hi)
            if prev is not None:
                b = min(max(b, math.ceil(prev / damp), lo), math.floor(prev * damp), hi)
            share = d_S
            cap = cap and b == hi  # on the way up a group keeps its whole share
            if cap:  # too slow at d_S even at the ceiling: fewer samples, not a larger batch
                share = max(b, min(d_S, int(target / (s * sfit.per_sample(b)))))
        batches[h], out_shares[h] = b, share
        if cap:
            capped.append(h)
    return Replan(batches, out_shares, target, dict(scales), tuple(capped))


class Adapter:
    """The server's adaptive plan: observations in, the batch of each group's next task out.

    Plain Python, no MPI: the server calls `observe` for every commit and `replan` when it hands
    out a task; `state`/`load_state` go into and out of checkpoints.
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
        floor: int = 1,
    ) -> None:
        """fits, large_batch: per resolution; planned[g][res]: the static plan's batch (the
        start, and what a resolution without a fit keeps); small[g]: the group's role;
        shares: (d_L, d_S); ranks[g]: ranks of group g; small_fits: the small groups' own
        profile where the timing file has one; floor: no re-plan goes below it (the static
        plan's floor, plan.min_small_batch; at most B_L)."""
        self.large_batch = dict(large_batch)
        self.fits, self.small_fits = (
            {r: positive_model(f, self.large_batch.get(r, 1)) for r, f in table.items()}
            for table in (fits, small_fits or {})
        )
        self.floor = floor
        self.small = list(small)
        self.d_L, self.d_S = shares
        self.ranks = list(ranks)
        self.window = window
        self.planned = {g: dict(b) for g, b in planned.items()}
        self.batches = {g: dict(b) for g, b in planned.items()}
        # group -> resolution -> samples of its next task there (a capped small group's is cut)
        self.shares = {
            g: dict.fromkeys(b, self.d_S if self.small[g] else self.d_L) for g, b in planned.items()
        }
        self.obs: dict[int, list[Obs]] = {}  # group -> its last `window` mini-epochs
        self.seen: dict[int, int] = {}  # group -> mini-epochs of it observed
        # (group, resolution) -> seen[group] when its batch there was last re-planned: a small
        # group's B_S moves only after the group has measured the batch it was given
        self.planned_at: dict[tuple[int, int], int] = {}

    @property
    def active(self) -> bool:
        """Whether there is anything to re-plan: small groups next to large ones, and a fit."""
        return any(self.small) and not all(self.small) and bool(self.fits)

    def observe(self, g: int, obs: Obs) -> None:
        win = self.obs.setdefault(g, [])
        win.append(obs)
        del win[: -self.window]
        self.seen[g] = self.seen.get(g, 0) + 1

    def role_fits(self, g: int) -> dict[int, TimeFit]:
        """The profile group g is measured against, per resolution: its role's fits."""
        return {**self.fits, **self.small_fits} if self.small[g] else self.fits

    def near(self, g: int) -> list[Obs]:
        """g's window, kept to the tasks run within DAMP of the batch it now has at their
        resolution (all of it when none is): a profile's shape is right only near where it is
        anchored, so the scale must come from batches near those it plans."""
        win = self.obs.get(g, [])
        cur = self.batches[g]
        close = [
            o
            for o in win
            if cur.get(o.resolution, o.batch) / DAMP <= o.batch <= cur.get(o.resolution, o.batch) * DAMP
        ]
        return close or win

    def _at(self, g: int, res: int) -> list[Obs]:
        """The tasks g's scale at `res` comes from: its near tasks there, else all near ones."""
        near = self.near(g)
        return [o for o in near if o.resolution == res] or near

    def scale(self, g: int, res: int) -> float:
        """s_g at `res`: from g's tasks there, else from all its tasks, else the mean of the
        groups measured, else 1."""
        own = scale_of(self.role_fits(g), self._at(g, res))
        if own is not None:
            return own
        known = [s for h in range(len(self.small)) if (s := scale_of(self.role_fits(h), self.near(h)))]
        return statistics.fmean(known) if known else 1.0

    def tolerance(self, h: int, res: int) -> float:
        """The relative time error small group h is left alone within at `res`: TOL, or the
        standard error of its scale and of the large groups' mean scale where that is more."""
        large = [g for g in range(len(self.small)) if not self.small[g]]
        pace = math.sqrt(sum(noise_of(self.fits, self._at(g, res)) ** 2 for g in large)) / len(large)
        return max(TOL, math.hypot(noise_of(self.role_fits(h), self._at(h, res)), pace))

    def step(self, res: int) -> tuple[Replan | None, list[int]]:
        """`replan(res)`, and the groups whose batch or share at `res` it changed."""
        groups = range(len(self.small))
        before = [(self.batches[h][res], self.share(h, res)) for h in groups]
        rp = self.replan(res)
        return rp, [h for h in groups if before[h] != (self.batches[h][res], self.share(h, res))]

    def replan(self, res: int) -> Replan | None:
        """Re-plan at `res` from the current observations and keep the result: the B_S of each
        small group that has measured a task since its last re-plan here (the others keep
        theirs). None when there is nothing to re-plan (no small groups, no large ones, no fit
        at `res`, or no small group with a new measurement). Nothing is re-planned before every
        large group and the small group itself have a task past their warm-up: a first task
        (start-up, allocator, the loader's first pass) ran up to 1.9x its later ones in the demo
        and would cut a share for nothing."""
        n = len(self.small)
        settled = [any(not o.warm for o in self.obs.get(g, [])) for g in range(n)]
        fresh = [
            h
            for h in range(n)
            if self.small[h] and settled[h] and self.planned_at.get((h, res), -1) != self.seen.get(h, 0)
        ]
        pace_known = all(settled[g] for g in range(n) if not self.small[g])
        if not self.active or res not in self.fits or not fresh or not pace_known:
            return None
        for h in fresh:
            self.planned_at[(h, res)] = self.seen.get(h, 0)
        small = [g for g in range(n) if self.small[g]]
        B_L, sfit = self.large_batch[res], self.small_fits.get(res) or self.fits[res]
        # the plan's own B_S stays allowed where the profile puts it past the useful batch
        ceiling = max([useful_batch(sfit, B_L)] + [self.planned[h][res] for h in small])
        out = replan(
            self.fits[res],
            {g: self.scale(g, res) for g in range(n)},
            [g for g in range(n) if not self.small[g]],
            small,
            B_L,
            self.d_L,
            self.d_S,
            {g: max(ranks, min(self.floor, B_L)) for g, ranks in enumerate(self.ranks)},
            sfit,
            {g: self.batches[g][res] for g in range(n)},
            shares={g: self.shares[g][res] for g in range(n)},
            tol={h: self.tolerance(h, res) for h in small},
            ceiling=ceiling,
        )
        for h in fresh:
            self.batches[h][res], self.shares[h][res] = out.batches[h], out.shares[h]
        return Replan(
            {g: self.batches[g][res] for g in range(n)},
            {g: self.shares[g][res] for g in range(n)},
            out.target,
            out.scales,
            tuple(h for h in small if self.shares[h][res] < self.d_S),
        )

    def share(self, g: int, res: int) -> int:
        """Samples of g's next task at `res`."""
        return self.shares[g].get(res, self.d_S if self.small[g] else self.d_L)

    def predicted(self, g: int, res: int) -> float | None:
        """Seconds the group's next task at `res` should take under the current model."""
        if res not in self.fits:
            return None
        return (
            self.scale(g, res) * self.role_fits(g)[res].per_sample(self.batches[g][res]) * self.share(g, res)
        )

    # --- checkpoint ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "batches": {str(g): {str(r): b for r, b in bs.items()} for g, bs in self.batches.items()},
            "shares": {str(g): {str(r): d for r, d in ds.items()} for g, ds in self.shares.items()},
            "obs": {
                str(g): [[o.resolution, o.batch, o.samples, o.seconds, o.warm] for o in win]
                for g, win in sorted(self.obs.items())
            },
            "seen": {str(g): k for g, k in sorted(self.seen.items())},
            "planned_at": [[g, r, k] for (g, r), k in sorted(self.planned_at.items())],
        }

    def load_state(self, raw: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's `state()`: the batches, shares and windows it had."""
        self.batches = {int(g): {int(r): int(b) for r, b in bs.items()} for g, bs in raw["batches"].items()}
        if "shares" in raw:  # (a state saved before shares were adapted has d_L / d_S throughout)
            self.shares = {int(g): {int(r): int(d) for r, d in ds.items()} for g, ds in raw["shares"].items()}
        self.obs = {
            int(g): [Obs(int(r), int(b), int(s), float(t), bool(w)) for r, b, s, t, w in win]
            for g, win in raw["obs"].items()
        }
        self.seen = {int(g): int(k) for g, k in raw["seen"].items()}
        self.planned_at = {(int(g), int(r)): int(k) for g, r, k in raw["planned_at"]}
