"""Adaptive planning (adapt.py): scales, the per-group re-plan, convergence on simulated
machines the profile does not describe, and the checkpointed state."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_dualbatch.method.adapt import Adapter
from hpc_dualbatch.method.plan import plan_dual_batch
from hpc_dualbatch.method.replan import (
    TASK_NOISE,
    TOL,
    Obs,
    ReplanInput,
    noise_of,
    replan,
    scale_of,
    small_batch_for,
    useful_batch,
)
from hpc_dualbatch.method.timing import TimeFit

# The method's published CIFAR fits (GTX 1080) and Table 6 (k = 1.05, d = 50,000, n = 4).
FITS = {24: TimeFit(a=3.53e-4, b=0.0148, r2=math.nan), 32: TimeFit(a=5.06e-4, b=0.0156, r2=math.nan)}
B_L = {24: 600, 32: 560}
D_L = 13_125
TABLE6 = {1: (10_625, 130, 102), 2: (11_875, 230, 185), 3: (12_292, 294, 243)}


def _obs(res: int, batch: int, samples: int, scale: float, warm: bool = False) -> Obs:
    return Obs(res, batch, samples, scale * FITS[res].per_sample(batch) * samples, warm)


def test_scale_is_measured_over_profiled_time() -> None:
    assert scale_of(FITS, [_obs(32, 100, 5000, 2.0)]) == pytest.approx(2.0)
    # Each task against the fit of its own resolution; the median ignores an outlier (a task
    # that overlapped another group's evaluation, a neighbour's burst).
    win = [_obs(24, 100, 5000, 1.1), _obs(32, 90, 5000, 5.0), _obs(32, 80, 5000, 1.3)]
    assert scale_of(FITS, win) == pytest.approx(1.3)
    # A warm-up task counts only while nothing else is known.
    assert scale_of(FITS, [_obs(32, 100, 5000, 3.0, warm=True)]) == pytest.approx(3.0)
    assert scale_of(FITS, [_obs(32, 100, 5000, 3.0, warm=True), _obs(24, 100, 5000, 1.5)]) == pytest.approx(
        1.5
    )
    assert scale_of(FITS, []) is None
    assert scale_of(FITS, [Obs(32, 100, 0, 0.0)]) is None  # a task without samples says nothing
    assert scale_of(FITS, [Obs(20, 100, 10, 1.0)]) is None  # no fit at 20 px


def test_small_batch_for_is_the_method_formula_per_group() -> None:
    f, share = FITS[32], 7_000
    for scale in (1.0, 1.4):  # B = s*b / (T/d - s*a), rounded half up
        raw = scale * f.b / (20.0 / share - scale * f.a)
        assert small_batch_for(f, scale, 20.0, share, 4, 560) == (int(math.floor(raw + 0.5)), False)


@pytest.mark.parametrize(
    ("scale", "target", "expect"),
    [
        (1.0, 5.06e-4 * 10_000, (560, True)),  # no time left for per-step costs: capped at hi
        (2.0, 4.0, (560, True)),  # scale*a alone exceeds T/d: capped
        (1.0, 10_000 * (5.06e-4 + 0.0156 / 600), (560, True)),  # it needs B = 600 > hi = 560
        (1.0, 1e6, (4, False)),  # all the time in the world: clipped up to lo (the group's ranks)
    ],
)
def test_small_batch_for_limits(scale: float, target: float, expect: tuple[int, bool]) -> None:
    assert small_batch_for(FITS[32], scale, target, 10_000, 4, 560) == expect


@pytest.mark.parametrize("n_small", sorted(TABLE6))
def test_unit_scales_reproduce_the_static_plan(n_small: int) -> None:
    """With every scale 1 the re-plan is the method's formula: Table 6 within the static
    planner's 4-significant-figure rounding of a + b/B_L (at most one sample)."""
    d_S = TABLE6[n_small][0]
    large, small = list(range(4 - n_small)), list(range(4 - n_small, 4))
    for res in (24, 32):
        static = plan_dual_batch(FITS, B_L, 4, n_small, 1.05, 50_000).resolutions[res]
        rp = replan(
            ReplanInput(FITS[res], dict.fromkeys(range(4), 1.0), large, small, B_L[res], D_L, d_S, {})
        )
        assert all(abs(rp.batches[h] - static.B_S) <= 1 for h in small)
        assert all(rp.batches[g] == B_L[res] for g in large)
        assert rp.target == pytest.approx(static.epoch_time, rel=5e-4)
        assert rp.capped == ()


