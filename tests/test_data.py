"""Staging (`hpc-dualbatch prepare`) and validation (`open_staged`) on tiny generated sources.

CIFAR archives, IDX files and image folders are generated here in the official formats; the real
Fashion-MNIST test runs only where the Debian package is installed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image

from hpc_dualbatch.data import SyntheticSpec, TrainLoader, open_staged, prepare
from hpc_dualbatch.data import source as sources_mod
from hpc_dualbatch.data import stage as stage_mod
from hpc_dualbatch.errors import DataError

FASHION = "/usr/share/datasets/fashion-mnist"
QUIET = {"log": lambda msg: None}
TINY = SyntheticSpec(samples=60, test_samples=20, classes=4, channels=3, size=16, seed=3)


# --- generators of official-format sources ------------------------------------------------------------


def _tar_gz(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # the official archives are protocol-2 pickles


def make_cifar10(path, per_batch=6, n_test=8, seed=0, labels_hook=None) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"name{i}".encode() for i in range(10)]
    members = {"cifar-10-batches-py/batches.meta": _pickle({b"label_names": names, b"num_vis": 3072})}
    parts = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        if labels_hook:
            labels = labels_hook(name, labels)
        parts[name] = (data, labels)
        members[f"cifar-10-batches-py/{name}"] = _pickle(
            {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        )
    _tar_gz(path, members)
    return parts


def make_cifar100(path, n_train=30, n_test=10, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
    members, parts = {"cifar-100-python/meta": _pickle(meta)}, {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        parts[name] = (data, fine)
        members[f"cifar-100-python/{name}"] = _pickle(
            {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n, b"filenames": [b"x"] * n}
        )
    _tar_gz(path, members)
    return parts


def _idx(path, arr: np.ndarray) -> None:
    magic = 0x803 if arr.ndim == 3 else 0x801
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes())


def make_idx_folder(folder, n_train=12, n_test=6, seed=2) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
        _idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        _idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        out[prefix] = (images, labels)
    return out


def make_image_folder(root) -> None:
    """train/{cat,dog,fish}, val/{cat,dog}: JPEG and PNG files of different sizes and modes."""
    rng = np.random.default_rng(4)
    specs = {
        "train/cat": [("a.jpg", (40, 30), "RGB"), ("b.JPEG", (33, 50), "RGB"), ("c.png", (16, 16), "RGB")],
        "train/dog": [("a.png", (24, 36), "L"), ("b.png", (20, 20), "RGBA")],
        "train/fish": [("a.jpeg", (64, 48), "RGB")],
        "val/cat": [("a.png", (18, 22), "RGB")],
        "val/dog": [("a.jpg", (30, 30), "RGB"), ("b.png", (17, 19), "L")],
    }
    for folder, files in specs.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name, (w, h), mode in files:
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            # smooth ramps, like photos: JPEG keeps them close (random noise is its worst case)
            yy, xx = np.mgrid[0:h, 0:w]
            ramps = [
                (yy * rng.uniform(1, 4) + xx * rng.uniform(1, 4) + rng.uniform(0, 99))
                for _ in range(channels)
            ]
            arr = (np.stack(ramps, -1) % 256).astype(np.uint8)
            Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(
                os.path.join(root, folder, name)
            )
    with open(os.path.join(root, "train/cat/notes.txt"), "w") as f:
        f.write("not an image: ignored")


def copy_and_edit(tmp_path, src: str, edit) -> str:
    """A modified copy under a new name (open_staged caches by path and file version)."""
    dst = str(tmp_path / f"edited-{len(os.listdir(tmp_path))}.h5")
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("syn") / "syn.h5")
    prepare("synthetic", None, "8,16", path, synthetic=TINY, **QUIET)
    return path


# --- sources ---------------------------------------------------------------------------------------------


def _check_common(staged, n_train, n_test, resolutions, channels):
    assert staged.resolutions == resolutions and staged.channels == channels
    with h5py.File(staged.path, "r") as f:
        assert f.attrs["format_version"] == 1
        for split, n in (("train", n_train), ("test", n_test)):
            assert f[f"{split}/labels"].dtype == np.int64 and f[f"{split}/labels"].shape == (n,)
            for r in resolutions:
                ds = f[f"{split}/images/{r}"]
                assert ds.dtype == np.uint8 and ds.shape == (n, channels, r, r)
                assert ds.chunks[0] >= 1 and ds.chunks[1:] == (channels, r, r)


def test_cifar10_stages_original_bytes_and_labels(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    parts = make_cifar10(archive)
    out = str(tmp_path / "c10.h5")
    assert prepare("cifar10", str(archive), "16,24,32", out, **QUIET)
    s = open_staged(out)
    _check_common(s, 30, 8, [16, 24, 32], 3)
    train_data = np.concatenate([parts[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([parts[f"data_batch_{i}"][1] for i in range(1, 6)])
    with h5py.File(out, "r") as f:
        assert f["train/images/32"][()].tobytes() == train_data.tobytes()  # original size: byte for byte
        assert f["test/images/32"][()].tobytes() == parts["test_batch"][0].tobytes()
        assert (
            f.attrs["source"] == "cifar10" and f.attrs["encoding"] == "raw" and f.attrs["num_classes"] == 10
        )
        assert list(f.attrs["classes"]) == [f"name{i}" for i in range(10)]
    assert np.array_equal(
        np.bincount(s.labels("train"), minlength=10), np.bincount(train_labels, minlength=10)
    )
    assert np.array_equal(s.labels("test"), parts["test_batch"][1])
    pixels = train_data.reshape(-1, 3, 32 * 32) / 255.0
    assert np.allclose(s.mean, pixels.mean(axis=(0, 2))) and np.allclose(s.std, pixels.std(axis=(0, 2)))


def test_cifar100_stages_fine_labels(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    parts = make_cifar100(archive)
    out = str(tmp_path / "c100.h5")
    prepare("cifar100", str(archive), [24, 32], out, compression="gzip", **QUIET)
    s = open_staged(out)
    _check_common(s, 30, 10, [24, 32], 3)
    assert s.num_classes == 100 and s.classes[7] == "f7" and s.source == "cifar100"
    assert np.array_equal(s.labels("train"), parts["train"][1])
    with h5py.File(out, "r") as f:
        assert f["train/images/32"].compression == "gzip"
        assert f["test/images/32"][()].tobytes() == parts["test"][0].tobytes()


def test_idx_files_stage_byte_for_byte(tmp_path):
    folder = tmp_path / "fm"
    parts = make_idx_folder(folder)
    out = str(tmp_path / "fm.h5")
    prepare("fashion-mnist", str(folder), "14,28", out, compression="lzf", **QUIET)
    s = open_staged(out)
    _check_common(s, 12, 6, [14, 28], 1)
    with h5py.File(out, "r") as f:
        assert f["train/images/28"][()].tobytes() == parts["train"][0].tobytes()
        assert f["test/images/28"][()].tobytes() == parts["t10k"][0].tobytes()
    assert np.array_equal(s.labels("test"), parts["t10k"][1]) and s.classes[9] == "Ankle boot"


def test_downscale_is_antialiased_from_the_original():
    # A 1-px checkerboard has mean 127.5; point sampling at half size would give all 0 or all 255.
    board = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[None, None]
    for size in (16, 12, 8):
        small = sources_mod.resize_square(board, size)
        assert small.shape == (1, 1, size, size) and abs(float(small.mean()) - 127.5) < 3
    assert sources_mod.resize_square(board, 32) is board


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_imagefolder_both_encodings(tmp_path, encoding):
    root = tmp_path / "imgs"
    make_image_folder(root)
    out = str(tmp_path / f"{encoding}.h5")
    prepare("imagefolder", str(root), "8,16", out, encoding=encoding, **QUIET)
    s = open_staged(out)
    assert s.classes == ["cat", "dog", "fish"] and s.channels == 3 and s.encoding == encoding
    assert list(np.bincount(s.labels("train"))) == [3, 2, 1] and list(np.bincount(s.labels("test"))) == [1, 2]
    loader = TrainLoader(s, "train", 16, np.arange(6), 4, augment=False, device="cpu", prefetch=0)
    x = np.concatenate([b[0].numpy() for b in loader])
    pixels = np.rint((x * s.std[None, :, None, None] + s.mean[None, :, None, None]) * 255)
    with Image.open(root / "train/cat/c.png") as im:  # 16x16: stored unchanged at 16 px
        original = np.asarray(im).transpose(2, 0, 1)
    tolerance = 0 if encoding == "raw" else 6  # mean abs error in 0..255 units; JPEG is lossy
    assert np.abs(pixels[2] - original).mean() <= tolerance and x.shape == (6, 3, 16, 16)
    if encoding == "jpeg":
        with h5py.File(out, "r") as f:
            assert bytes(f["train/images/8"][0][:2]) == b"\xff\xd8"  # JPEG start-of-image marker
            assert f["train/images/8"].attrs["encoded_bytes"] == s.stored_bytes("train", 8) > 0


def test_imagefolder_parallel_workers_match_serial(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    prepare("imagefolder", str(root), "8", str(tmp_path / "a.h5"), **QUIET)
    prepare("imagefolder", str(root), "8", str(tmp_path / "b.h5"), workers=2, **QUIET)
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        assert np.array_equal(a["train/images/8"][()], b["train/images/8"][()])


def test_synthetic_is_deterministic_balanced_and_separable(tmp_path, synthetic_file):
    again = str(tmp_path / "again.h5")
    prepare("synthetic", None, "8,16", again, synthetic=TINY, **QUIET)
    with h5py.File(synthetic_file, "r") as a, h5py.File(again, "r") as b:
        for key in ("train/images/8", "train/images/16", "test/labels"):
            assert np.array_equal(a[key][()], b[key][()])
        x_train = a["train/images/16"][()].reshape(60, -1) / 255.0
        x_test = a["test/images/16"][()].reshape(20, -1) / 255.0
    s = open_staged(synthetic_file)
    y_train, y_test = s.labels("train"), s.labels("test")
    assert list(np.bincount(y_train)) == [15] * 4 and s.classes == ["class0", "class1", "class2", "class3"]
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(4)])
    nearest = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y_test).mean() >= 0.8  # separable even by class means of raw pixels


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"Fashion-MNIST not installed at {FASHION}")
def test_real_fashion_mnist(tmp_path):
    out = str(tmp_path / "fm.h5")
    prepare("fashion-mnist", None, "20,28", out, **QUIET)
    s = open_staged(out)
    assert s.num_samples("train") == 60000 and s.num_samples("test") == 10000
    assert list(np.bincount(s.labels("train"))) == [6000] * 10
    assert list(np.bincount(s.labels("test"))) == [1000] * 10
    assert abs(s.mean[0] - 0.286) < 0.001 and abs(s.std[0] - 0.353) < 0.001  # published statistics
    with h5py.File(out, "r") as f:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            with gzip.open(os.path.join(FASHION, f"{prefix}-images-idx3-ubyte.gz")) as g:
                assert f[f"{split}/images/28"][()].tobytes() == g.read()[16:]
        assert f["train/images/20"].shape == (60000, 1, 20, 20)


# --- re-runs and atomicity -------------------------------------------------------------------------------


def test_rerun_is_noop_force_and_new_request_restage(tmp_path):
    out = str(tmp_path / "s.h5")
    assert prepare("synthetic", None, "8,16", out, synthetic=TINY, **QUIET)
    before = os.stat(out).st_mtime_ns, os.stat(out).st_ino
    assert not prepare("synthetic", None, [16, 8], out, synthetic=TINY, workers=2, **QUIET)  # same request
    assert (os.stat(out).st_mtime_ns, os.stat(out).st_ino) == before
    assert prepare("synthetic", None, "8,16", out, synthetic=TINY, force=True, **QUIET)
    assert os.stat(out).st_ino != before[1]
    assert prepare("synthetic", None, "8,12", out, synthetic=TINY, **QUIET)  # another request re-stages
    assert open_staged(out).resolutions == [8, 12]


def test_interrupted_prepare_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    calls = []

    def failing_resize(images, size):
        calls.append(size)
        if len(calls) > 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C or a Slurm time limit mid-write
        return images[..., :size, :size]

    monkeypatch.setattr(sources_mod, "resize_square", failing_resize)
    with pytest.raises(KeyboardInterrupt):
        prepare("synthetic", None, "8,16", str(out), synthetic=TINY, **QUIET)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    prepare("synthetic", None, "8,16", str(out), synthetic=TINY, **QUIET)
    monkeypatch.setattr(sources_mod, "resize_square", failing_resize)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare("synthetic", None, "8,16", str(out), synthetic=TINY, force=True, **QUIET)
    assert os.listdir(tmp_path) == ["s.h5"]  # the earlier file stays intact
    assert open_staged(str(out)).resolutions == [8, 16]


def test_cli_prepare(tmp_path, capsys):
    from hpc_dualbatch.commands import prepare as prepare_command

    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers())
    out = str(tmp_path / "cli.h5")
    command = f"prepare --source synthetic --resolutions 8,12 --out {out} --synthetic-samples 30"
    args = parser.parse_args(
        f"{command} --synthetic-test-samples 10 --synthetic-size 12 --synthetic-channels 1".split()
    )
    assert args.func(args) == 0
    assert "train 30 / test 10 samples" in capsys.readouterr().out
    assert open_staged(out).channels == 1
    args = parser.parse_args(["prepare", "--source", "synthetic", "--resolutions", "8,x", "--out", out])
    with pytest.raises(DataError, match="8,x"):
        args.func(args)


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="nowhere/fm"):
        prepare("fashion-mnist", str(tmp_path / "nowhere/fm"), "28", str(tmp_path / "o.h5"), **QUIET)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        make_idx_folder(tmp_path / "partial")
        os.remove(tmp_path / "partial/t10k-labels-idx1-ubyte.gz")
        prepare("fashion-mnist", str(tmp_path / "partial"), "28", str(tmp_path / "o.h5"), **QUIET)
    with pytest.raises(DataError, match="missing.tar.gz"):
        prepare("cifar10", str(tmp_path / "missing.tar.gz"), "32", str(tmp_path / "o.h5"), **QUIET)
    with pytest.raises(DataError, match="--input is required for cifar100"):
        prepare("cifar100", None, "32", str(tmp_path / "o.h5"), **QUIET)
    with pytest.raises(DataError, match="no-such-folder"):
        prepare("imagefolder", str(tmp_path / "no-such-folder"), "32", str(tmp_path / "o.h5"), **QUIET)
    assert not os.path.exists(tmp_path / "o.h5")


def test_corrupt_archives(tmp_path):
    out = str(tmp_path / "o.h5")
    text = tmp_path / "cifar-10-python.tar.gz"
    text.write_text("this is not a tar file")
    with pytest.raises(DataError, match="not a readable tar.gz"):
        prepare("cifar10", str(text), "32", out, **QUIET)
    good = tmp_path / "good.tar.gz"
    make_cifar10(good)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataError, match="cut.tar.gz"):
        prepare("cifar10", str(cut), "32", out, **QUIET)
    wrong = tmp_path / "c100-as-c10.tar.gz"
    make_cifar100(wrong)
    with pytest.raises(DataError, match="no member 'batches.meta'"):
        prepare("cifar10", str(wrong), "32", out, **QUIET)
    evil = tmp_path / "evil.tar.gz"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _tar_gz(evil, {"cifar-10-batches-py/batches.meta": pickle.dumps(Payload(), protocol=2)})
    with pytest.raises(DataError, match="refusing to load"):
        prepare("cifar10", str(evil), "32", out, **QUIET)
    assert not marker.exists()
    shape = tmp_path / "shape.tar.gz"
    _tar_gz(
        shape,
        {
            "cifar-10-batches-py/batches.meta": _pickle({b"label_names": [b"a", b"b"]}),
            "cifar-10-batches-py/data_batch_1": _pickle(
                {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
            ),
        },
    )
    with pytest.raises(DataError, match=r"data_batch_1.*expected uint8 \(N, 3072\)"):
        prepare("cifar10", str(shape), "32", out, **QUIET)
    idx = tmp_path / "idx"
    make_idx_folder(idx)
    (idx / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz' declares shape"):
        prepare("fashion-mnist", str(idx), "28", out, **QUIET)
    assert not os.path.exists(out)


def test_source_labels_out_of_range(tmp_path):
    archive = tmp_path / "c10.tar.gz"
    make_cifar10(
        archive, labels_hook=lambda name, labels: labels[:-1] + [10] if name == "data_batch_3" else labels
    )
    with pytest.raises(DataError, match=r"data_batch_3.*label 10 is out of range; valid labels are 0..9"):
        prepare("cifar10", str(archive), "32", str(tmp_path / "o.h5"), **QUIET)


def test_image_folder_problems(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    os.makedirs(root / "train/empty")
    with pytest.raises(DataError, match="train/empty' holds no image files"):
        prepare("imagefolder", str(root), "8", str(tmp_path / "o.h5"), **QUIET)
    shutil.rmtree(root / "train/empty")
    (root / "val/dog/broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="broken.jpg' cannot be decoded"):
        prepare("imagefolder", str(root), "8", str(tmp_path / "o.h5"), **QUIET)
    os.remove(root / "val/dog/broken.jpg")
    os.makedirs(root / "val/horse")
    with pytest.raises(DataError, match="class folder 'horse' that train/ does not have"):
        prepare("imagefolder", str(root), "8", str(tmp_path / "o.h5"), **QUIET)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="must hold train/<class>/ and val/<class>/"):
        prepare("imagefolder", str(root), "8", str(tmp_path / "o.h5"), **QUIET)
    assert not os.path.exists(tmp_path / "o.h5")


def test_bad_arguments(tmp_path):
    for kwargs, match in (
        ({"encoding": "png"}, "--encoding 'png'"),
        ({"compression": "zstd"}, "--compression 'zstd'"),
        ({"resolutions": "16,16"}, r"\[16, 16\] must be distinct"),
        ({"resolutions": "0,8"}, r"distinct integers in 1\.\.2048 px"),
        ({"resolutions": "8,5000"}, r"\[8, 5000\] must be distinct integers in 1\.\.2048 px"),
    ):
        args = {"resolutions": "8", **kwargs}
        with pytest.raises(DataError, match=match):
            prepare("synthetic", None, args.pop("resolutions"), str(tmp_path / "o.h5"), **args, **QUIET)
    with pytest.raises(DataError, match="unknown source 'mnist'"):
        prepare("mnist", None, "8", str(tmp_path / "o.h5"), **QUIET)
    with pytest.raises(DataError, match="synthetic-classes"):
        prepare("synthetic", None, "8", str(tmp_path / "o.h5"), synthetic=SyntheticSpec(classes=0), **QUIET)
    os.makedirs(tmp_path / "taken.h5")
    with pytest.raises(DataError, match="prepare --out '.*taken.h5' is a directory"):  # before staging
        prepare("synthetic", None, "8", str(tmp_path / "taken.h5"), synthetic=TINY, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["taken.h5"]  # no temporary file left behind


def test_missing_and_unreadable_staged_files(tmp_path, synthetic_file):
    with pytest.raises(DataError, match=r"nope.h5' does not exist.*hpc-dualbatch prepare"):
        open_staged(str(tmp_path / "nope.h5"))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"definitely not HDF5" * 100)
    with pytest.raises(DataError, match="garbage.h5' is not a readable HDF5 file"):
        open_staged(str(garbage))
    truncated = tmp_path / "truncated.h5"
    data = open(synthetic_file, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.h5"):
        open_staged(str(truncated))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = [1]
    with pytest.raises(DataError, match="plain.h5' is an HDF5 file without a 'format_version'"):
        open_staged(str(plain))


def test_other_format_version(tmp_path, synthetic_file):
    path = copy_and_edit(tmp_path, synthetic_file, lambda f: f.attrs.modify("format_version", 2))
    with pytest.raises(
        DataError, match=rf"{os.path.basename(path)}' has format_version 2;.*reads format_version 1"
    ):
        open_staged(path)


def test_resolution_not_staged(synthetic_file):
    s = open_staged(synthetic_file)
    with pytest.raises(DataError, match=r"resolution 32 px is not staged in '.*syn.h5'; staged: \[8, 16\]"):
        s.check_resolutions([8, 32])
    with pytest.raises(DataError, match="resolution 12 px"):
        TrainLoader(s, "train", 12, np.arange(4), 2)
    s.check_resolutions([16, 8])


def _set_label(f, value):
    labels = f["train/labels"][()]
    labels[5] = value
    f["train/labels"][...] = labels


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: _set_label(f, 4), r"'train/labels' holds label 4; valid labels are 0..3"),
        (lambda f: _set_label(f, -1), "holds label -1"),
        (lambda f: f.__delitem__("test/images/8"), "dataset 'test/images/8' is missing"),
        (lambda f: f.attrs.__setitem__("mean", [0.5]), r"attribute 'mean' is \[0.5\]; expected 3"),
        (lambda f: f.attrs.__delitem__("classes"), "attribute 'classes' is missing"),
        (lambda f: f.attrs.modify("num_classes", 5), "4 class names for num_classes 5"),
        (lambda f: f.attrs.modify("resolutions", [16, 8]), "attribute 'resolutions'"),
        (lambda f: f.attrs.modify("encoding", "webp"), "attribute 'encoding' is 'webp'"),
    ],
)
def test_crafted_staged_files(tmp_path, synthetic_file, edit, match):
    path = copy_and_edit(tmp_path, synthetic_file, edit)
    with pytest.raises(DataError, match=rf"{os.path.basename(path)}.*{match}"):
        open_staged(path)


def test_declared_size_beyond_stored_bytes(tmp_path, synthetic_file):
    def huge_labels(f):  # 8 TB of labels declared, none stored: reading it must not be tried
        del f["train/labels"]
        f.create_dataset("train/labels", shape=(10**12,), dtype=np.int64, chunks=(1024,))

    path = copy_and_edit(tmp_path, synthetic_file, huge_labels)
    with pytest.raises(DataError, match="'/train/labels' declares 8000000000000 bytes but stores only 0"):
        open_staged(path)

    def shrink_images(f):  # right shape, but only the first chunk written: a partial copy
        del f["test/images/16"]
        ds = f.create_dataset("test/images/16", shape=(20, 3, 16, 16), dtype=np.uint8, chunks=(1, 3, 16, 16))
        ds[0] = 1

    path = copy_and_edit(tmp_path, synthetic_file, shrink_images)
    with pytest.raises(DataError, match="'/test/images/16' declares 15360 bytes but stores only 768"):
        open_staged(path)


def test_prepare_checks_the_disk_and_says_when_it_fills(tmp_path, monkeypatch):
    """Raw staging knows its size: more than the folder's free space is refused before staging;
    a write that fails anyway (h5py's RuntimeError for ENOSPC) is one DataError, no file left."""
    import collections

    vfs = collections.namedtuple("vfs", "f_bavail f_frsize")
    monkeypatch.setattr(stage_mod.os, "statvfs", lambda path: vfs(10, 4096))  # 40 kB free
    with pytest.raises(DataError, match=r"needs 0\.\d+ GB \(raw, 8, 16 px\) but .* has 0\.00 GB free"):
        prepare("synthetic", None, "8,16", str(tmp_path / "s.h5"), synthetic=TINY, **QUIET)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise RuntimeError(
            "Can't write data (file write failed: time = Fri Dec  4, filename = 'x', file descriptor = 5, "
            "errno = 28, error message = 'No space left on device', buf = 0x1, total write size = 4096)"
        )

    monkeypatch.setattr(stage_mod, "_write", full)
    with pytest.raises(DataError, match=r"s\.h5' failed: No space left on device \(a full disk\?\)$"):
        prepare("synthetic", None, "8", str(tmp_path / "s.h5"), synthetic=TINY, **QUIET)
    assert os.listdir(tmp_path) == []


def test_two_prepares_of_one_file_run_one_after_the_other(tmp_path):
    """Both report what is true: the second waits for the first, then finds the file up to date."""
    import threading

    out, results, logs = str(tmp_path / "s.h5"), [], []

    def one() -> None:
        results.append(prepare("synthetic", None, "8,16", out, synthetic=TINY, log=logs.append))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False, True]  # one staged it, the other found it done
    assert any("up to date" in m for m in logs)
    assert open_staged(out).resolutions == [8, 16] and os.listdir(tmp_path) == ["s.h5"]


def test_resize_blocks_stay_bounded_at_large_resolutions(monkeypatch):
    """In-memory sources are resized in blocks whose float32 copy stays near BLOCK_BYTES (was:
    4,096 images per block at any size: ~410 GB at 5,000 px)."""
    seen = []
    monkeypatch.setattr(sources_mod, "resize_square", lambda chunk, r: seen.append(len(chunk)) or chunk)
    split = sources_mod.array_split(np.zeros((100, 1, 8, 8), np.uint8), np.zeros(100, np.int64))
    list(split.blocks([2048]))
    assert seen and max(seen) * 4 * 2048**2 <= sources_mod.BLOCK_BYTES and sum(seen) == 100
