"""The pure pieces of adaptive planning (`adapt.py` keeps the run's state): a group's time scale
from its measured mini-epochs, and the re-plan of each small group's B_S and share from the scales.

A group is described by the profile's model times a measured scale (adapt.py says why):

    t_g(B) = s_g * (a_r + b_r/B)      s/sample of group g at batch B and resolution r
    s_g    = median of  measured s/sample / (a_r + b_r/B_used)   over the tasks given (`scale_of`)

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
group's slice) and the contribution factors stay the static plan's d_S / d_L.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpc_dualbatch.method.timing import TimeFit, fit_linear

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


@dataclass(frozen=True)
class ReplanInput:
    """What one re-plan at one resolution works from (`replan`). Large groups keep B_L and d_L."""

    fit: TimeFit  # the large groups' profile at this resolution (`positive_model`): T comes from it
    scales: Mapping[int, float]  # group -> s_g, for every group
    large: Sequence[int]  # the groups that keep B_L and d_L and so set the pace T
    small: Sequence[int]  # the groups whose B_S and share are re-planned
    B_L: int  # samples per step of a large group
    d_L: int  # samples per large group per epoch
    d_S: int  # samples per small group per epoch (the static plan's)
    min_batch: Mapping[int, int]  # group -> its rank count (every rank needs a sample per step); default 1
    small_fit: TimeFit | None = None  # the small groups' own profile (None: `fit`)
    previous: Mapping[int, int] | None = None  # h -> its batch so far (None: none yet)
    damp: float = DAMP  # most a re-plan may multiply or divide B_S by
    shares: Mapping[int, int] | None = None  # h -> its share so far (None: d_S)
    # h -> the relative error h is left alone within while it has a previous batch (None: TOL)
    tol: Mapping[int, float] | None = None
    # the largest B_S (None: B_L), past which a group that is still too slow has its share cut instead
    ceiling: int | None = None


def replan(given: ReplanInput) -> Replan:
    """B_S and share per small group so that its mini-epoch takes the large groups' time."""
    fit, scales, large, small = given.fit, given.scales, given.large, given.small
    B_L, d_L, d_S, damp = given.B_L, given.d_L, given.d_S, given.damp
    previous, shares, tol, ceiling = given.previous, given.shares, given.tol, given.ceiling
    if not large:
        raise ValueError("re-planning needs at least one large group to set the pace")
    sfit = given.small_fit or fit
    target = statistics.fmean(scales[g] * fit.per_sample(B_L) * d_L for g in large)
    batches, out_shares = dict.fromkeys(large, B_L), dict.fromkeys(large, d_L)
    capped = []
    for h in small:
        s, lo = scales[h], given.min_batch.get(h, 1)
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
