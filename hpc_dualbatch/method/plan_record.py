"""The plan record: batch sizes, sample shares and predicted times per resolution, as the
planner (`plan.py`) makes them, `plan.json` holds them and `hpc-dualbatch plan` prints them.

Groups are numbered 0..n-1; the last n_S are small (config workers.small).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hpc_dualbatch.atomic import read_json, write_json
from hpc_dualbatch.config import small_groups
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.shares import FACTOR_MODES, contribution_factor


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


def save_plan(plan: Plan, path: str) -> None:
    """Write the plan as JSON, atomically."""
    write_json(path, plan.to_dict())


def load_plan(path: str) -> Plan:
    return Plan.from_dict(
        read_json(path, "plan file", PlanError, "write one with `hpc-dualbatch plan --out FILE`")
    )


def format_plan(plan: Plan, factor_mode: str) -> str:
    """The plan as `hpc-dualbatch plan` prints it: one line per resolution, a B_S marked by how it
    was chosen (* explicit, ^ floor, ~ table, ! B_L), then each resolution's interval and note."""

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