def test_a_uniform_slowdown_changes_nothing() -> None:
    """Contention that slows every rank alike (4-5 ranks on 2 cores) leaves B_S as planned."""
    base = replan(ReplanInput(FITS[24], dict.fromkeys(range(4), 1.0), [0, 1], [2, 3], 600, D_L, 11_875, {}))
    slow = replan(ReplanInput(FITS[24], dict.fromkeys(range(4), 2.3), [0, 1], [2, 3], 600, D_L, 11_875, {}))
    assert slow.batches == base.batches and slow.target == pytest.approx(2.3 * base.target)


def test_a_slower_small_group_gets_a_larger_batch_and_meets_the_target() -> None:
    scales = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.05}  # 1.05 * d_S < d_L: B_S <= B_L can absorb it
    rp = replan(ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}))
    assert rp.batches[3] > rp.batches[2]
    for h in (2, 3):  # each small mini-epoch now takes T (B rounded: within 0.5 %)
        t = scales[h] * FITS[24].per_sample(rp.batches[h]) * 11_875
        assert t == pytest.approx(rp.target, rel=5e-3)


@pytest.mark.parametrize("ceiling", [None, 300])
def test_a_small_group_slower_than_k_keeps_the_ceiling_and_trains_fewer_samples(ceiling) -> None:
    """1.6x slower: no B_S <= B_L meets T with d_S samples. The group runs at the ceiling (B_L
    without one) with the share that takes T there; the other small group is untouched."""
    scales = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.6}
    rp = replan(ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}, ceiling=ceiling))
    top = ceiling or 600
    assert rp.batches[3] == top and rp.capped == (3,)
    assert rp.shares[3] == int(rp.target / (1.6 * FITS[24].per_sample(top)))
    assert 0.5 * 11_875 < rp.shares[3] < 11_875
    assert rp.shares[2] == 11_875 and rp.shares[0] == rp.shares[1] == D_L
    # a share is never cut below one step
    tiny = replan(
        ReplanInput(FITS[24], {**scales, 3: 1e4}, [0, 1], [2, 3], 600, D_L, 11_875, {}, ceiling=ceiling)
    )
    assert tiny.shares[3] == top


def test_useful_batch_is_where_b_l_would_save_less_than_tol() -> None:
    # The paper's GTX 1080 fit, B_L = 560: b/a ~ 31 samples, so batches up to ~355 still buy time
    # (Table 6's B_S at 32 px, 102-286, all below it).
    f = FITS[32]
    u = useful_batch(f, 560)
    assert u == int(f.b / (TOL * f.a + (1 + TOL) * f.b / 560)) == 355
    gain = f.per_sample(u) / f.per_sample(560) - 1
    assert gain >= TOL > f.per_sample(u + 1) / f.per_sample(560) - 1
    # A CPU-like fit, b/a = 8 samples, B_L = 256: past ~129 nothing is left to buy.
    assert useful_batch(TimeFit(a=1e-3, b=8e-3, r2=math.nan), 256) == 128
    assert useful_batch(TimeFit(a=1e-3, b=0.0, r2=math.nan), 256) == 1  # no per-step cost
    assert useful_batch(TimeFit(a=0.0, b=1e-2, r2=math.nan), 256) == 248  # all per-step cost


