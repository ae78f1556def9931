"""The samples each group trains per epoch, and the merge weight they give a small group
(method section 1).

With n worker groups of which the last n_S train with the small batch, the allowed extra-time
ratio k and d samples per epoch:

    d_L = k * d/n                          samples per large group per epoch
    d_S = (d - n_L * d_L) / n_S            samples per small group per epoch
    f   = d_S / d_L                        a small group's weight in the PS merge (plan.factor)

The shares handed to groups are integers: d_L = round(k*d/n), then d_S = round((d - n_L*d_L) / n_S)
from the integer d_L (round = half up), so n_L*d_L + n_S*d_S differs from d by at most n_S/2
samples. "All small" (n_S = n) gives every group d/n samples; d_L = round(k*d/n) is kept as the
reference share for the contribution factor, as in the paper's n_S = 4 row (docs/planning.md).
"""

from __future__ import annotations

import math

from hpc_dualbatch.config import CHOICES
from hpc_dualbatch.errors import PlanError

FACTOR_MODES = CHOICES["plan.factor"]


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


MAX_K = 100.0  # k: a small group may take this many times a plain epoch's time at most (the paper: 1.05-1.10)


def check_inputs(n: int, n_small: int, k: float, d: int) -> None:
    """Refuse a group count, k, n_S or d that no plan can be made from, saying what would work."""
    if n < 1:
        raise PlanError(f"the number of worker groups n is {n}; it must be >= 1")
    if not math.isfinite(k) or not 1 <= k <= MAX_K:
        raise PlanError(
            f"the extra-time ratio k is {k}; it must be in 1..{MAX_K:g} "
            "(1 = plain training; the paper uses 1.05 or 1.10)"
        )
    if not 0 <= n_small <= n:
        raise PlanError(f"n_S (workers.small) is {n_small}; it must be in 0..{n} (the number of groups)")
    if 0 < n_small < n and k >= n / (n - n_small):
        raise PlanError(
            f"k = {k} gives the {n - n_small} large groups k x d/n samples each, all of d or more, and "
            f"leaves none for the {n_small} small group(s); k must be below n/n_L = {n / (n - n_small):.4g}: "
            "lower plan.k or use more small groups"
        )
    if n_small == 0 and k > 1:
        raise PlanError(
            f"k = {k} > 1 buys extra time for small-batch groups, but n_S (workers.small) is 0; "
            "set workers.small to 1 or more, or plan.k to 1 for plain training"
        )
    if d < n:
        raise PlanError(
            f"samples per epoch d = {d} is smaller than the {n} groups; each group needs >= 1 sample"
        )


def sample_shares(n: int, n_small: int, k: float, d: int) -> tuple[int, int | None]:
    """(d_L, d_S): samples per large and per small group per epoch (d_S None: no small groups)."""
    d_L = round_half_up(k * d / n)
    if n_small == 0:
        return d_L, None
    n_large = n - n_small
    if n_large == 0:
        return d_L, round_half_up(d / n)  # all small: every group gets d/n
    rest = d - n_large * d_L
    d_S = round_half_up(rest / n_small)
    if rest <= 0 or d_S <= 0:
        raise PlanError(
            f"k = {k} gives each of the {n_large} large groups d_L = {d_L} samples, {n_large * d_L} in all, "
            f"leaving {rest} of d = {d} for the {n_small} small group(s) (d_S <= 0); k must be below "
            f"n/n_L = {n / n_large:.4g}: lower plan.k or use more small groups"
        )
    return d_L, d_S


def contribution_factor(d_S: float, d_L: float, mode: str) -> float:
    """PS merge weight f of a small group: d_S/d_L, sqrt(d_S/d_L) or 1 (large groups: always 1)."""
    if mode == "data_ratio":
        return d_S / d_L
    if mode == "sqrt":
        return math.sqrt(d_S / d_L)
    if mode == "none":
        return 1.0
    raise PlanError(f"contribution factor mode {mode!r} is unknown; valid: {', '.join(FACTOR_MODES)}")
