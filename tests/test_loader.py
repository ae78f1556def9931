"""Sharding (pure functions) and the batch loaders, on a tiny synthetic staged file."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_dualbatch.data import (
    EvalLoader,
    SyntheticSpec,
    TrainLoader,
    clear_memory_cache,
    eval_indices,
    open_staged,
    prepare,
    shard_indices,
)
from hpc_dualbatch.errors import DataError

SPEC = SyntheticSpec(samples=90, test_samples=25, classes=3, channels=3, size=16, seed=5)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loader") / "syn.h5")
    prepare("synthetic", None, "8,12,16", path, synthetic=SPEC, log=lambda msg: None)
    return open_staged(path)


@pytest.fixture(scope="module")
def raw_and_jpeg(tmp_path_factory):
    """The same smooth images (little pixel noise, which JPEG would drop) staged both ways."""
    spec = SyntheticSpec(samples=40, test_samples=5, classes=2, channels=3, size=16, noise=0.01)
    folder = tmp_path_factory.mktemp("jpeg")
    for encoding in ("raw", "jpeg"):
        prepare("synthetic", None, "8,16", str(folder / f"{encoding}.h5"), synthetic=spec, encoding=encoding,
                log=lambda msg: None)  # fmt: skip
    return open_staged(str(folder / "raw.h5")), open_staged(str(folder / "jpeg.h5"))


def pixels(staged, split, resolution, idx):
    """uint8 pixels of the staged file, read independently of the loader."""
    return staged.images(split, resolution)[()][idx]


def normalise(staged, x_uint8):
    mean = staged.mean[None, :, None, None]
    std = staged.std[None, :, None, None]
    return ((x_uint8 / 255.0 - mean) / std).astype(np.float32)


def collect(loader):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in loader])
    return np.concatenate(xs), np.concatenate(ys), [len(y) for y in ys]


# --- sharding -----------------------------------------------------------------------------------------


def all_shards(n, shares, group_sizes, round_idx, seed, assignment):
    return {
        (g, r): shard_indices(n, shares, g, r, size, round_idx, seed, assignment)
        for g, size in enumerate(group_sizes)
        for r in range(size)
    }


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    group_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    round_idx=st.integers(0, 50),
    seed=st.integers(0, 2**31),
)
def test_partition_is_disjoint_and_exact(n, group_sizes, fractions, round_idx, seed):
    # shares that fit into n (the usual plan: n_L d_L + n_S d_S rounds to about d)
    weights = np.array(fractions[: len(group_sizes)]) + 1e-3
    shares = [int(v) for v in np.floor(weights / weights.sum() * n)]
    shards = all_shards(n, shares, group_sizes, round_idx, seed, "partition")
    everything = np.concatenate(list(shards.values()))
    assert len(everything) == sum(shares) and len(np.unique(everything)) == sum(shares)
    assert everything.dtype == np.int64 and (everything >= 0).all() and (everything < n).all()
    for g, size in enumerate(group_sizes):
        parts = [len(shards[(g, r)]) for r in range(size)]
        assert sum(parts) == shares[g] and max(parts) - min(parts) <= 1
    if sum(shares) == n:
        assert sorted(everything.tolist()) == list(range(n))


def test_partition_wraps_when_shares_exceed_the_data():
    shards = all_shards(10, [6, 7], [2, 1], round_idx=3, seed=0, assignment="partition")
    first = np.concatenate([shards[(0, 0)], shards[(0, 1)]])
    second = shards[(1, 0)]
    assert len(first) == 6 and len(second) == 7 and len(set(second.tolist())) == 7
    assert len(set(first.tolist()) | set(second.tolist())) == 10  # every sample used, 3 twice


def test_partition_depends_on_round_and_seed_only():
    a = shard_indices(100, [50, 50], 1, 0, 1, round_idx=2, seed=7)
    assert np.array_equal(a, shard_indices(100, [50, 50], 1, 0, 1, round_idx=2, seed=7))
    assert not np.array_equal(a, shard_indices(100, [50, 50], 1, 0, 1, round_idx=3, seed=7))
    assert not np.array_equal(a, shard_indices(100, [50, 50], 1, 0, 1, round_idx=2, seed=8))


def test_reshuffle_takes_the_first_share_of_a_group_permutation():
    n, shares, sizes = 50, [30, 25, 40], [2, 3, 1]
    shards = all_shards(n, shares, sizes, round_idx=4, seed=1, assignment="reshuffle")
    per_group = [np.concatenate([shards[(g, r)] for r in range(size)]) for g, size in enumerate(sizes)]
    for g, idx in enumerate(per_group):
        assert len(idx) == shares[g] and len(np.unique(idx)) == shares[g]  # disjoint across the group's ranks
    assert not np.array_equal(np.sort(per_group[0]), np.sort(per_group[1][:30]))  # groups draw independently
    assert np.array_equal(shards[(0, 1)], shard_indices(n, shares, 0, 1, 2, 4, 1, "reshuffle"))
    wrapped = shard_indices(10, [15], 0, 0, 1, 0, 0, "reshuffle")
    assert len(wrapped) == 15 and np.array_equal(wrapped[10:], wrapped[:5])


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="assignment 'random'"):
        shard_indices(10, [5], 0, 0, 1, 0, 0, "random")
    with pytest.raises(ValueError, match="rank 2 of 2"):
        shard_indices(10, [5], 0, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="group 1 of 1"):
        shard_indices(10, [5], 1, 0, 1, 0, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_eval_indices_cover_once(size):
    parts = [eval_indices(20, r, size) for r in range(size)]
    assert np.array_equal(np.concatenate(parts), np.arange(20))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --- loaders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_batches_follow_indices_exactly(staged, in_memory):
    idx = np.array([5, 3, 3, 80, 0, 41, 7, 89, 12, 60, 2])  # a repeat (wrapped shares), not sorted
    loader = TrainLoader(staged, "train", 12, idx, 4, augment=False, in_memory=in_memory, prefetch=2)
    x, y, sizes = collect(loader)
    assert sizes == [4, 4, 3] and len(loader) == 3  # the last batch is short: exactly len(idx) samples
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (11, 3, 12, 12)
    assert np.allclose(x, normalise(staged, pixels(staged, "train", 12, idx)), atol=1e-5)
    assert np.array_equal(y, staged.labels("train")[idx])


def test_same_seed_same_batches_and_memory_equals_stream(staged):
    idx = shard_indices(90, [60, 30], 0, 0, 1, 0, 0)
    args = dict(augment=True, flip=True, pad=4)
    a = collect(TrainLoader(staged, "train", 16, idx, 16, seed=11, in_memory="always", **args))[0]
    b = collect(TrainLoader(staged, "train", 16, idx, 16, seed=11, in_memory="never", prefetch=0, **args))[0]
    c = collect(TrainLoader(staged, "train", 16, idx, 16, seed=12, **args))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    loader = TrainLoader(staged, "train", 16, idx, 16, seed=11, **args)
    assert np.array_equal(collect(loader)[0], collect(loader)[0])  # each pass replays the seed


def test_flip_and_crop_are_per_sample_shifts_and_mirrors(staged):
    idx = np.arange(40)
    raw = torch.from_numpy(pixels(staged, "train", 16, idx))
    flipped = collect(TrainLoader(staged, "train", 16, idx, 8, pad=0, flip=True, seed=3))[0]
    plain = normalise(staged, raw.numpy())
    mirrored = normalise(staged, raw.flip(3).numpy())
    same = np.isclose(flipped, plain, atol=1e-5).all(axis=(1, 2, 3))
    mirror = np.isclose(flipped, mirrored, atol=1e-5).all(axis=(1, 2, 3))
    assert (same | mirror).all() and same.any() and mirror.any()

    loader = TrainLoader(staged, "train", 16, idx, 8, pad=4, flip=False, seed=3)  # 4 px at 16 px
    cropped = collect(loader)[0]
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4)).numpy()
    shifts = set()
    for i in range(len(idx)):
        candidates = {(dy, dx): normalise(staged, padded[i : i + 1, :, dy : dy + 16, dx : dx + 16])[0]
                      for dy in range(9) for dx in range(9)}  # fmt: skip
        windows = [
            shift for shift, window in candidates.items() if np.allclose(cropped[i], window, atol=1e-5)
        ]
        assert windows, f"sample {i} is not a 16 px window of the 4 px zero-padded image"
        shifts.add(windows[0])
    assert len(shifts) > 5


def test_pad_scales_with_resolution(staged):
    assert [TrainLoader(staged, "train", r, [0], 1, pad=4).pad for r in (8, 12, 16)] == [2, 3, 4]
    assert TrainLoader(staged, "train", 8, [0], 1, pad=1).pad == 1  # never rounded down to none
    assert TrainLoader(staged, "train", 8, [0], 1, pad=0).pad == 0


def test_normalised_train_set_has_zero_mean_unit_std(staged):
    x = collect(TrainLoader(staged, "train", 16, np.arange(90), 32, augment=False))[0]
    assert np.allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert np.allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_eval_loader_covers_the_test_split(staged):
    parts = [EvalLoader(staged, 8, eval_indices(25, r, 2), 5) for r in range(2)]
    ys = np.concatenate([collect(p)[1] for p in parts])
    assert np.array_equal(ys, staged.labels("test"))
    x = collect(parts[0])[0]
    assert np.allclose(x, normalise(staged, pixels(staged, "test", 8, np.arange(13))), atol=1e-5)


def test_jpeg_is_decoded_in_the_loader(raw_and_jpeg):
    raw, jpeg = raw_and_jpeg
    idx = np.array([9, 1, 30])
    exact = pixels(raw, "train", 16, idx).astype(np.float64)
    for in_memory in ("always", "never"):
        x, y, _ = collect(TrainLoader(jpeg, "train", 16, idx, 2, augment=False, in_memory=in_memory))
        decoded = (x * jpeg.std[None, :, None, None] + jpeg.mean[None, :, None, None]) * 255
        assert x.shape == (3, 3, 16, 16) and np.abs(decoded - exact).mean() < 6  # lossy: a few levels of 255
        assert np.array_equal(y, raw.labels("train")[idx])


def test_memory_cache_is_shared_per_resolution(staged):
    clear_memory_cache()
    a = TrainLoader(staged, "train", 12, [1], 1, in_memory="auto")
    b = TrainLoader(staged, "train", 12, [2], 1, in_memory="auto")
    assert a.pixels.memory is not None and a.pixels.memory is b.pixels.memory
    too_big = TrainLoader(staged, "train", 16, [1], 1, in_memory="auto", in_memory_max_mb=0)
    assert too_big.pixels.memory is None
    assert TrainLoader(staged, "train", 8, [1], 1, in_memory="never").pixels.memory is None


@pytest.mark.timeout(30)
def test_errors_in_the_prefetch_thread_reach_the_consumer(staged, monkeypatch):
    loader = TrainLoader(staged, "train", 8, np.arange(40), 4, in_memory="never")
    real = loader.pixels.__call__
    calls = []

    def fail_on_third(idx):
        calls.append(1)
        if len(calls) == 3:
            raise DataError("staged data file 'x.h5': reading failed")
        return real(idx)

    monkeypatch.setattr(loader, "pixels", fail_on_third)
    seen = 0
    with pytest.raises(DataError, match="x.h5"):
        for _ in loader:
            seen += 1
    assert seen == 2


@pytest.mark.timeout(30)
def test_leaving_early_ends_the_prefetch_thread(staged):
    it = iter(TrainLoader(staged, "train", 8, np.arange(90), 2, prefetch=1))
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "hpc_dualbatch-prefetch"]


def test_loader_rejects_bad_arguments(staged):
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 25\)"):
        EvalLoader(staged, 8, [25], 4)
    with pytest.raises(ValueError, match="batch_size 0"):
        TrainLoader(staged, "train", 8, [0], 0)
    with pytest.raises(DataError, match="split 'val'"):
        TrainLoader(staged, "val", 8, [0], 1)
    with pytest.raises(ValueError, match="in_memory 'yes'"):
        TrainLoader(staged, "train", 8, [0], 1, in_memory="yes")


def test_streaming_read_error_names_the_file(staged):
    loader = TrainLoader(staged, "train", 8, np.arange(4), 4, in_memory="never", prefetch=0)

    class Broken:
        def __getitem__(self, key):
            raise OSError("Can't read data (inflate() failed)")

    loader.pixels.ds = Broken()
    with pytest.raises(DataError, match=r"syn.h5': reading train/images/8 failed.*prepare --force"):
        list(loader)


def test_loader_benchmark_smoke(staged, tmp_path, capsys):
    from hpc_dualbatch.bench.loader import main

    out = tmp_path / "bench.json"
    argv = [
        "--file",
        staged.path,
        "--batch",
        "8",
        "--batches",
        "3",
        "--steps",
        "1",
        "--width",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [row["resolution"] for row in result["rows"]] == [8, 12, 16]
    assert all(row["loader_img_s"] > 0 and row["consumer_img_s"] > 0 for row in result["rows"])
    assert "loader/train" in capsys.readouterr().out


@pytest.mark.parametrize("channels", [1, 3])
def test_every_batch_has_row_major_strides_and_trains_at_two_threads(tmp_path, channels):
    """A 1-channel augmented batch is a channels-last view whose strides `.contiguous()` leaves
    as they are (the stride of C = 1 is not looked at); torch's CPU convolution backward corrupted
    the heap on such input at 2+ threads. Every batch now has the row-major strides of its shape,
    and the model trains on them at 2 threads (a crash here ends the test process)."""
    from hpc_dualbatch.config import OptimConfig
    from hpc_dualbatch.data.loader import augment_batch, standard_layout
    from hpc_dualbatch.runtime.engine import make_optimizer, train_step
    from hpc_dualbatch.runtime.model import build_model

    spec = SyntheticSpec(samples=96, test_samples=8, classes=3, channels=channels, size=20, seed=2)
    path = str(tmp_path / "s.h5")
    prepare("synthetic", None, "20", path, synthetic=spec, log=lambda msg: None)
    st = open_staged(path)
    view = augment_batch(torch.zeros(4, channels, 20, 20, dtype=torch.uint8), 2, True, torch.Generator())
    assert view.is_contiguous() == (channels == 1)  # what `.contiguous()` would have trusted
    fixed = standard_layout(view)
    assert fixed.stride() == (channels * 400, 400, 20, 1) and torch.equal(fixed, view)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = build_model("resnet18_cifar", 3, channels, 8).train()
        opt = make_optimizer(model, OptimConfig(), 0.05)
        for x, y in TrainLoader(st, "train", 20, np.arange(96), 26, augment=True, flip=True, pad=2):
            assert x.stride() == (channels * 400, 400, 20, 1)
            loss, _ = train_step(model, opt, x, y)
            assert np.isfinite(loss)
    finally:
        torch.set_num_threads(threads)