def test_a_group_within_the_noise_is_left_alone() -> None:
    """A group whose predicted mini-epoch is within tol of T keeps its batch and share, even
    where the formula would move B_S a long way (a flat time curve)."""
    scales = {0: 1.0, 1: 1.0, 2: 1.02, 3: 1.02}
    free = replan(ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}))
    assert free.batches[2] > 250  # 2 % slower: the formula wants ~1.15x the plan's 230
    kept = replan(
        ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}, previous={2: 230, 3: 230})
    )
    assert kept.batches == {0: 600, 1: 600, 2: 230, 3: 230} and kept.capped == ()
    # an 8 % error: moved under the default band, left alone under a wider one (a noisy window)
    slow = {**scales, 3: 1.08}
    moved = replan(
        ReplanInput(FITS[24], slow, [0, 1], [2, 3], 600, D_L, 11_875, {}, previous={2: 230, 3: 230})
    )
    # 230 < B <= 230 * DAMP: only the excess over the band is corrected (to T (1 + TOL), rounded)
    assert 230 < moved.batches[3] <= 345
    t3 = 1.08 * FITS[24].per_sample(moved.batches[3]) * 11_875 / moved.target
    assert t3 == pytest.approx(1 + TOL, abs=2e-3)
    wide = replan(
        ReplanInput(
            FITS[24],
            slow,
            [0, 1],
            [2, 3],
            600,
            D_L,
            11_875,
            {},
            previous={2: 230, 3: 230},
            tol={2: 0.03, 3: 0.10},
        )
    )
    assert wide.batches[3] == 230 and wide.shares[3] == 11_875 and wide.capped == ()


def test_a_cut_share_climbs_to_the_ceiling_and_comes_back_when_it_fits() -> None:
    common = dict(previous={2: 230, 3: 230}, ceiling=300)
    # cut at 230, below the ceiling: it climbs (damped, to the ceiling) and is cut anew there
    rp = replan(
        ReplanInput(
            FITS[24],
            {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.6},
            [0, 1],
            [2, 3],
            600,
            D_L,
            11_875,
            {},
            shares={3: 7_000},
            **common,
        )
    )
    assert rp.batches[3] == 300 and rp.shares[3] == int(rp.target / (1.6 * FITS[24].per_sample(300)))
    # the group is fast again: within the band at its batch, and d_S fits too -> d_S
    back = replan(
        ReplanInput(
            FITS[24],
            dict.fromkeys(range(4), 1.0),
            [0, 1],
            [2, 3],
            600,
            D_L,
            11_875,
            {},
            shares={3: 11_700},
            **common,
        )
    )
    assert back.batches[3] == 230 and back.shares[3] == 11_875 and back.capped == ()


def test_noise_is_the_standard_error_of_the_median() -> None:
    win = [_obs(32, 100, 5000, s) for s in (1.0, 1.1, 0.9, 1.0, 1.0)]
    # MAD 0 (three of five equal): no spread the median sees
    assert noise_of(FITS, win) == 0.0
    win = [_obs(32, 100, 5000, s) for s in (1.0, 1.1, 0.9, 1.2, 0.8)]
    assert noise_of(FITS, win) == pytest.approx(1.2533 * 1.4826 * 0.1 / math.sqrt(5))
    # one or two tasks say nothing of their spread: the assumed task noise
    assert noise_of(FITS, win[:1]) == pytest.approx(1.2533 * TASK_NOISE)
    assert noise_of(FITS, win[:2]) == pytest.approx(1.2533 * TASK_NOISE / math.sqrt(2))
    assert noise_of(FITS, []) == pytest.approx(1.2533 * TASK_NOISE)


def test_a_replan_moves_b_s_by_at_most_damp() -> None:
    scales = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    free = replan(ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}))
    assert free.batches[2] == 230
    held = replan(
        ReplanInput(FITS[24], scales, [0, 1], [2, 3], 600, D_L, 11_875, {}, previous={2: 100, 3: 400})
    )
    assert held.batches[2] == 150  # 100 * 1.5, on the way up
    # 400 is too fast: down to where the time is T (1 - TOL), at most by 1/1.5
    assert 267 <= held.batches[3] < 400
    t3 = FITS[24].per_sample(held.batches[3]) * 11_875 / held.target
    assert t3 == pytest.approx(1 - TOL, abs=2e-3)


def test_replan_needs_a_large_group() -> None:
    with pytest.raises(ValueError, match="large group"):
        replan(ReplanInput(FITS[24], {0: 1.0}, [], [0], 600, D_L, 12_500, {}))


