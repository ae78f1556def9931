"""The time model and the timing file (`hpc-dualbatch profile` measures it: runtime/steptime.py
in one process, commands/profile_run.py under mpirun).

Method section 1: the time of one training step at batch x is linear,
`t(x) = a*x + b` (a: seconds per sample, b: seconds of fixed cost per step),
fitted by least squares per (model, resolution, device). Pushing d samples
through one worker at batch x then takes `(a + b/x) * d` seconds.

A timing file holds a and b per resolution (and per role where it was measured
under mpirun), the measured points, B_L per resolution and where it was made;
the planner (`method/plan.py`) and the adaptive planner read it.

The timing file is plain JSON, never a pickle, so it can be read and edited by
hand and loaded safely from anywhere.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hpc_dualbatch.atomic import read_json, write_json
from hpc_dualbatch.errors import PlanError

TIMING_FORMAT = "hpc_dualbatch.timing"
TIMING_VERSION = 1


@dataclass(frozen=True)
class TimeFit:
    """A least-squares fit `t(x) = a*x + b` of the step time at batch x."""

    a: float  # s per sample
    b: float  # s per step (fixed cost: launch, optimiser step, Python)
    r2: float  # coefficient of determination of the fit
    points: tuple[tuple[int, float], ...] = ()  # measured (batch, median step time in s)
    # 90 % bootstrap intervals of a and b (`fit_robust`); None: not measured (a hand-entered fit,
    # e.g. the paper's, is taken as exact)
    a_ci: tuple[float, float] | None = None
    b_ci: tuple[float, float] | None = None

    def per_sample(self, batch: float) -> float:
        """Predicted seconds per sample at `batch`: a + b/batch (the one place this is written)."""
        return self.a + self.b / batch

    @property
    def fixed_cost_known(self) -> bool:
        """Whether the fixed cost per step is distinguishable from zero: b > 0 and, where it was
        measured, its whole interval above 0. When it is not, the line cannot tell what a smaller
        batch costs per sample, and the formula for B_S divides noise by noise."""
        return self.b > 0 and (self.b_ci is None or self.b_ci[0] > 0)

    @property
    def sound(self) -> bool:
        """a > 0 and the fixed cost known: B_S can be solved from this fit (small_batch.py)."""
        return self.a > 0 and self.fixed_cost_known


def fit_linear(points: Iterable[tuple[int, float]]) -> TimeFit:
    """Least-squares line through (batch, seconds) points, with R^2.

    Needs at least two distinct batch sizes. R^2 is 1 when the points lie on
    the line exactly (including the degenerate case of all-equal times).
    """
    pts = tuple((int(x), float(t)) for x, t in points)
    xs = [float(x) for x, _ in pts]
    ts = [t for _, t in pts]
    if len(set(xs)) < 2:
        raise PlanError(
            f"a time fit needs step times at two or more distinct batch sizes, got {sorted(set(xs))}; "
            "profile with e.g. --batches 16,32,64,128"
        )
    if not all(math.isfinite(v) for v in xs + ts):
        raise PlanError(f"a time fit needs finite (batch, seconds) points, got {pts}")
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxt = sum((x - mx) * (t - mt) for x, t in zip(xs, ts))
    a = sxt / sxx
    b = mt - a * mx
    ss_res = sum((t - (a * x + b)) ** 2 for x, t in zip(xs, ts))
    ss_tot = sum((t - mt) ** 2 for t in ts)
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res <= 1e-30 else 0.0
    return TimeFit(a=a, b=b, r2=r2, points=pts)


CI_LEVEL = 0.90  # two-sided level of the bootstrap intervals
# Bootstrap resamples: between resampling seeds the ends of b's interval moved by 1.7 % of its
# width (s.d.; 3.5 % at 400 resamples) on demo-like times; 4 ms per fit
RESAMPLES = 2000


def fit_robust(
    times: Mapping[int, Sequence[float]], stat: str = "median", resamples: int = RESAMPLES, seed: int = 0
) -> TimeFit:
    """The time fit of `fit_linear` through the median (or minimum) step time of each batch size,
    with bootstrap intervals on a and b: each batch size's timed steps are resampled with
    replacement, reduced, and refitted `resamples` times; the interval is the central CI_LEVEL of
    those fits (percentile bootstrap; 91 % of 100 simulated demo profiles held the true a and
    93 % the true b). Resampling is seeded: the same times give the same intervals.

    The median ignores the steps that another process's burst of load slowed (a fit of the raw
    steps would follow them); the interval says how much the repeats left the fit in doubt, which
    for b on a CPU is often more than b itself."""
    import numpy as np

    sizes = sorted(times)
    if any(len(times[x]) < 1 for x in sizes):
        raise PlanError(f"a time fit needs at least one timed step per batch size, got {dict(times)}")
    reduce = np.min if stat == "min" else np.median
    point = fit_linear((x, float(reduce(times[x]))) for x in sizes)
    rng = np.random.default_rng(seed)
    xs = np.array(sizes, dtype=float)
    ys = np.empty((resamples, len(sizes)))
    for j, x in enumerate(sizes):
        t = np.asarray(times[x], dtype=float)
        ys[:, j] = reduce(t[rng.integers(0, len(t), (resamples, len(t)))], axis=1)
    # least squares of every resample at once: a = cov(x, t) / var(x), b = mean(t) - a mean(x)
    xc = xs - xs.mean()
    a = (ys - ys.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    b = ys.mean(axis=1) - a * xs.mean()
    q = [(1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100]
    a_lo, a_hi = (float(v) for v in np.percentile(a, q))
    b_lo, b_hi = (float(v) for v in np.percentile(b, q))
    return replace(point, a_ci=(a_lo, a_hi), b_ci=(b_lo, b_hi))


def per_sample_table(fit: TimeFit, largest: int) -> list[tuple[int, float]]:
    """The measured seconds per sample (batch, t/batch) of the fit's points at batches <= largest."""
    return [(x, t / x) for x, t in sorted(fit.points) if x <= largest and t > 0]


