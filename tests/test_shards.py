"""Server shards without MPI: the slices, the orders on the wire, a sharded checkpoint's parts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hpc_dualbatch.config import config_from_dict
from hpc_dualbatch.errors import CheckpointError, ConfigError
from hpc_dualbatch.ps.shards import Op, Order, slices, split
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.topology import expected_world_size, group_layout, hetjob_components
from tests.helpers import tiny_config


def test_slices_cover_the_weights_contiguously_and_evenly():
    assert slices(10, 1) == [(0, 10)]
    assert slices(10, 3) == [(0, 3), (3, 6), (6, 10)]
    for n, s in [(11_200_000, 16), (7, 7), (1000, 3)]:
        got = slices(n, s)
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert max(hi - lo for lo, hi in got) - min(hi - lo for lo, hi in got) <= 1
    with pytest.raises(ValueError):
        slices(3, 4)


def test_a_slice_splits_into_its_parameters_and_its_buffers():
    # 8 parameters then 2 BN buffers, 3 shards: [0, 3) [3, 6) [6, 10)
    assert [split(lo, hi, 8) for lo, hi in slices(10, 3)] == [
        (slice(0, 3), slice(3, 3)),
        (slice(3, 6), slice(6, 6)),
        (slice(6, 8), slice(8, 10)),
    ]
    assert split(0, 10, 8) == (slice(0, 8), slice(8, 10))  # one server: what the protocol always sent


def test_orders_survive_the_wire():
    for order in [Order(Op.APPLY, 3, 0.1234567890123, 0.05, 17), Order(Op.REPLY, 1, has_state=True),
                  Order(Op.CKPT, commits=40, n=3, has_state=True), Order(Op.STOP)]:  # fmt: skip
        assert Order.unpack(order.pack()) == order


def test_the_shards_come_first_in_the_world():
    assert group_layout([2, 1], 2) == [-1, -1, 0, 0, 1] and expected_world_size([2, 1], 2) == 5
    assert group_layout([2, 1], True) == [-1, 0, 0, 1]  # (one server, as a flag)
    assert [n for n, _ in hetjob_components([1, 1, 1], 1, 4)] == [4, 2, 1]


def test_shards_must_be_a_count_of_server_ranks(tmp_path):
    with pytest.raises(ConfigError, match="'server.shards' is 0; valid: 1 to 64"):
        config_from_dict(tiny_config("d.h5", tmp_path, server__shards=0))
    assert config_from_dict(tiny_config("d.h5", tmp_path, server__shards=3)).n_servers == 3
    assert config_from_dict(tiny_config("d.h5", tmp_path, mode="sync", workers__small=0)).n_servers == 0


def test_a_sharded_checkpoint_is_its_parts_under_one_manifest(tmp_path):
    """Shard 1 writes its part first; shard 0's manifest, written last, names the slices; a
    shard reads back only its own part, a tool the whole weights; a part of another commit is
    refused; rotation drops a manifest with its parts."""
    n_w, n_p = 10, 8
    weights = np.arange(n_w, dtype=np.float32)
    (lo0, hi0), (lo1, hi1) = slices(n_w, 2)
    part = C.Writer(str(tmp_path), 4, shard=1)
    part.add_momentum(0, np.full(n_p - lo1, 2.0, np.float32))
    part.add_momentum(1, np.full(n_p - lo1, 5.0, np.float32))  # group 1's slice came here, not to shard 0
    part.finish_part(weights[lo1:hi1], np.zeros((2, n_w - n_p), np.float32), None, {"commits": 4})
    manifest = C.Writer(str(tmp_path), 4)
    manifest.add_momentum(0, np.full(hi0, 1.0, np.float32))
    shards = {"count": 2, "slices": [[lo0, hi0], [lo1, hi1]]}
    none, evaluated = np.zeros((2, 0), np.float32), np.array([7.0, 8.0], np.float32)
    ck = C.Checkpoint(weights[lo0:hi0], C.Momenta(2, hi0, [0]), 4, [2, 2], 1.0, 0, {}, shards=shards,
                      group_buffers=none, final_buffers=evaluated)  # fmt: skip
    path = manifest.finish(ck, keep=1)
    got = C.load(path)
    assert got.shards["count"] == 2 and got.weights.tolist() == weights[lo0:hi0].tolist()
    mine = C.load_part(got, path, 1)
    assert mine.weights.tolist() == weights[lo1:hi1].tolist()
    assert mine.momentum.get(0).tolist() == [2.0] * 3
    assert (
        mine.momentum.saved == [0] and mine.momentum.get(1).tolist() == [0.0] * 3
    )  # not in the manifest: zeros
    assert C.whole_weights(path).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7.0, 8.0]  # with the evaluated buffers
    other = C.Writer(str(tmp_path), 9, shard=1)
    other.finish_part(weights[lo1:hi1], np.zeros((2, 2), np.float32), None, {"commits": 9})
    os.replace(other.path, path + ".shard1")  # a part of another commit in its place
    with pytest.raises(CheckpointError, match="does not belong to"):
        C.load_part(got, path, 1)
    orphan = C.Writer(str(tmp_path), 6, shard=1)  # a part whose manifest never came (a crash)
    orphan.finish_part(weights[lo1:hi1], np.zeros((2, 2), np.float32), None, {"commits": 6})
    later = C.Writer(str(tmp_path), 8)
    later.finish(C.Checkpoint(weights[lo0:hi0], C.Momenta(2, hi0, []), 8, [4, 4], 1.0, 0, {},
                              shards=ck.shards), keep=1)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "ckpt-000000008.npz"
    ]  # 4, its part, the orphan gone