class Machine:
    """A simulated group: true seconds per sample a' + b'/B, unknown to the planner."""

    def __init__(self, fit: TimeFit, a_mult: float, b_mult: float, slow: float = 1.0) -> None:
        self.a, self.b, self.slow = fit.a * a_mult, fit.b * b_mult, slow

    def seconds(self, batch: int, samples: int) -> float:
        return self.slow * (self.a + self.b / batch) * samples


@pytest.mark.parametrize(
    ("small_a", "small_b", "slow_small", "slow_large", "at_ceiling"),
    [
        (1.0, 1.0, 1.0, 1.0, False),  # the profile is right
        # a small group pays twice the profiled per-step cost (loader, Python): B_S stops at the
        # useful batch (355), where the whole share is within TOL of T
        (1.0, 2.0, 1.0, 1.0, True),
        (1.05, 1.6, 1.0, 1.0, True),  # both costs off, as on another CPU
        (1.0, 1.0, 1.04, 1.0, False),  # one small group 4 % slower (B_S can absorb it)
        (1.0, 1.5, 1.0, 1.25, False),  # large groups 25 % slower than profiled
    ],
)
def test_replanning_converges_to_equal_mini_epoch_times(
    small_a: float, small_b: float, slow_small: float, slow_large: float, at_ceiling: bool
) -> None:
    """On a machine whose small groups' costs the profile gets wrong, a few tasks of measuring
    and re-planning make every small mini-epoch take the large groups' time (within TOL)."""
    fit, d_S = FITS[32], 11_875
    planned = {g: {32: 560} for g in range(4)}
    static_bs = plan_dual_batch(FITS, B_L, 4, 2, 1.05, 50_000).resolutions[32].B_S
    for g in (2, 3):
        planned[g][32] = static_bs
    ad = Adapter({32: fit}, {32: 560}, planned, [False, False, True, True], (D_L, d_S), [1, 1, 1, 1])
    machines = [Machine(fit, 1.0, 1.0, slow_large)] * 2 + [
        Machine(fit, small_a, small_b),
        Machine(fit, small_a, small_b, slow_small),
    ]
    for task in range(8):
        ad.replan(32)
        for g, m in enumerate(machines):
            b, share = ad.batches[g][32], ad.share(g, 32)
            ad.observe(g, Obs(32, b, share, m.seconds(b, share), warm=task == 0))
    ad.replan(32)
    large_t = machines[0].seconds(560, D_L)
    for g in (2, 3):
        b, share = ad.batches[g][32], ad.share(g, 32)
        # within the dead band (a noiseless machine: TOL), B rounded
        assert machines[g].seconds(b, share) == pytest.approx(large_t, rel=TOL + 0.005)
        # at the ceiling: the flat end of the time curve, near the useful batch (the band's edge)
        assert share == d_S and (b >= 0.9 * useful_batch(fit, 560)) == at_ceiling, (b, share)
        # and the model now predicts what the machine does
        assert ad.predicted(g, 32) == pytest.approx(machines[g].seconds(b, share), rel=0.01)


def test_a_slowed_small_group_converges_by_its_share() -> None:
    """A small group 1.5x slower than the rest cannot finish with the large ones at any useful
    batch: it climbs towards the ceiling and trains the share that takes T there; the other
    keeps d_S and the plan's B_S."""
    fit, d_S = FITS[32], 11_875
    static_bs = plan_dual_batch(FITS, B_L, 4, 2, 1.05, 50_000).resolutions[32].B_S
    planned = {g: {32: 560 if g < 2 else static_bs} for g in range(4)}
    ad = Adapter({32: fit}, {32: 560}, planned, [False, False, True, True], (D_L, d_S), [1, 1, 1, 1])
    machines = [Machine(fit, 1.0, 1.0)] * 3 + [Machine(fit, 1.0, 1.0, 1.5)]
    for task in range(10):
        ad.replan(32)
        for g, m in enumerate(machines):
            b, share = ad.batches[g][32], ad.share(g, 32)
            ad.observe(g, Obs(32, b, share, m.seconds(b, share), warm=task == 0))
    large_t = machines[0].seconds(560, D_L)
    assert ad.batches[3][32] == useful_batch(fit, 560) and ad.share(3, 32) < d_S
    assert machines[3].seconds(ad.batches[3][32], ad.share(3, 32)) == pytest.approx(large_t, rel=TOL)
    assert ad.share(2, 32) == d_S and abs(ad.batches[2][32] - static_bs) <= 1
    again = Adapter({32: fit}, {32: 560}, planned, [False, False, True, True], (D_L, d_S), [1, 1, 1, 1])
    again.load_state(json.loads(json.dumps(ad.state())))
    assert again.share(3, 32) == ad.share(3, 32) and again.predicted(3, 32) == ad.predicted(3, 32)


