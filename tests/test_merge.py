"""The server's merge rules and outer momentum on known vectors, and what a task holds (push count,
a small group's learning rate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_dualbatch.method.merge import (
    Outer,
    PushInfo,
    delta_weight,
    distance,
    make_rule,
    merge_delta,
    nova_weight,
)
from hpc_dualbatch.method.merge import merge_paper as merge
from hpc_dualbatch.method.shares import contribution_factor
from hpc_dualbatch.ps.tasks import pushes_per_task, small_lr_scale


@pytest.mark.parametrize(
    "mode, f",
    [("none", 1.0), ("data_ratio", 10_625 / 13_125), ("sqrt", math.sqrt(10_625 / 13_125))],
)
def test_merge_rule_on_known_vectors(mode, f):
    assert contribution_factor(10_625, 13_125, mode) == pytest.approx(f)
    w = np.array([1.0, 2.0, -4.0, 0.0], np.float32)
    wi = np.array([3.0, 2.0, 4.0, 8.0], np.float32)
    expected = (w.astype(np.float64) + f * wi) / (1 + f)
    merge(w, wi.copy(), f)
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_merge_with_f_one_is_the_exact_mean():
    w = np.array([1.0, 2.0, 3.0], np.float32)
    merge(w, np.array([3.0, 4.0, 5.0], np.float32), 1.0)
    assert w.tolist() == [2.0, 3.0, 4.0]


def test_delta_merge_applies_the_scaled_update_since_the_pull():
    w = np.array([1.0, 2.0, 3.0], np.float32)
    u = np.array([0.5, 4.0, 2.0], np.float32) - np.array([0.0, 2.0, 2.0], np.float32)  # the leader's update
    merge_delta(w, u, 0.25)
    assert w.tolist() == [1.125, 2.5, 3.0]


def test_the_push_size_is_measured_against_what_the_rule_merges():
    """paper: ||w_i - w|| of the pushed weights from the global ones, on the server; delta, nova:
    ||update||, the norm its leader measured (the server reads no weights for it)."""
    none = np.zeros((2, 0), np.float32)
    w, pushed = np.array([1.0, 1.0], np.float32), np.array([4.0, 5.0], np.float32)
    leaders = float(np.linalg.norm(pushed))
    paper = make_rule("paper", "average", [1.0, 1.0], none, 0)
    assert paper.distance(w, pushed, leaders) == pytest.approx(5.0)
    for rule in ("delta", "nova"):
        assert make_rule(rule, "average", [1.0, 1.0], none, 0).distance(w, pushed, leaders) == leaders


@pytest.mark.parametrize(
    "f, f_sum, n, staleness, a",
    [
        (1.0, 4.0, 4, 0, 0.25),  # fresh push: 1/n
        (1.0, 4.0, 4, 3, 0.25),  # one round old (each other group pushed once): still 1/n
        (1.0, 4.0, 4, 7, 0.125),  # two rounds old: halved
        (0.5, 3.0, 4, 3, 0.5 / 3.0),  # a small group (f = d_S/d_L = 0.5) among 2 large + 2 small
        (1.0, 1.0, 1, 0, 1.0),  # one group: its whole update (plain local training)
    ],
)
def test_delta_weight_table(f, f_sum, n, staleness, a):
    assert delta_weight(f, f_sum, n, staleness) == pytest.approx(a)


def test_delta_weight_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="staleness"):
        delta_weight(1.0, 4.0, 4, -1)


def test_one_round_of_delta_pushes_is_the_mean_of_the_groups_updates():
    """n groups pull the same weights and push in turn: the result is their mean, as in
    synchronous local SGD (what the paper's rule does not keep, see merge.py)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50).astype(np.float32)
    pushed = [w0 + rng.standard_normal(50).astype(np.float32) for _ in range(4)]
    w = w0.copy()
    for k, wi in enumerate(pushed):
        merge_delta(w, wi - w0, delta_weight(1.0, 4.0, 4, staleness=k))  # the update from the pull w0
    np.testing.assert_allclose(w, np.mean(pushed, axis=0), atol=1e-5)
    assert distance(w, w0) == pytest.approx(float(np.linalg.norm(w - w0)), rel=1e-5)


@pytest.mark.parametrize(
    "share, batch, every, pushes",
    [(4500, 64, 0, 1), (4500, 64, 16, 4), (4500, 64, 100, 1), (1000, 100, 1, 10), (13125, 560, 21, 1)],
)
def test_pushes_per_task(share, batch, every, pushes):
    assert pushes_per_task(share, batch, every) == pushes


def test_outer_with_no_momentum_and_rate_one_is_the_plain_rule():
    w, plain = np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0], np.float32)
    outer = Outer(1.0, 0.0, 1, np.zeros((2, 2), np.float32))
    for u in ([0.5, -1.0], [2.0, 0.0]):
        outer.step(w, np.array(u, np.float32), 0.5, lr=0.1)
        plain += 0.5 * np.array(u, np.float32)
    assert w.tolist() == plain.tolist() and not outer.state.any()  # no buffer work without momentum


