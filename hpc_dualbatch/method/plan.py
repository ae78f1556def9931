"""The dual-batch planner (method section 1); the `plan` command is commands/plan.py.

Given the time model per resolution (`timing.TimeFit`: a s/sample, b s/step),
the large batch B_L per resolution, n worker groups of which the last n_S
train with the small batch, the allowed extra-time ratio k and d samples per
epoch:

    T0  = (a + b/B_L) * d/n                plain epoch time, all groups large
    d_L = k * d/n                          samples per large group per epoch
    d_S = (d - n_L * d_L) / n_S            samples per small group per epoch
    B_S = b / (k*T0/d_S - a)               small groups also finish in k*T0

Rounding (reproduces the paper's Table 6 exactly, see docs/planning.md):

* the shares handed to groups are integers: d_L = round(k*d/n), then
  d_S = round((d - n_L*d_L) / n_S) from the integer d_L (round = half up), so
  n_L*d_L + n_S*d_S differs from d by at most n_S/2 samples;
* the per-sample time at B_L, a + b/B_L, is taken to 4 significant figures
  before T0 is formed (the paper evidently planned from its tabulated
  ms/sample values; with full precision two of Table 6's eight B_S are off
  by one), a change of at most 0.05 % of T0;
* B_S = round-half-up of the formula.

"All small" (n_S = n) gives every group d/n samples; d_L = round(k*d/n) is kept
as the reference share for the contribution factor, as in the paper's n_S = 4
row. k = 1 with n_S = 0 is plain training.

Every plan that cannot work raises `PlanError` saying why and what would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hpc_dualbatch.atomic import file_kind, read_json, write_json
from hpc_dualbatch.config import CHOICES, planned_resolutions, small_groups
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.timing import TimeFit, per_sample_table

FACTOR_MODES = CHOICES["plan.factor"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _sig4(x: float) -> float:
    """x to 4 significant figures (the paper's tabulated per-sample times)."""
    return float(f"{x:.4g}")


def contribution_factor(d_S: float, d_L: float, mode: str) -> float:
    """PS merge weight f of a small group: d_S/d_L, sqrt(d_S/d_L) or 1 (large groups: always 1)."""
    if mode == "data_ratio":
        return d_S / d_L
    if mode == "sqrt":
        return math.sqrt(d_S / d_L)
    if mode == "none":
        return 1.0
    raise PlanError(f"contribution factor mode {mode!r} is unknown; valid: {', '.join(FACTOR_MODES)}")


@dataclass(frozen=True)
class ResolutionPlan:
    """Batch sizes and predicted times at one resolution."""

    resolution: int  # px
    B_L: int  # samples per step of a large group
    B_S: int | None  # samples per step of a small group (None: no small groups)
    T0: float | None  # s, plain epoch time (None: no time fit)
    epoch_time: float | None  # s, predicted epoch time: k*T0 (dual), T0 (plain)
    t_large: float | None  # s, predicted mini-epoch of a large group: (a + b/B_L) * d_L
    t_small: float | None  # s, predicted mini-epoch of a small group: (a + b/B_S) * d_S
    # planned: the time model's formula | floor: raised to plan.min_small_batch | table: from the
    # measured step times (a fit without a measurable fixed cost) | large: B_L, the small groups
    # cannot keep k at any batch | explicit: plan.small_batch | none: no small groups
    small_source: str = "planned"
    note: str = ""  # what was chosen instead of the formula, and why ("" where the formula holds)
    B_S_range: tuple[int, int] | None = None  # B_S the fit's 90 % intervals allow (None: no intervals)


@dataclass(frozen=True)
class Plan:
    n: int  # worker groups
    n_small: int  # n_S: the last n_S groups train with B_S
    k: float  # allowed extra time per epoch over plain training
    d: int  # samples per epoch
    d_L: int  # samples per large group per epoch (the reference share when n_L = 0)
    d_S: int | None  # samples per small group per epoch (None: no small groups)
    resolutions: dict[int, ResolutionPlan] = field(default_factory=dict)

    @property
    def n_large(self) -> int:
        return self.n - self.n_small

    def is_small(self, group: int) -> bool:
        """Group indices 0..n-1; the last n_S are small (config workers.small)."""
        if not 0 <= group < self.n:
            raise ValueError(f"group must be in [0, {self.n}), got {group}")
        return small_groups(self.n, self.n_small)[group]

    def share(self, group: int) -> int:
        """Samples per epoch of a group."""
        return self.d_S if self.is_small(group) else self.d_L  # type: ignore[return-value]

    def batch(self, group: int, resolution: int) -> int:
        rp = self.at(resolution)
        return rp.B_S if self.is_small(group) else rp.B_L  # type: ignore[return-value]

    def factor(self, group: int, mode: str) -> float:
        """Contribution factor f of a group in the PS merge w <- (w + f*w_i) / (1 + f)."""
        if mode not in FACTOR_MODES:
            raise PlanError(f"contribution factor mode {mode!r} is unknown; valid: {', '.join(FACTOR_MODES)}")
        if not self.is_small(group):
            return 1.0
        return contribution_factor(self.d_S, self.d_L, mode)  # type: ignore[arg-type]

    def small_factor(self, mode: str) -> float | None:
        """f of the small groups (None when there are none)."""
        return None if self.d_S is None else contribution_factor(self.d_S, self.d_L, mode)

    def at(self, resolution: int) -> ResolutionPlan:
        if resolution not in self.resolutions:
            raise PlanError(
                f"the plan has no batch sizes for {resolution} px (it has {sorted(self.resolutions)}); "
                "re-plan with this resolution in schedule.resolutions"
            )
        return self.resolutions[resolution]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["resolutions"] = {str(r): asdict(rp) for r, rp in sorted(self.resolutions.items())}
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        try:
            res = {int(r): ResolutionPlan(**v) for r, v in raw["resolutions"].items()}
            fields = {k: raw[k] for k in ("n", "n_small", "k", "d", "d_L", "d_S")}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"not a plan written by `hpc-dualbatch plan` ({type(e).__name__}: {e})") from None
        return cls(**fields, resolutions=res)


