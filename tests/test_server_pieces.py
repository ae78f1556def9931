"""Pure pieces of the server and workers: the merge rule, step splitting, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.method.merge import delta_weight, distance, merge_delta
from hpc_dualbatch.method.merge import merge_paper as merge
from hpc_dualbatch.method.shares import contribution_factor
from hpc_dualbatch.ps.server import pushes_per_task
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.engine import recalibrate_bn
from hpc_dualbatch.runtime.trainer import bn_indices, part_ends, rank_batches


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


@pytest.mark.parametrize(
    "steps, parts, ends", [(10, 1, [10]), (10, 4, [2, 5, 8, 10]), (3, 5, [1, 2, 3]), (0, 3, [0])]
)
def test_part_ends(steps, parts, ends):
    assert part_ends(steps, parts) == ends


def test_bn_samples_are_fixed_by_the_seed_and_inside_the_training_split():
    a, b, c = bn_indices(1000, 256, 1), bn_indices(1000, 256, 1), bn_indices(1000, 256, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 256 and a.min() >= 0 and a.max() < 1000
    assert len(bn_indices(100, 256, 1)) == 100


def test_recalibration_recovers_the_statistics_of_the_data():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(512, 1, 3, 3) * 3 + 5
    model[1].running_mean.fill_(100.0)  # stale statistics, e.g. averaged from other models
    batches = [(x[i : i + 128], None) for i in range(0, 512, 128)]
    assert recalibrate_bn(model, batches) == 512
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3)), rtol=2e-2, atol=1e-3)
    assert model[1].momentum == 0.1 and not model.training


@pytest.mark.parametrize(
    "n, batch, size", [(1000, 64, 1), (1000, 64, 2), (1001, 65, 3), (130, 64, 3), (129, 64, 2)]
)
def test_every_rank_takes_the_same_number_of_steps(n, batch, size):
    order = np.random.default_rng(0).permutation(n)
    parts = [rank_batches(order, batch, r, size) for r in range(size)]
    steps = {math.ceil(len(idx) / b) for idx, b in parts}
    assert len(steps) == 1  # one Horovod allreduce per step on every rank
    got = np.concatenate([idx for idx, _ in parts])
    assert len(set(got.tolist())) == len(got)  # disjoint
    dropped = n - len(got)
    assert 0 <= dropped < size  # at most a last step smaller than the group


def test_checkpoint_round_trip_and_corruption(tmp_path):
    ck = C.Checkpoint(
        np.arange(5, dtype=np.float32),
        np.ones((2, 3), np.float32),
        7,
        [4, 3],
        12.5,
        99,
        {"seed": 1, "plan": {"large_batch": {20: 64}}},
        {"pending_evals": {"1": 2.0}},
    )
    path = C.save(str(tmp_path), ck, keep=2)
    got = C.load(path)
    assert np.array_equal(got.weights, ck.weights) and got.commits == 7 and got.rounds == [4, 3]
    C.check_compatible(path, got.config, {"seed": 1, "plan": {"large_batch": {20: 64}}, "out": "elsewhere"})
    with pytest.raises(CheckpointError, match="seed: checkpoint 1, now 2"):
        C.check_compatible(path, got.config, {"seed": 2, "plan": {"large_batch": {20: 64}}})
    for i in range(3):  # only the newest `keep` stay
        C.save(str(tmp_path), C.Checkpoint(ck.weights, ck.momentum, 8 + i, [1, 1], 0, 0, {}), keep=2)
    assert [p.split("-")[-1] for p in sorted(map(str, (tmp_path / "checkpoints").glob("*.npz")))] == [
        "000000009.npz",
        "000000010.npz",
    ]
    data = open(C.latest(str(tmp_path)), "rb").read()
    open(C.latest(str(tmp_path)), "wb").write(data[: len(data) // 2])  # a partial write
    with pytest.raises(CheckpointError, match="corrupt or partially written"):
        C.load(C.latest(str(tmp_path)))


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    ck = C.Checkpoint(np.zeros(3, np.float32), np.zeros((1, 3), np.float32), 1, [1], 0, 0, {})
    first = C.save(str(tmp_path), ck)

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        C.save(str(tmp_path), C.Checkpoint(ck.weights, ck.momentum, 2, [2], 0, 0, {}))
    assert C.latest(str(tmp_path)) == first and C.load(first).commits == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.rsplit("/", 1)[-1]]