def time_per_samples(fit: TimeFit, x: float, d: float) -> float:
    """Seconds to push d samples through one worker at batch x: (a + b/x) * d."""
    return fit.per_sample(x) * d


# ---------------------------------------------------------------------------
# Timing file


def _fit_doc(f: TimeFit) -> dict[str, Any]:
    return {
        "a": f.a,  # s/sample
        "b": f.b,  # s/step
        "r2": f.r2 if math.isfinite(f.r2) else None,  # null: not measured (hand-entered fit)
        "points": [[x, t] for x, t in f.points],  # [batch, median s/step]
        **({"a_ci": list(f.a_ci)} if f.a_ci else {}),  # s/sample, 90 % bootstrap interval
        **({"b_ci": list(f.b_ci)} if f.b_ci else {}),  # s/step, 90 % bootstrap interval
    }


def save_timing(
    path: str,
    fits: Mapping[int, TimeFit],
    meta: Mapping[str, Any],
    large_batch: Mapping[int, int] | None = None,
    small: Mapping[int, TimeFit] | None = None,
) -> None:
    """Write fits (+ B_L per resolution, + the small groups' own fit where measured apart, +
    free-form `meta`) as JSON, atomically."""
    doc = {
        "format": TIMING_FORMAT,
        "version": TIMING_VERSION,
        "meta": dict(meta),
        "resolutions": {
            str(r): {
                **_fit_doc(f),
                **({"large_batch": int(large_batch[r])} if large_batch and r in large_batch else {}),
                **({"small": _fit_doc(small[r])} if small and r in small else {}),
            }
            for r, f in sorted(fits.items())
        },
    }
    write_json(path, doc, allow_nan=False)  # plain JSON: no NaN/Infinity literals


def _read_doc(path: str) -> dict[str, Any]:
    hint = "create it with `hpc-dualbatch profile --config CONFIG.yaml --out FILE`"
    if not path:
        raise PlanError(f"no timing file given (config key 'plan.timing' is empty); {hint}")
    doc = read_json(path, "timing file", PlanError, hint)
    if not isinstance(doc, dict) or doc.get("format") != TIMING_FORMAT:
        raise PlanError(
            f"timing file '{path}' is not an hpc_dualbatch timing file (no \"format\": "
            f'"{TIMING_FORMAT}"); {hint}'
        )
    if doc.get("version") != TIMING_VERSION:
        raise PlanError(
            f"timing file '{path}' has version {doc.get('version')!r}; this package reads version "
            f"{TIMING_VERSION}; {hint}"
        )
    if not isinstance(doc.get("resolutions"), dict):
        raise PlanError(f"timing file '{path}' has no \"resolutions\" mapping; {hint}")
    return doc


