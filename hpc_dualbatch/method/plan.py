"""The dual-batch planner (method section 1); the `plan` command is commands/plan.py.

Given the time model per resolution (`timing.TimeFit`: a s/sample, b s/step),
the large batch B_L per resolution, n worker groups of which the last n_S
train with the small batch, the allowed extra-time ratio k and d samples per
epoch:

    T0  = (a + b/B_L) * d/n                plain epoch time, all groups large
    d_L = k * d/n                          samples per large group per epoch
    d_S = (d - n_L * d_L) / n_S            samples per small group per epoch
    B_S = b / (k*T0/d_S - a)               small groups also finish in k*T0

The pieces: the shares d_L, d_S and the contribution factor (shares.py), B_S at one resolution
and its bounds (small_batch.py), the record they make (plan_record.py); here the plain times,
the way B_S is chosen per resolution, the predicted epoch time, and the plan of a `Config`.

Rounding (reproduces the paper's Table 6 exactly, see docs/planning.md):

* the shares handed to groups are integers, rounded half up (shares.py): n_L*d_L + n_S*d_S
  differs from d by at most n_S/2 samples;
* the per-sample time at B_L, a + b/B_L, is taken to 4 significant figures
  before T0 is formed (the paper evidently planned from its tabulated
  ms/sample values; with full precision two of Table 6's eight B_S are off
  by one), a change of at most 0.05 % of T0;
* B_S = round-half-up of the formula.

"All small" (n_S = n) gives every group d/n samples and keeps d_L as the reference share.
k = 1 with n_S = 0 is plain training.

Every plan that cannot work raises `PlanError` saying why and what would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.config import planned_resolutions
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.plan_record import Plan, ResolutionPlan
from hpc_dualbatch.method.shares import check_inputs, sample_shares
from hpc_dualbatch.method.small_batch import solve_small_batch
from hpc_dualbatch.method.timing import TimeFit


def _sig4(x: float) -> float:
    """x to 4 significant figures (the paper's tabulated per-sample times)."""
    return float(f"{x:.4g}")


def _fit_ok(res: int, fit: TimeFit) -> None:
    if not (math.isfinite(fit.a) and math.isfinite(fit.b)):
        raise PlanError(f"the time fit at {res} px is not finite (a = {fit.a}, b = {fit.b}); re-run profile")


def _per_sample(fit: TimeFit, batch: int) -> float | None:
    """Predicted s/sample at `batch`: a + b/batch where that is positive, else the measured
    s/sample of the nearest measured batch (a degenerate fit still has its table), else None."""
    p = fit.per_sample(batch)
    if p > 0:
        return p
    table = [(x, t / x) for x, t in fit.points if t > 0]
    return min(table, key=lambda xt: abs(math.log(xt[0] / batch)))[1] if table else None


def _small_way(shares: Plan, explicit: bool) -> str:
    """How B_S is chosen at a resolution: none (no small groups), explicit (plan.small_batch
    gives it), equal (k = 1 or shares rounded equal: a small group has no more time per sample
    than a large one, so B_S = B_L) or solve (from the time fit)."""
    if shares.n_small == 0:
        return "none"
    if explicit:
        return "explicit"
    return "solve" if shares.d_S < shares.d_L else "equal"  # type: ignore[operator]


def _plain_times(shares: Plan, res: int, fit: TimeFit | None, B_L: int) -> tuple[float | None, float | None]:
    """(T0, t_large) in s: the plain epoch, every group at B_L with d/n samples, and a large
    group's mini-epoch of d_L samples. None without a fit or a positive time in it; t_large also
    None without large groups."""
    if fit is None:
        return None, None
    _fit_ok(res, fit)
    p_L = _per_sample(fit, B_L)  # s/sample at B_L
    if p_L is None:
        return None, None
    T0 = (_sig4(p_L) if fit.per_sample(B_L) > 0 else p_L) * shares.d / shares.n
    return T0, (p_L * shares.d_L if shares.n_large > 0 else None)


def _explicit_small(res: int, B_S: Any, B_L: int) -> int:
    """plan.small_batch at `res`, refused unless it is an integer in [1, B_L]."""
    if isinstance(B_S, bool) or not isinstance(B_S, int) or B_S < 1:
        raise PlanError(f"explicit B_S at {res} px is {B_S!r}; it must be an integer >= 1")
    if B_S > B_L:
        raise PlanError(
            f"explicit B_S = {B_S} at {res} px exceeds B_L = {B_L}; the small batch must be <= "
            "the large one: lower plan.small_batch or raise plan.large_batch"
        )
    return B_S


def _epoch_time(
    shares: Plan, source: str, T0: float | None, t_large: float | None, t_small: float | None
) -> float | None:
    """Predicted epoch time in s: T0 for a plain plan, k*T0 where B_S is the formula's; else
    (explicit, raised to the floor, from the table, B_L) the slowest group sets the pace."""
    if T0 is None:
        return None
    if shares.n_small == 0:
        return T0
    if source == "planned":
        return shares.k * T0
    known = [t for t in (t_large, t_small) if t is not None]
    return max(known) if known else None


def _resolution_plan(
    shares: Plan,
    res: int,
    B_L: int,
    fit: TimeFit | None,
    sfit: TimeFit | None,
    small_batch: Mapping[int, int],
    min_small: int,
) -> ResolutionPlan:
    """The plan at one resolution for the shares of `shares`: the plain times from `fit`, B_S the
    way `_small_way` says (sfit: the small groups' time model), and the predicted times."""
    if isinstance(B_L, bool) or not isinstance(B_L, int) or B_L < 1:
        raise PlanError(f"B_L at {res} px is {B_L!r}; it must be an integer >= 1 (plan.large_batch)")
    way = _small_way(shares, res in small_batch)
    if fit is None and way == "solve":
        raise PlanError(
            f"no time fit for {res} px to plan B_S from; add {res} to the timing file "
            "(`hpc-dualbatch profile`) or give plan.small_batch for it"
        )
    T0, t_large = _plain_times(shares, res, fit, B_L)
    B_S: int | None = None
    source, note, span = "none", "", None
    if way == "explicit":
        B_S, source = _explicit_small(res, small_batch[res], B_L), "explicit"
    elif way == "equal":
        B_S, source = B_L, "planned"
    elif way == "solve":
        assert fit is not None and sfit is not None
        _fit_ok(res, sfit)
        B_S, source, note, span = solve_small_batch(shares, res, fit, sfit, B_L, T0, min(min_small, B_L))
    t_small = None
    if B_S is not None and shares.d_S is not None and sfit is not None:
        p_S = _per_sample(sfit, B_S)
        t_small = p_S * shares.d_S if p_S is not None else None
    return ResolutionPlan(
        resolution=res,
        B_L=B_L,
        B_S=B_S,
        T0=T0,
        epoch_time=_epoch_time(shares, source, T0, t_large, t_small),
        t_large=t_large,
        t_small=t_small,
        small_source=source,
        note=note,
        B_S_range=span,
    )


def plan_dual_batch(
    fits: Mapping[int, TimeFit],
    large_batch: Mapping[int, int],
    n: int,
    n_small: int,
    k: float,
    d: int,
    small_batch: Mapping[int, int] | None = None,
    small_fits: Mapping[int, TimeFit] | None = None,
    min_small: int = 1,
) -> Plan:
    """Plan B_S and the sample shares for every resolution in `large_batch`.

    `small_batch` gives explicit B_S for some resolutions (the shares still come
    from k); the others are solved from their time fit. A fit is needed only
    where B_S is solved; without one, the predicted times of that resolution
    are None. `small_fits`: the small groups' own time model where it was measured
    apart (an MPI-job profile); T0 always comes from `fits`. `min_small`: the floor of a
    solved B_S (plan.min_small_batch; 1 reproduces the paper's formula as it is), at most B_L.
    A solved B_S always lies in [min(min_small, B_L), B_L]; where the fit cannot give it
    (its fixed cost indistinguishable from zero) the plan says in the resolution's `note` what
    it chose instead (`small_batch.solve_small_batch`).
    """
    check_inputs(n, n_small, k, d)
    if isinstance(min_small, bool) or not isinstance(min_small, int) or min_small < 1:
        raise PlanError(
            f"the floor of B_S is {min_small!r}; it must be an integer >= 1 (plan.min_small_batch)"
        )
    if not large_batch:
        raise PlanError(
            "no B_L given (plan.large_batch is empty); give one per resolution of schedule.resolutions"
        )
    d_L, d_S = sample_shares(n, n_small, k, d)
    shares = Plan(n=n, n_small=n_small, k=k, d=d, d_L=d_L, d_S=d_S)  # no resolutions yet
    explicit, own = small_batch or {}, small_fits or {}
    out: dict[int, ResolutionPlan] = {}
    for res in sorted(large_batch):
        fit = fits.get(res)
        sfit = own.get(res, fit)  # the small groups' model (their own where measured)
        out[res] = _resolution_plan(shares, res, large_batch[res], fit, sfit, explicit, min_small)
    return replace(shares, resolutions=out)


def plan_from_config(cfg: Any, d: int) -> Plan:
    """Plan for a `Config`: explicit plan.small_batch where given, else B_S from the timing file."""
    p, res = cfg.plan, list(cfg.schedule.resolutions)
    missing_bl = [r for r in res if r not in p.large_batch]
    if missing_bl:
        raise PlanError(f"plan.large_batch has no B_L for {missing_bl} px; give one per schedule.resolutions")
    large = {r: p.large_batch[r] for r in res}
    small = {r: p.small_batch[r] for r in res if r in p.small_batch}
    fits: dict[int, TimeFit] = {}
    small_fits: dict[int, TimeFit] = {}
    need_fit = [r for r in res if r not in small] if cfg.workers.small > 0 else []
    if need_fit or p.timing:
        from hpc_dualbatch.method.timing import load_timing

        if need_fit and not p.timing:
            raise PlanError(
                f"plan.timing is empty but B_S at {need_fit} px must be planned from a time fit; run "
                "`hpc-dualbatch profile --config CONFIG.yaml --out timing.json` and set plan.timing, "
                "or give plan.small_batch for every resolution"
            )
        fits = load_timing(p.timing, res)
        small_fits = load_timing(p.timing, res, role="small")
    plan = plan_dual_batch(
        fits, large, cfg.n_groups, cfg.workers.small, p.k, d, small, small_fits, small_floor(cfg)
    )
    check_shares(plan, list(cfg.workers.groups), d)
    return plan


def timing_warning(cfg: Any, channels: int | None = None) -> str:
    """One line where the timing file B_S is planned from was measured on another model than the
    config's ("" where it matches, or no B_S is planned from a file)."""
    from hpc_dualbatch.method.timing import load_timing_meta, meta_mismatch

    planned = cfg.workers.small > 0 and bool(planned_resolutions(cfg))
    if not (planned and cfg.plan.timing):
        return ""
    diff = meta_mismatch(load_timing_meta(cfg.plan.timing), cfg.model.arch, cfg.model.width, channels)
    if not diff:
        return ""
    return (
        f"warning: timing file '{cfg.plan.timing}' was measured on another model: {', '.join(diff)}; "
        "B_S is planned from that model's step times: profile this one (`hpc-dualbatch profile`)"
    )


def small_floor(cfg: Any) -> int:
    """The floor of a planned B_S: plan.min_small_batch, and at least one sample per rank of the
    largest small group (`rank_batches` gives every rank a part of each step)."""
    small_ranks = cfg.workers.groups[cfg.n_groups - cfg.workers.small :] if cfg.workers.small else []
    return max([cfg.plan.min_small_batch, *small_ranks])


def _short_groups(plan: Plan, ranks: list[int]) -> list[int]:
    return [g for g in range(plan.n) if plan.share(g) < ranks[g]]


def check_shares(plan: Plan, ranks: list[int], d: int, search: int = 100_000) -> None:
    """Every rank of every group must get at least one sample per mini-epoch; a group whose share
    rounds below its rank count would train on nothing and commit unchanged weights."""
    short = _short_groups(plan, ranks)
    if not short:
        return
    g = short[0]
    minimum = None
    for cand in range(d + 1, d + search):  # the shares are rounded, so search the first d that works
        try:
            d_L, d_S = sample_shares(plan.n, plan.n_small, plan.k, cand)
        except PlanError:
            continue
        trial = Plan(plan.n, plan.n_small, plan.k, cand, d_L, d_S)
        if not _short_groups(trial, ranks):
            minimum = cand
            break
    need = f"at least {minimum}" if minimum is not None else f"more than {d + search}"
    raise PlanError(
        f"plan.samples_per_epoch d = {d} gives group {g} ({ranks[g]} ranks, "
        f"{'small' if plan.is_small(g) else 'large'}) {plan.share(g)} samples per epoch: every rank "
        f"needs at least one, or the group trains on nothing; plan.samples_per_epoch must be {need} "
        f"(0 = the whole training split)"
    )


def predicted_run_time(plan: Plan, sched: Any) -> float:
    """Seconds: the predicted epoch time of each epoch's resolution, summed over the schedule."""
    from hpc_dualbatch.method.schedule import resolution_at

    total = 0.0
    for e in range(sched.epochs):
        rp = plan.at(resolution_at(e, sched))
        if rp.epoch_time is None:
            raise PlanError(
                f"no predicted time at {rp.resolution} px (no time fit); set plan.timing to a file from "
                "`hpc-dualbatch profile`"
            )
        total += rp.epoch_time
    return total


def samples_per_epoch(cfg: Any, override: int | None = None) -> int:
    """d: --samples, else plan.samples_per_epoch, else the staged training split's size."""
    if override:
        return override
    if cfg.plan.samples_per_epoch > 0:
        return cfg.plan.samples_per_epoch
    if cfg.data.path and file_kind(cfg.data.path) != "missing":  # (open_staged names what else it is)
        from hpc_dualbatch.data import open_staged

        return int(open_staged(cfg.data.path).num_samples("train"))
    raise PlanError(
        f"samples per epoch unknown: data file '{cfg.data.path}' does not exist and "
        "plan.samples_per_epoch is 0; pass --samples D, set plan.samples_per_epoch, or stage the data"
    )