def test_a_group_without_measurements_borrows_a_scale() -> None:
    planned = {g: {24: 600, 32: 560} for g in range(3)}
    ad = Adapter(FITS, B_L, planned, [False, False, True], (D_L, 11_875), [1, 1, 1])
    assert ad.scale(0, 24) == 1.0  # nothing measured anywhere: the profile as is
    ad.observe(1, _obs(24, 600, D_L, 1.5))
    ad.observe(2, _obs(32, 560, 11_875, 2.5))
    assert ad.scale(0, 24) == pytest.approx(2.0)  # the mean of the groups measured
    ad.observe(0, _obs(32, 560, D_L, 1.2))
    assert ad.scale(0, 24) == pytest.approx(1.2)  # its own, from another resolution
    ad.observe(0, _obs(24, 600, D_L, 1.4))
    assert ad.scale(0, 24) == pytest.approx(1.4)  # its own at this resolution
    assert ad.scale(0, 32) == pytest.approx(1.2)


def test_only_small_beside_large_groups_is_adapted() -> None:
    planned = {g: {32: 560} for g in range(2)}
    assert not Adapter({32: FITS[32]}, {32: 560}, planned, [False, False], (D_L, D_L), [1, 1]).active
    assert not Adapter({32: FITS[32]}, {32: 560}, planned, [True, True], (D_L, D_L), [1, 1]).active
    assert not Adapter({}, {}, planned, [False, True], (D_L, 9_000), [1, 1]).active
    ad = Adapter({32: FITS[32]}, {32: 560}, planned, [False, True], (D_L, 9_000), [1, 1])
    assert ad.active and ad.replan(24) is None  # no fit at 24 px: its batches stay as planned


def test_state_round_trips_through_json_and_replans_identically() -> None:
    planned = {g: {24: 600, 32: 560} for g in range(4)}
    small = [False, False, True, True]
    ad = Adapter(FITS, B_L, planned, small, (D_L, 11_875), [1, 1, 1, 1])
    for i, g in enumerate([0, 2, 1, 3, 0, 2]):
        res = 24 if i < 3 else 32
        ad.observe(g, _obs(res, ad.batches[g][res], 9000, 1.0 + 0.1 * i, warm=i < 2))
        ad.replan(res)
    again = Adapter(FITS, B_L, planned, small, (D_L, 11_875), [1, 1, 1, 1])
    again.load_state(json.loads(json.dumps(ad.state())))
    assert again.state() == ad.state()
    assert again.replan(32) is None and ad.replan(32) is None  # nothing new since the last one
    for a in (ad, again):
        a.observe(3, _obs(32, a.batches[3][32], 9000, 1.9))
    for res in (24, 32):
        assert again.replan(res) == ad.replan(res) is not None


# ---------------------------------------------------------------------------
# The floor, degenerate profiles and noise (docs/planning.md, "Adaptive planning")


