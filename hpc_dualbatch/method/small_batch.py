"""B_S at one resolution, solved from the time model and bounded (method section 1;
docs/planning.md, "Where the formula cannot decide").

A small group of d_S samples finishes its mini-epoch with the large groups in k*T0 where

    B_S = b / (k*T0/d_S - a)

(a s/sample, b s/step: the small groups' `TimeFit`). B_S = round-half-up of the formula, and a
solved B_S always lies in [floor, B_L] (floor: plan.min_small_batch, at most B_L). Where the
fit cannot give it, `small_source` says what was chosen instead and `note` says why in one line:
floor (the formula asks for less), table (the fixed cost per step is not distinguishable from
zero: the measured step times decide), large (even B_L is slower than the budget).
"""

from __future__ import annotations

import math

from hpc_dualbatch.method.plan_record import Plan
from hpc_dualbatch.method.shares import round_half_up
from hpc_dualbatch.method.timing import TimeFit, per_sample_table


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


def _from_formula(res: int, sfit: TimeFit, budget: float, B_L: int, floor: int) -> tuple[int, str, str]:
    """A sound fit: the method's formula, capped at B_L and raised to the floor where it asks for
    less; B_L where even B_L spends more than the budget (s/sample a small group may spend, k*T0/d_S)."""
    denom = budget - sfit.a  # s/sample left for the fixed costs of a small group
    if not denom > 0:
        note = (
            f"{res} px: even B_L is slower than the small groups' budget (a = {sfit.a:.4g} s/sample "
            f"alone, budget {budget:.4g}): B_S = B_L, the epoch takes longer than k*T0"
        )
        return B_L, "large", note
    raw = sfit.b / denom
    B_S = min(round_half_up(raw), B_L)
    if B_S >= floor:
        return B_S, "planned", ""
    note = (
        f"{res} px: the time model asks for B_S = {raw:.3g}; the floor plan.min_small_batch "
        f"gives {floor} (the epoch ends before k*T0)"
    )
    return floor, "floor", note


def _from_table(res: int, sfit: TimeFit, c: float, B_L: int, floor: int, ref: float) -> tuple[int, str, str]:
    """A fit whose fixed cost is not distinguishable from zero: the smallest measured batch in
    [floor, B_L] whose measured s/sample keeps within c = k d / (n d_S) times `ref` (the large
    groups' s/sample at B_L as measured), B_L where none does, or the
    floor when nothing was measured (the fit is then the only evidence, and says a smaller batch
    costs no more)."""
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


def solve_small_batch(
    shares: Plan, res: int, fit: TimeFit, sfit: TimeFit, B_L: int, T0: float | None, floor: int
) -> tuple[int, str, str, tuple[int, int] | None]:
    """(B_S, small_source, note, B_S_range) at `res` for the n, k, d and d_S of `shares`.

    fit: the large groups' time model (T0 = (a + b/B_L) d/n comes from it, None where it predicts
    no positive time); sfit: the small groups' own (`fit` where it was not measured apart);
    floor: min(plan.min_small_batch, B_L). Never below `floor`, never above B_L."""
    assert shares.d_S is not None
    if T0 is None:  # no positive time anywhere in the fit: nothing to plan from
        note = (
            f"{res} px: the time fit predicts no positive time (a = {fit.a:.3g}, "
            f"b = {fit.b:.3g}) and has no measured points: B_S = the floor"
        )
        return floor, "floor", note, None
    k, d, n, d_S = shares.k, shares.d, shares.n, shares.d_S
    c = k * d / (n * d_S)
    # the large groups' s/sample at B_L as measured (where the fit is not sound), the table's yardstick
    table = per_sample_table(fit, B_L)
    ref = table[-1][1] if table and not fit.sound else T0 * n / d
    if sfit.sound:
        B_S, source, note = _from_formula(res, sfit, k * T0 / d_S, B_L, floor)
    else:
        B_S, source, note = _from_table(res, sfit, c, B_L, floor, ref)
    return B_S, source, note, small_batch_range(sfit, c, B_L)
