"""Checkpoint files: round trip, corruption found, a failed write keeps the previous one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.runtime import checkpoint as C


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


def test_a_config_saved_before_a_key_existed_compares_as_its_default():
    """A checkpoint or run folder from before `server.outer` existed is the same configuration as
    one with its default, and not as one that sets it."""
    from hpc_dualbatch.config import Config

    now = Config().to_dict()
    older = json.loads(json.dumps(now))
    del older["server"]["outer"], older["schedule"]["small_lr"]
    assert C.config_differences(older, now, ("saved", "now")) == []
    now["server"]["outer"] = "delayed"
    assert C.config_differences(older, now, ("saved", "now")) == ["server.outer: saved 'none', now 'delayed'"]