def test_nesterov_at_every_push_on_known_vectors():
    """m <- mu m + a u / lr; w += lr_out (a u + mu lr m): DiLoCo's Nesterov step per push."""
    w, state = np.zeros(1, np.float32), np.zeros((2, 1), np.float32)
    outer = Outer(0.5, 0.9, 1, state)
    outer.step(w, np.array([2.0], np.float32), 0.5, lr=0.1)  # step 1.0: m = 10, w = 0.5 * (1 + 0.9)
    assert state[0].tolist() == pytest.approx([10.0]) and w.tolist() == pytest.approx([0.95])
    outer.step(w, np.array([2.0], np.float32), 0.5, lr=0.1)  # m = 19, w += 0.5 * (1 + 0.9 * 1.9)
    assert state[0].tolist() == pytest.approx([19.0]) and w.tolist() == pytest.approx([0.95 + 1.355])
    assert state[1].tolist() == [0.0]  # the round's sum is spent at every push


def test_delayed_nesterov_over_a_round_is_nesterov_on_the_rounds_sum():
    """n pushes: plain steps as they arrive, then one momentum step; at a constant rate the round
    moves w as Nesterov's w += lr_out (U + mu m), m <- mu m + U on the round's summed step U."""
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal(6).astype(np.float32) for _ in range(9)]
    w, outer = np.zeros(6, np.float32), Outer(0.7, 0.9, 3, np.zeros((2, 6), np.float32))
    ref_w, ref_m = np.zeros(6), np.zeros(6)
    for r in range(3):
        for u in steps[3 * r : 3 * r + 3]:
            outer.step(w, u.copy(), 1.0, lr=1.0)
        U = np.sum(steps[3 * r : 3 * r + 3], axis=0, dtype=np.float64)
        ref_m = 0.9 * ref_m + U
        ref_w += 0.7 * (U + 0.9 * ref_m)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)
    assert outer.count == 9 and not outer.state[1].any()


def test_outer_momentum_is_kept_in_units_of_the_inner_rate():
    """SlowMo's normalisation: after a 10x rate decay the buffer's steps are 10x smaller."""
    w, state = np.zeros(1, np.float32), np.zeros((2, 1), np.float32)
    outer = Outer(1.0, 0.5, 1, state)
    outer.step(w, np.array([1.0], np.float32), 1.0, lr=0.1)  # m = 10; w = 1 + 0.5 * 0.1 * 10 = 1.5
    outer.step(w, np.array([0.1], np.float32), 1.0, lr=0.01)  # m = 5 + 10 = 15; w += 0.1 + 0.5*0.01*15
    assert w.tolist() == pytest.approx([1.5 + 0.1 + 0.075])


