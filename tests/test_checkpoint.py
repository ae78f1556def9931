"""Checkpoint files: round trip, corruption found, a failed write keeps the previous one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime import resume as R


def test_checkpoint_round_trip_and_corruption(tmp_path):
    ck = C.Checkpoint(
        np.arange(5, dtype=np.float32),
        C.Momenta.of([np.ones(3, np.float32), None], 3),
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
    R.check_compatible(path, got.config, {"seed": 1, "plan": {"large_batch": {20: 64}}, "out": "elsewhere"})
    with pytest.raises(CheckpointError, match="seed: checkpoint 1, now 2"):
        R.check_compatible(path, got.config, {"seed": 2, "plan": {"large_batch": {20: 64}}})
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
    ck = C.Checkpoint(
        np.zeros(3, np.float32), C.Momenta.of([np.zeros(3, np.float32)] * 1, 3), 1, [1], 0, 0, {}
    )
    first = C.save(str(tmp_path), ck)

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        C.save(str(tmp_path), C.Checkpoint(ck.weights, ck.momentum, 2, [2], 0, 0, {}))
    assert C.latest(str(tmp_path)) == first and C.load(first).commits == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.rsplit("/", 1)[-1]]


def test_momentum_is_written_and_read_one_group_at_a_time(tmp_path, monkeypatch):
    """A barrier writes each group's momentum as it arrives; a resume reads one group's when it is
    asked for (a group without an entry restarts from zero); a writer given up on leaves the
    previous checkpoint the latest and no file behind."""
    first = C.save(
        str(tmp_path),
        C.Checkpoint(np.zeros(4, np.float32), C.Momenta.of([None] * 3, 4), 1, [1] * 3, 0, 0, {}),
    )
    w = C.Writer(str(tmp_path), 2)
    for g in (2, 0):  # in the order the groups' momentum arrives
        w.add_momentum(g, np.full(4, g + 1.0, np.float32))
    path = w.finish(
        C.Checkpoint(np.ones(4, np.float32), C.Momenta(3, 4, w.groups), 2, [1] * 3, 0, 0, {}), keep=3
    )
    reads = []
    ck = C.load(path)
    read = ck.momentum._read
    monkeypatch.setattr(ck.momentum, "_read", lambda g: reads.append(g) or read(g))
    assert (ck.momentum.n_groups, ck.momentum.n_params, ck.momentum.saved) == (3, 4, [0, 2]) and reads == []
    assert [ck.momentum.get(g).tolist() for g in range(3)] == [[1.0] * 4, [0.0] * 4, [3.0] * 4]
    assert reads == [0, 2]  # group 1 has no entry: zeros without a read
    w = C.Writer(str(tmp_path), 3)
    w.add_momentum(0, np.zeros(4, np.float32))
    w.abort()
    assert C.latest(str(tmp_path)) == path and sorted(
        p.name for p in (tmp_path / "checkpoints").iterdir()
    ) == [first.rsplit("/", 1)[-1], path.rsplit("/", 1)[-1]]


def test_a_format_1_checkpoint_is_still_read(tmp_path):
    """Format 1 held every group's momentum in one (n_groups, n_params) array."""
    path = tmp_path / "ckpt-000000004.npz"
    meta = {"format": 1, "commits": 4, "rounds": [2, 2], "elapsed": 1.0, "metrics_offset": 0, "config": {}}
    momentum = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(path, weights=np.zeros(5, np.float32), momentum=momentum, meta=np.array(json.dumps(meta)))
    ck = C.load(str(path))
    assert ck.commits == 4 and ck.momentum.n_groups == 2 and ck.momentum.get(1).tolist() == [3.0, 4.0, 5.0]


def test_a_config_saved_before_a_key_existed_compares_as_its_default():
    """A checkpoint or run folder from before `server.outer` existed is the same configuration as
    one with its default, and not as one that sets it."""
    from hpc_dualbatch.config import Config

    now = Config().to_dict()
    older = json.loads(json.dumps(now))
    del older["server"]["outer"]
    assert R.config_differences(older, now, ("saved", "now")) == []
    now["server"]["outer"] = "delayed"
    assert R.config_differences(older, now, ("saved", "now")) == ["server.outer: saved 'none', now 'delayed'"]


def test_a_key_whose_default_changed_compares_as_what_ran_before_it():
    """schedule.small_lr was added as `same` and is `sqrt` by default now: a config saved before
    it existed ran at `same`, so it differs from today's default and equals an explicit `same`."""
    from hpc_dualbatch.config import Config

    now = Config().to_dict()
    older = json.loads(json.dumps(now))
    del older["schedule"]["small_lr"], older["schedule"]["warmup_ramp"]
    assert R.config_differences(older, now, ("saved", "now")) == [
        "schedule.small_lr: saved 'same', now 'sqrt'",
        "schedule.warmup_ramp: saved 'task', now 'step'",
    ]
    now["schedule"].update(small_lr="same", warmup_ramp="task")
    assert R.config_differences(older, now, ("saved", "now")) == []


def test_a_config_saved_before_ps_momentum_existed_trained_its_groups_at_optim_momentum():
    """Before optim.ps_momentum the groups took optim.momentum: an older config at momentum 0.95
    equals one with both at 0.95, and differs from today's default 0.8 under the new key."""
    from hpc_dualbatch.config import Config

    now = Config().to_dict()
    now["optim"]["momentum"] = 0.95
    older = json.loads(json.dumps(now))
    del older["optim"]["ps_momentum"]
    assert R.config_differences(older, now, ("saved", "now")) == ["optim.ps_momentum: saved 0.95, now 0.8"]
    now["optim"]["ps_momentum"] = 0.95
    assert R.config_differences(older, now, ("saved", "now")) == []
