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

The re-plan itself, and the scale and noise of a window, are pure functions of their inputs
(replan.py: the rule and its three guards). A group without measurements borrows the mean scale
of the groups that have them, else 1 (the profile as is).

The adapter's whole state (`Adapter.state`) is JSON stored with every checkpoint: a resumed run
continues with the batches, shares and windows it had.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from hpc_dualbatch.method.replan import (
    DAMP,
    TOL,
    Obs,
    Replan,
    ReplanInput,
    noise_of,
    positive_model,
    replan,
    scale_of,
    useful_batch,
)
from hpc_dualbatch.method.timing import TimeFit

WINDOW = 5  # mini-epochs per group the scale is the median of


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
        # group -> (what, resolution) -> a scale or noise of its window: recomputed only after the
        # group's window or batches change (`_forget`), so a re-plan costs O(n) lookups
        self._memo: dict[int, dict[tuple[str, int], Any]] = {}

    @property
    def active(self) -> bool:
        """Whether there is anything to re-plan: small groups next to large ones, and a fit."""
        return any(self.small) and not all(self.small) and bool(self.fits)

    def observe(self, g: int, obs: Obs) -> None:
        win = self.obs.setdefault(g, [])
        win.append(obs)
        del win[: -self.window]
        self.seen[g] = self.seen.get(g, 0) + 1
        self._forget(g)

    def _forget(self, g: int) -> None:
        """g's window or batches changed: what was computed from them is stale."""
        self._memo.pop(g, None)

    def _of(self, what: str, g: int, res: int) -> Any:
        """g's own scale at `res` ("scale": None without a usable task), its scale over all near
        tasks ("near": None likewise) or the noise of its scale at `res` ("noise"), memoised."""
        memo = self._memo.setdefault(g, {})
        if (what, res) not in memo:
            fits, tasks = self.role_fits(g), self.near(g) if what == "near" else self._at(g, res)
            memo[(what, res)] = noise_of(fits, tasks) if what == "noise" else scale_of(fits, tasks)
        return memo[(what, res)]

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

    def _known_mean(self) -> float:
        """The mean scale of the groups measured (all their near tasks), else 1: what a group
        without measurements borrows."""
        known = [s for h in range(len(self.small)) if (s := self._of("near", h, 0))]
        return statistics.fmean(known) if known else 1.0

    def scale(self, g: int, res: int) -> float:
        """s_g at `res`: from g's tasks there, else from all its tasks, else the mean of the
        groups measured, else 1."""
        own = self._of("scale", g, res)
        return own if own is not None else self._known_mean()

    def scales(self, res: int) -> dict[int, float]:
        """`scale` of every group at `res` in one pass over the groups (the borrowed mean is
        computed once): O(n_groups x window)."""
        own = {g: self._of("scale", g, res) for g in range(len(self.small))}
        borrowed = self._known_mean() if None in own.values() else 1.0
        return {g: borrowed if s is None else s for g, s in own.items()}

    def pace_noise(self, res: int) -> float:
        """Relative standard error of the large groups' mean scale at `res` (what T rests on)."""
        large = [g for g in range(len(self.small)) if not self.small[g]]
        return math.sqrt(sum(self._of("noise", g, res) ** 2 for g in large)) / len(large)

    def tolerance(self, h: int, res: int, pace: float | None = None) -> float:
        """The relative time error small group h is left alone within at `res`: TOL, or the
        standard error of its scale and of the large groups' mean scale (`pace_noise`, computed
        once per re-plan by the caller) where that is more."""
        pace = self.pace_noise(res) if pace is None else pace
        return max(TOL, math.hypot(self._of("noise", h, res), pace))

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
        pace = self.pace_noise(res)  # once: every small group's band shares it (O(n) per re-plan)
        out = replan(
            ReplanInput(
                fit=self.fits[res],
                scales=self.scales(res),
                large=[g for g in range(n) if not self.small[g]],
                small=small,
                B_L=B_L,
                d_L=self.d_L,
                d_S=self.d_S,
                min_batch={g: max(ranks, min(self.floor, B_L)) for g, ranks in enumerate(self.ranks)},
                small_fit=sfit,
                previous={g: self.batches[g][res] for g in range(n)},
                shares={g: self.shares[g][res] for g in range(n)},
                tol={h: self.tolerance(h, res, pace) for h in small},
                ceiling=ceiling,
            )
        )
        for h in fresh:
            if self.batches[h][res] != out.batches[h]:
                self._forget(h)  # its near tasks are counted from its batch
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
        self._memo.clear()
