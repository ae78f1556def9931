"""Pure pieces of the server and workers: the merge rule, step splitting, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_dualbatch import checkpoint as C
from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.plan import contribution_factor
from hpc_dualbatch.server import merge
from hpc_dualbatch.worker import rank_batches


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