def _number(path: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"timing file '{path}': {where} must be a finite number, got {value!r}")
    return float(value)


def load_timing(path: str, resolutions: Iterable[int], role: str = "large") -> dict[int, TimeFit]:
    """Read the fits for `resolutions` from a timing file, validating every field's type.

    role "large": the file's fit of every resolution (an error where one is missing); "small":
    the small groups' own fits where the file has them (an MPI-job profile), else none.
    Whether a fit is usable (a > 0, b > 0) is the planner's check: a plain
    plan needs no fit at all.
    """
    doc = _read_doc(path)
    table = doc["resolutions"]
    out: dict[int, TimeFit] = {}
    for r in resolutions:
        entry = table.get(str(r))
        if entry is None:
            have = ", ".join(sorted(table, key=lambda s: (len(s), s))) or "none"
            raise PlanError(
                f"timing file '{path}' has no fit for resolution {r} px (it has: {have}); re-run "
                f"`hpc-dualbatch profile` with {r} in schedule.resolutions"
            )
        if not isinstance(entry, dict):
            raise PlanError(f"timing file '{path}': resolutions[\"{r}\"] must be a mapping, got {entry!r}")
        where = f'resolutions["{r}"]'
        if role == "small":
            entry = entry.get("small")
            if entry is None:
                continue  # no fit of its own: the small groups plan from the file's fit
            where += ".small"
            if not isinstance(entry, dict):
                raise PlanError(f"timing file '{path}': {where} must be a mapping, got {entry!r}")
        out[int(r)] = _read_fit(path, where, entry)
    return out


def _read_fit(path: str, where: str, entry: dict[str, Any]) -> TimeFit:
    a = _number(path, f"{where}.a (s/sample)", entry.get("a"))
    b = _number(path, f"{where}.b (s/step)", entry.get("b"))
    # r2 is informative; a hand-entered fit (e.g. the paper's) may leave it out.
    r2 = float("nan") if entry.get("r2") is None else _number(path, f"{where}.r2", entry["r2"])
    raw = entry.get("points", [])
    if not isinstance(raw, list):
        raise PlanError(f"timing file '{path}': {where}.points must be a list of [batch, seconds]")
    pts = []
    for i, p in enumerate(raw):
        if (
            not isinstance(p, list)
            or len(p) != 2
            or isinstance(p[0], bool)
            or not isinstance(p[0], int)
            or p[0] < 1
        ):
            raise PlanError(
                f"timing file '{path}': {where}.points[{i}] must be [batch >= 1, seconds], got {p!r}"
            )
        pts.append((p[0], _number(path, f"{where}.points[{i}] seconds", p[1])))
    cis = {}
    for key, unit in (("a_ci", "s/sample"), ("b_ci", "s/step")):
        raw = entry.get(key)
        if raw is None:
            continue
        if not isinstance(raw, list) or len(raw) != 2:
            raise PlanError(f"timing file '{path}': {where}.{key} must be [low, high] in {unit}, got {raw!r}")
        lo, hi = (_number(path, f"{where}.{key}", v) for v in raw)
        if lo > hi:
            raise PlanError(f"timing file '{path}': {where}.{key} = {raw!r} has low > high")
        cis[key] = (lo, hi)
    return TimeFit(a=a, b=b, r2=r2, points=tuple(pts), **cis)


def meta_mismatch(meta: Mapping[str, Any], arch: str, width: int, channels: int | None = None) -> list[str]:
    """What in a timing file's `meta` differs from the model a run trains: [] where it matches or
    the file does not say (a hand-entered fit). A fit of another model times another network, so
    the B_S planned from it is another network's."""
    out = []
    for key, want in (("arch", arch), ("width", width), ("channels", channels)):
        have = meta.get(key)
        if want is not None and have is not None and have != want:
            out.append(f"{key} {have!r} (the run: {want!r})")
    return out


def load_timing_meta(path: str) -> dict[str, Any]:
    """The free-form `meta` block of a timing file (device, threads, clock, ...)."""
    meta = _read_doc(path).get("meta", {})
    return meta if isinstance(meta, dict) else {}
