"""The CIFAR-10 / CIFAR-100 reader: the official python-version tar.gz archives.

Images are 32 x 32 px, three channels; CIFAR-100 is read with its 100 fine labels.
`read_cifar` returns them as a `Source` (`data/source.py`) held in memory.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib

import numpy as np

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.data.source import Source, array_split, check_labels
from hpc_dualbatch.errors import DataError

# The archives hold pickles; a pickle can name any Python callable, so only the few that numpy
# arrays and bytes need are allowed (old archives spell numpy._core as numpy.core; protocol-2
# pickles written by Python 3 rebuild bytes with _codecs.encode).
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}' (only numpy arrays are expected)"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _member_limit(name: str) -> int:
    """Largest plausible size in bytes of a CIFAR archive member: 3072 bytes per image, plus
    its labels and file name, plus 1 MiB (the official data_batch_1 is 31,035,704 bytes)."""
    images = {"train": 50_000, "test": 10_000, "test_batch": 10_000}.get(name, 0)
    if name.startswith("data_batch_"):
        images = 10_000
    return images * (3072 + 256) + (1 << 20)


def _load_member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, archive: str) -> dict:
    if name not in members:
        raise DataError(
            f"CIFAR archive '{archive}' has no member '{name}'; it holds {sorted(members)[:12]}; "
            f"expected the official python-version archive"
        )
    try:
        f = tar.extractfile(members[name])
        obj = _CifarUnpickler(f, encoding="bytes").load() if f else None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        OSError,
        zlib.error,
    ) as e:
        raise DataError(
            f"CIFAR archive '{archive}': member '{name}' is not a valid CIFAR pickle: {e}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR archive '{archive}': member '{name}' is not a dict of arrays")
    return obj


def _cifar_batch(obj: dict, label_key: bytes, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or label_key not in obj:
        raise DataError(f"{where}: keys {sorted(obj)[:8]} lack b'data' or {label_key!r}")
    data, labels = np.asarray(obj[b"data"]), np.asarray(obj[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: {len(labels)} labels of type {labels.dtype} for {len(data)} images")
    check_labels(labels, num_classes, where)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)  # rows are R plane, G, B; row-major


def read_cifar(path: str | None, kind: str) -> Source:
    is10 = kind == "cifar10"
    expected = "cifar-10-python.tar.gz" if is10 else "cifar-100-python.tar.gz"
    if not path:
        raise DataError(f"--input is required for {kind}: the path of the official '{expected}'")
    check_regular(path, "CIFAR archive", DataError, f"give the official '{expected}'")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"CIFAR archive '{path}' is not a readable tar.gz ({e}); expected '{expected}'"
        ) from None
    with tar:
        members: dict[str, tarfile.TarInfo] = {}
        try:
            for m in tar:  # headers one by one: a member's size is checked before its bytes are read
                if not m.isfile():
                    continue
                name, limit = os.path.basename(m.name), _member_limit(os.path.basename(m.name))
                if m.size > limit:
                    raise DataError(
                        f"CIFAR archive '{path}': member '{m.name}' is {m.size} bytes; a member of the "
                        f"official archive is at most {limit} bytes ({expected} holds 10,000 images "
                        f"per batch): not the official archive, or a crafted one"
                    )
                members[name] = m
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"CIFAR archive '{path}' is corrupt: {e}") from None
        meta_name, names_key, label_key = (
            ("batches.meta", b"label_names", b"labels")
            if is10
            else ("meta", b"fine_label_names", b"fine_labels")
        )
        meta = _load_member(tar, members, meta_name, path)
        if names_key not in meta:
            raise DataError(f"CIFAR archive '{path}': '{meta_name}' has no {names_key!r}")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
        train_names = [f"data_batch_{i}" for i in range(1, 6)] if is10 else ["train"]
        splits = {}
        for split, names in (("train", train_names), ("test", ["test_batch" if is10 else "test"])):
            parts = [
                _cifar_batch(
                    _load_member(tar, members, n, path), label_key, len(classes), f"'{path}' member '{n}'"
                )
                for n in names
            ]
            images = np.concatenate([p[0] for p in parts])
            splits[split] = array_split(images, np.concatenate([p[1] for p in parts]))
    return Source(kind, classes, 3, 32, splits)