def _run_noisy(fit: TimeFit, true_b: float, floor: int, noise: float, seed: int, tasks: int = 30, slow=1.0):
    """The demo's shape (3 groups, 1 small, 28 px, B_L 64, d = 30,000, k = 1.05) on a machine
    whose true s/sample is fit.a + true_b/B, each task's time off by a lognormal `noise`; the small
    group `slow` times slower. Returns the adapter and the small group's (batch, share) per task."""
    import numpy as np

    plan = plan_dual_batch({28: fit}, {28: 64}, 3, 1, 1.05, 30_000, min_small=floor)
    planned = {0: {28: 64}, 1: {28: 64}, 2: {28: plan.resolutions[28].B_S}}
    ad = Adapter(
        {28: fit}, {28: 64}, planned, [False, False, True], (plan.d_L, plan.d_S), [1, 1, 1], floor=floor
    )
    rng = np.random.default_rng(seed)
    trace = []
    for task in range(tasks):
        ad.replan(28)
        for g in range(3):
            b, share = ad.batches[g][28], ad.share(g, 28)
            t = (fit.a + max(true_b, 0.0) / b) * share * math.exp(noise * rng.standard_normal())
            ad.observe(g, Obs(28, b, share, t * (slow if g == 2 else 1.0), warm=task == 0))
        trace.append((ad.batches[2][28], ad.share(2, 28)))
    return ad, plan, trace


@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(1e-4, 1e-2),
    b_over_a=st.floats(-20.0, 40.0),
    floor=st.integers(1, 64),
    noise=st.floats(0.0, 0.3),
    slow=st.floats(0.7, 2.0),
    seed=st.integers(0, 2**16),
)
def test_replans_never_leave_the_bounds(a, b_over_a, floor, noise, slow, seed) -> None:
    """On any random sequence of noisy mini-epoch times, with any fit (b < 0 included) and any
    floor, every re-plan keeps B_S in [min(floor, B_L), B_L] and a share in [B_S, d_S]."""
    fit = TimeFit(a, a * b_over_a, 1.0)
    _, plan, trace = _run_noisy(fit, a * b_over_a, floor, noise, seed, tasks=15, slow=slow)
    for b, share in trace:
        assert min(floor, 64) <= b <= 64
        assert b <= share <= plan.d_S


@pytest.mark.parametrize("b", [8e-3, 3e-3, 3.3e-4, -1.66e-3])
def test_ten_percent_noise_is_not_chased(b: float) -> None:
    """A profile that is right and tasks 10 % noisy (these machines): over 30 tasks and 20 seeds
    the small group's true mini-epoch stays within 20 % of the large groups' (the noise itself is
    10 %), its share is never cut by more than 10 %, and where the fixed cost is ~0 B_S stays at the floor."""
    a = 1.4e-3
    for seed in range(20):
        ad, plan, trace = _run_noisy(TimeFit(a, b, 1.0), b, 16, 0.10, seed)
        T = (a + max(b, 0.0) / 64) * plan.d_L
        for batch, share in trace:
            assert abs((a + max(b, 0.0) / batch) * share / T - 1) < 0.20, (seed, trace)
            assert share >= 0.9 * plan.d_S, (seed, trace)
        if b <= 3.3e-4:
            assert {batch for batch, _ in trace} == {16}, (seed, trace)


def test_a_degenerate_profile_adapts_at_the_floor() -> None:
    """b < 0 (a real profile's noise): the adapter plans from a flat model (no fixed cost) and
    keeps B_S at the floor; a small group 1.5x slower trains a cut share instead of a batch the
    profile cannot justify."""
    fit = TimeFit(1.4e-3, -1.66e-3, 0.9, ((16, 0.0207), (32, 0.0432), (64, 0.0879)))
    ad, plan, trace = _run_noisy(fit, 0.0, 16, 0.0, 0, tasks=10, slow=1.5)
    assert all(b == 16 for b, _ in trace)
    assert trace[-1][1] < plan.d_S
    assert ad.fits[28].b == 0 and ad.fits[28].a > 0


