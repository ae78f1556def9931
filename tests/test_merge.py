"""The server's merge rules on known vectors, and the push count of a task."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_dualbatch.method.merge import delta_weight, distance, merge_delta
from hpc_dualbatch.method.merge import merge_paper as merge
from hpc_dualbatch.method.plan import contribution_factor
from hpc_dualbatch.ps.server import pushes_per_task


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
    pulled = np.array([0.0, 2.0, 2.0], np.float32)
    wi = np.array([0.5, 4.0, 2.0], np.float32)  # update since the pull: [0.5, 2, 0]
    merge_delta(w, wi, pulled, 0.25)
    assert w.tolist() == [1.125, 2.5, 3.0]
    assert wi.tolist() == [0.5, 2.0, 0.0]  # the receive buffer now holds the update


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
        merge_delta(w, wi.copy(), w0, delta_weight(1.0, 4.0, 4, staleness=k))
    np.testing.assert_allclose(w, np.mean(pushed, axis=0), atol=1e-5)
    assert distance(w, w0) == pytest.approx(float(np.linalg.norm(w - w0)), rel=1e-5)


@pytest.mark.parametrize(
    "share, batch, every, pushes",
    [(4500, 64, 0, 1), (4500, 64, 16, 4), (4500, 64, 100, 1), (1000, 100, 1, 10), (13125, 560, 21, 1)],
)
def test_pushes_per_task(share, batch, every, pushes):
    assert pushes_per_task(share, batch, every) == pushes