def test_outer_rejects_an_impossible_setup():
    with pytest.raises(ValueError, match="every"):
        Outer(1.0, 0.9, 0, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="outer momentum"):
        make_rule(
            "paper",
            "average",
            [1.0],
            np.zeros((1, 0), np.float32),
            0,
            Outer(1.0, 0.9, 1, np.zeros((2, 2), np.float32)),
        )


@pytest.mark.parametrize(
    "batch, batches, staleness, a",
    [
        (64, [64, 64, 64, 64], 0, 0.25),  # equal groups: 1/n, as under delta
        (64, [64, 64, 64, 64], 7, 0.125),  # two rounds old: halved, as under delta
        (32, [64, 64, 32, 32], 0, 32 / 192),  # a small group: its samples per step
        (64, [64, 64, 32, 32], 3, 64 / 192),
    ],
)
def test_nova_weight_table(batch, batches, staleness, a):
    assert nova_weight(batch, batches, staleness) == pytest.approx(a)


def test_one_round_of_nova_pushes_is_the_step_of_all_samples_at_the_summed_batch():
    """Groups at batches B_i push updates of tau_i steps from one pull: the round moves w by
    sum_i B_i / sum(B) * update_i. With tau_i = d_i / B_i steps of mean gradient g_i and rate eta,
    update_i = -eta tau_i g_i, so the move is -eta sum_i d_i g_i / sum(B): one synchronous step per
    sum(B) samples over the d = sum d_i samples, each sample's gradient counted once."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(8).astype(np.float32)
    batches, shares, eta = [64, 64, 16, 16], [1024, 1024, 512, 512], 0.1
    grads = [rng.standard_normal(8).astype(np.float32) for _ in batches]
    pushed = [w0 - eta * (d / b) * g for d, b, g in zip(shares, batches, grads)]
    rule = make_rule("nova", "average", [1.0, 1.0, 0.5, 0.5], np.zeros((4, 0), np.float32), 0)
    w = w0.copy()
    for k, wi in enumerate(pushed):  # each leader pushes its update from the common pull w0
        rule.fold(PushInfo(k, k, eta, batches), w, wi - w0)
    expected = w0 - eta * sum(d * g for d, g in zip(shares, grads)) / sum(batches)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rule, batch, batch_L, scale", [("same", 16, 64, 1.0), ("sqrt", 16, 64, 0.5), ("linear", 16, 64, 0.25)]
)
def test_small_group_learning_rate_scale(rule, batch, batch_L, scale):
    assert small_lr_scale(rule, batch, batch_L) == pytest.approx(scale)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tail_average_is_the_mean_of_what_was_added_and_resumes(backend):
    """schedule.average: the running mean equals the mean of the vectors added (float32 against
    float64); the first one is taken exactly; a mean restored with its
    count continues as the one that never stopped; before anything is added the current
    weights are what is evaluated."""
    import torch

    from hpc_dualbatch.method import average as A

    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(10).astype(np.float32) for _ in range(7)]
    as_ = torch.from_numpy if backend == "torch" else np.asarray
    zeros = as_(np.zeros(10, np.float32))
    tail = A.TailAverage(10, zeros)
    assert tail.params(xs[0]) is xs[0]  # nothing added yet
    tail.add(as_(xs[0]))
    assert np.array_equal(np.asarray(tail.mean), xs[0])
    for x in xs[1:4]:
        tail.add(as_(x))
    resumed = A.TailAverage(10, as_(np.asarray(tail.mean).copy()), tail.count)
    for t in (tail, resumed):
        for x in xs[4:]:
            t.add(as_(x))
    want = np.mean(np.stack(xs).astype(np.float64), axis=0)
    assert tail.count == resumed.count == 7
    np.testing.assert_allclose(np.asarray(tail.mean), want, rtol=1e-6, atol=1e-6)
    assert np.asarray(tail.mean).tobytes() == np.asarray(resumed.mean).tobytes()
    assert tail.params(xs[0]) is tail.mean