def _check_inputs(n: int, n_small: int, k: float, d: int) -> None:
    if n < 1:
        raise PlanError(f"the number of worker groups n is {n}; it must be >= 1")
    if not math.isfinite(k) or k < 1:
        raise PlanError(
            f"the extra-time ratio k is {k}; it must be >= 1 "
            "(1 = plain training; the paper uses 1.05 or 1.10)"
        )
    if not 0 <= n_small <= n:
        raise PlanError(f"n_S (workers.small) is {n_small}; it must be in 0..{n} (the number of groups)")
    if n_small == 0 and k > 1:
        raise PlanError(
            f"k = {k} > 1 buys extra time for small-batch groups, but n_S (workers.small) is 0; "
            "set workers.small to 1 or more, or plan.k to 1 for plain training"
        )
    if d < n:
        raise PlanError(
            f"samples per epoch d = {d} is smaller than the {n} groups; each group needs >= 1 sample"
        )


def _shares(n: int, n_small: int, k: float, d: int) -> tuple[int, int | None]:
    d_L = _round_half_up(k * d / n)
    if n_small == 0:
        return d_L, None
    n_large = n - n_small
    if n_large == 0:
        return d_L, _round_half_up(d / n)  # all small: every group gets d/n
    rest = d - n_large * d_L
    d_S = _round_half_up(rest / n_small)
    if rest <= 0 or d_S <= 0:
        raise PlanError(
            f"k = {k} gives each of the {n_large} large groups d_L = {d_L} samples, {n_large * d_L} in all, "
            f"leaving {rest} of d = {d} for the {n_small} small group(s) (d_S <= 0); k must be below "
            f"n/n_L = {n / n_large:.4g}: lower plan.k or use more small groups"
        )
    return d_L, d_S


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


def _formula(a: float, b: float, c: float, B_L: int) -> float:
    """B_S = b / (k*T0/d_S - a) with T0 = (a + b/B_L) d/n written as c = k d / (n d_S):
    b / (a (c - 1) + c b / B_L); inf where the denominator is not positive."""
    denom = a * (c - 1) + c * b / B_L
    return b / denom if denom > 0 else math.inf


def small_batch_range(fit: TimeFit, c: float, B_L: int) -> tuple[int, int] | None:
    """The B_S the fit's 90 % intervals allow: the formula at (a high, b low) and (a low, b high),
    where B_S is smallest and largest (it rises with b and falls with a). Clipped to [0, B_L];
    0 at the low end: the interval of b reaches 0, any B_S is within the measurement."""
    if fit.a_ci is None or fit.b_ci is None:
        return None
    lo = 0.0 if fit.b_ci[0] <= 0 else _formula(fit.a_ci[1], fit.b_ci[0], c, B_L)
    hi = _formula(max(fit.a_ci[0], 0.0), fit.b_ci[1], c, B_L) if fit.b_ci[1] > 0 else 0.0
    return int(min(lo, B_L)), int(min(math.ceil(hi), B_L))