def test_no_replan_from_warm_up_tasks_alone() -> None:
    """A first task in a process (warm-up: 1.9x its later ones in the demo) moves nothing: the
    re-plan waits until the small group and every large group have a task past it."""
    planned = {0: {24: 600}, 1: {24: 600}, 2: {24: 230}}
    ad = Adapter({24: FITS[24]}, {24: 600}, planned, [False, False, True], (D_L, 11_875), [1, 1, 1])
    for g, scale in ((0, 1.0), (1, 1.0), (2, 1.9)):
        ad.observe(g, _obs(24, planned[g][24], D_L if g < 2 else 11_875, scale, warm=True))
    assert ad.replan(24) is None and ad.batches[2][24] == 230
    for g in (0, 1):
        ad.observe(g, _obs(24, 600, D_L, 1.0))
    assert ad.replan(24) is None  # the small group has only its warm-up
    ad.observe(2, _obs(24, 230, 11_875, 1.0))
    out = ad.replan(24)
    assert out is not None and out.batches[2] == 230 and out.shares[2] == 11_875


def test_a_u_shaped_profile_adapts_along_its_falling_part() -> None:
    """A CPU profile whose per-sample time falls to 64 and rises to B_L = 128 (a make-demo
    profile at 20 px: 0.534 ... 0.355 ... 0.409 ms/sample): the line through all points has b ~ 0,
    the adapter models the falling part instead, so a small group slower than planned climbs to
    a larger batch with its whole share rather than having its share cut."""
    from hpc_dualbatch.method.replan import positive_model
    from hpc_dualbatch.method.timing import fit_linear

    pts = [(16, 8.54e-3), (24, 10.58e-3), (32, 12.82e-3), (48, 17.68e-3), (64, 22.75e-3), (96, 38.64e-3),
           (128, 52.39e-3)]  # fmt: skip
    # the straight line through all of it, with the profile's interval: no fixed cost to speak of
    line = dataclasses.replace(fit_linear(pts), b_ci=(-2.0e-4, 1.09e-3))
    assert abs(line.b) < 1e-3 and not line.sound
    model = positive_model(line, 128)
    assert model == fit_linear(pts[:5]) and model.b > 3e-3  # 16..64: ~3.8 ms per step
    plan = plan_dual_batch({20: line}, {20: 128}, 3, 1, 1.05, 30_000, min_small=16)
    planned = {0: {20: 128}, 1: {20: 128}, 2: {20: plan.resolutions[20].B_S}}
    ad = Adapter(
        {20: line}, {20: 128}, planned, [False, False, True], (plan.d_L, plan.d_S), [1, 1, 1], floor=16
    )
    for task in range(8):
        ad.replan(20)
        for g in range(3):
            b, share = ad.batches[g][20], ad.share(g, 20)
            slow = 1.15 if g == 2 else 1.0  # the small group pays 15 % more per sample in the run
            ad.observe(g, Obs(20, b, share, slow * share * model.per_sample(b), warm=task == 0))
    assert ad.batches[2][20] > planned[2][20] and ad.share(2, 20) == plan.d_S


@pytest.mark.parametrize("n_large, n_small", [(64, 64), (512, 512)])
def test_a_replan_recomputes_only_what_a_new_task_changed(n_large, n_small, monkeypatch) -> None:
    """Each task handed out re-plans; at hundreds of groups that must not recompute every group's
    window statistics (it was n_S x n_L): after one group's new task, a re-plan recomputes that
    group's alone, whatever the number of groups."""
    from hpc_dualbatch.method import adapt

    n = n_large + n_small
    small = [False] * n_large + [True] * n_small
    planned = {g: {24: 64 if not s else 16} for g, s in enumerate(small)}
    ad = Adapter({24: FITS[24]}, {24: 64}, planned, small, (1000, 500), [1] * n)
    for k in range(30):  # every group a task at its batch, then a re-plan, until the batches settle
        for g in range(n):
            ad.observe(g, _obs(24, ad.batches[g][24], ad.share(g, 24), 1.0, warm=k == 0))
        if k and not ad.step(24)[1]:
            break
    assert not ad.step(24)[1]  # settled: no group's batch or share moves at scale 1
    calls = []
    for name in ("scale_of", "noise_of"):
        real = getattr(adapt, name)
        monkeypatch.setattr(adapt, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    h = n - 1
    ad.observe(h, _obs(24, ad.batches[h][24], ad.share(h, 24), 1.2))
    assert ad.replan(24) is not None  # h has a new task: it is re-planned
    assert sorted(calls) == ["noise_of", "scale_of"]  # its own scale and noise; nobody else's