def _small_batch(
    res: int, sfit: TimeFit, budget: float, c: float, B_L: int, floor: int, ref: float
) -> tuple[int, str, str]:
    """B_S for a solved resolution: (batch, source, note). Never below `floor`, never above B_L.

    budget: s/sample a small group may spend (k*T0/d_S); c = k d / (n d_S); ref: the large groups'
    s/sample at B_L as measured (for the table). A sound fit gives the method's formula (raised to
    the floor where it asks for less); a fit whose fixed cost is not distinguishable from zero
    gives the smallest measured batch in [floor, B_L] whose measured s/sample keeps the budget,
    or the floor when nothing was measured (the fit is then the only evidence, and says a smaller
    batch costs no more)."""
    if sfit.sound:
        denom = budget - sfit.a  # s/sample left for the fixed costs of a small group
        if not denom > 0:
            note = (
                f"{res} px: even B_L is slower than the small groups' budget (a = {sfit.a:.4g} s/sample "
                f"alone, budget {budget:.4g}): B_S = B_L, the epoch takes longer than k*T0"
            )
            return B_L, "large", note
        raw = sfit.b / denom
        B_S = min(_round_half_up(raw), B_L)
        if B_S >= floor:
            return B_S, "planned", ""
        note = (
            f"{res} px: the time model asks for B_S = {raw:.3g}; the floor plan.min_small_batch "
            f"gives {floor} (the epoch ends before k*T0)"
        )
        return floor, "floor", note
    why = f"{res} px: the fixed cost per step is not distinguishable from zero (b = {sfit.b:.3g} s/step"
    why += f", 90 % interval [{sfit.b_ci[0]:.2g}, {sfit.b_ci[1]:.2g}]" if sfit.b_ci else ""
    why += f", a = {sfit.a:.3g} s/sample)" if sfit.a <= 0 else ")"
    table = [(x, p) for x, p in per_sample_table(sfit, B_L) if x >= floor]
    keeps = [x for x, p in table if p <= c * ref]
    if keeps:
        note = f"; B_S = {min(keeps)}, the smallest measured batch >= {floor} whose measured time keeps k"
        return min(keeps), "table", why + note
    if table:
        return B_L, "table", why + f" and no measured batch in [{floor}, {B_L}] keeps k: B_S = B_L"
    return floor, "floor", why + f" and nothing was measured: B_S = the floor {floor}"


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
    it chose instead (`_small_batch`).
    """
    _check_inputs(n, n_small, k, d)
    if isinstance(min_small, bool) or not isinstance(min_small, int) or min_small < 1:
        raise PlanError(
            f"the floor of B_S is {min_small!r}; it must be an integer >= 1 (plan.min_small_batch)"
        )
    if not large_batch:
        raise PlanError(
            "no B_L given (plan.large_batch is empty); give one per resolution of schedule.resolutions"
        )
    small_batch = dict(small_batch or {})
    d_L, d_S = _shares(n, n_small, k, d)
    dual = n_small > 0
    all_small = n_small == n
    out: dict[int, ResolutionPlan] = {}
    for res in sorted(large_batch):
        B_L = large_batch[res]
        if isinstance(B_L, bool) or not isinstance(B_L, int) or B_L < 1:
            raise PlanError(f"B_L at {res} px is {B_L!r}; it must be an integer >= 1 (plan.large_batch)")
        fit = fits.get(res)
        sfit = (small_fits or {}).get(res, fit)  # the small groups' model (their own where measured)
        explicit = dual and res in small_batch
        solve = dual and not explicit and d_S < d_L  # type: ignore[operator]
        if fit is None and solve:
            raise PlanError(
                f"no time fit for {res} px to plan B_S from; add {res} to the timing file "
                "(`hpc-dualbatch profile`) or give plan.small_batch for it"
            )
        T0 = t_large = t_small = epoch_time = None
        B_S: int | None = None
        source, note, span = ("planned" if dual else "none"), "", None
        if fit is not None:
            _fit_ok(res, fit)
            p_L = _per_sample(fit, B_L)  # s/sample at B_L
            if p_L is not None:
                T0 = (_sig4(p_L) if fit.per_sample(B_L) > 0 else p_L) * d / n
                t_large = p_L * d_L if not all_small else None
        if dual and explicit:
            B_S, source = small_batch[res], "explicit"
            if isinstance(B_S, bool) or not isinstance(B_S, int) or B_S < 1:
                raise PlanError(f"explicit B_S at {res} px is {B_S!r}; it must be an integer >= 1")
            if B_S > B_L:
                raise PlanError(
                    f"explicit B_S = {B_S} at {res} px exceeds B_L = {B_L}; the small batch must be <= "
                    "the large one: lower plan.small_batch or raise plan.large_batch"
                )
        elif dual and not solve:
            # k = 1 (or shares rounded equal): a small group has no more time per sample than a
            # large one, so B_S = B_L.
            B_S = B_L
        elif solve:
            assert fit is not None and sfit is not None and d_S is not None
            _fit_ok(res, sfit)
            if T0 is None:  # no positive time anywhere in the fit: nothing to plan from
                B_S, source = min(min_small, B_L), "floor"
                note = (
                    f"{res} px: the time fit predicts no positive time (a = {fit.a:.3g}, "
                    f"b = {fit.b:.3g}) and has no measured points: B_S = the floor"
                )
            else:
                c = k * d / (n * d_S)
                table = per_sample_table(fit, B_L)
                ref = table[-1][1] if table and not fit.sound else T0 * n / d
                B_S, source, note = _small_batch(res, sfit, k * T0 / d_S, c, B_L, min(min_small, B_L), ref)
                span = small_batch_range(sfit, c, B_L)
        if B_S is not None and d_S is not None and sfit is not None:
            p_S = _per_sample(sfit, B_S)
            t_small = p_S * d_S if p_S is not None else None
        if T0 is not None:
            if not dual:
                epoch_time = T0
            elif source == "planned":
                epoch_time = k * T0
            else:  # explicit, raised to the floor, from the table: the slowest group sets the pace
                known = [t for t in (t_large, t_small) if t is not None]
                epoch_time = max(known) if known else None
        out[res] = ResolutionPlan(
            resolution=res,
            B_L=B_L,
            B_S=B_S,
            T0=T0,
            epoch_time=epoch_time,
            t_large=t_large,
            t_small=t_small,
            small_source=source,
            note=note,
            B_S_range=span,
        )
    return Plan(n=n, n_small=n_small, k=k, d=d, d_L=d_L, d_S=d_S, resolutions=out)


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
            d_L, d_S = _shares(plan.n, plan.n_small, plan.k, cand)
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


def save_plan(plan: Plan, path: str) -> None:
    """Write the plan as JSON, atomically."""
    write_json(path, plan.to_dict())


def load_plan(path: str) -> Plan:
    return Plan.from_dict(
        read_json(path, "plan file", PlanError, "write one with `hpc-dualbatch plan --out FILE`")
    )


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


def format_plan(plan: Plan, factor_mode: str) -> str:
    def t(x: float | None) -> str:
        return f"{x:9.2f}" if x is not None else f"{'-':>9}"

    kind = "plain (all large)" if plan.n_small == 0 else ("all small" if plan.n_large == 0 else "dual-batch")
    f = plan.small_factor(factor_mode)
    lines = [
        f"{kind}: n = {plan.n} groups, n_S = {plan.n_small}, k = {plan.k:g}, d = {plan.d} samples/epoch",
        f"shares: d_L = {plan.d_L}, d_S = {plan.d_S if plan.d_S is not None else '-'} samples/group/epoch; "
        f"factor ({factor_mode}) large 1, small {f'{f:.4f}' if f is not None else '-'}",
        f"{'res px':>6} {'B_L':>6} {'B_S':>6} {'d_L':>7} {'d_S':>7} {'factor':>7} {'T0 s':>9} {'epoch s':>9}",
    ]
    for r, rp in sorted(plan.resolutions.items()):
        mark = {"explicit": "*", "floor": "^", "table": "~", "large": "!"}.get(rp.small_source, "")
        bs = f"{rp.B_S}{mark}" if rp.B_S is not None else "-"
        lines.append(
            f"{r:6d} {rp.B_L:6d} {bs:>6} {plan.d_L:7d} {plan.d_S if plan.d_S is not None else '-':>7} "
            f"{f'{f:.4f}' if f is not None else '-':>7} {t(rp.T0)} {t(rp.epoch_time)}"
        )
    if any(rp.small_source == "explicit" for rp in plan.resolutions.values()):
        lines.append("* explicit plan.small_batch")
    for r, rp in sorted(plan.resolutions.items()):
        if rp.B_S_range is not None:
            lo, hi = rp.B_S_range
            lines.append(
                f"{r} px: the profile's 90 % intervals allow B_S in [{lo}, {hi}] before the floor and B_L"
                + (" (the fixed cost may be zero: any B_S keeps the time)" if lo == 0 else "")
            )
        if rp.note:
            lines.append(rp.note)
    return "\n".join(lines)
