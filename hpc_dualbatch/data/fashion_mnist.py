"""The Fashion-MNIST reader: the four IDX files (gzip or plain) of the official release.

Images are 28 x 28 px, one channel; `read_fashion_mnist` returns them as a `Source`
(`data/source.py`) held in memory.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.data.source import Source, array_split, check_labels
from hpc_dualbatch.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """IDX: big-endian magic (0x0000 0803 for 3-D uint8, 0x0000 0801 for 1-D), the dims, then the bytes."""
    check_regular(path, "Fashion-MNIST file", DataError, "give the folder of the official *-ubyte.gz files")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file '{path}' does not exist") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"Fashion-MNIST file '{path}' is not a readable gzip file: {e}") from None
    head = 4 + 4 * ndim
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != magic:
        found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise DataError(
            f"Fashion-MNIST file '{path}' is not an IDX file of {ndim} dimension(s): "
            f"magic number {found!r}, expected {magic:#010x}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != int(np.prod(dims)):
        raise DataError(
            f"Fashion-MNIST file '{path}' declares shape {dims} ({int(np.prod(dims))} bytes) "
            f"but holds {len(raw) - head} bytes after the header (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _idx_path(folder: str, name: str) -> str:
    for candidate in (f"{name}.gz", name):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    return os.path.join(folder, f"{name}.gz")


def read_fashion_mnist(folder: str | None) -> Source:
    folder = folder or FASHION_MNIST_DIR
    if not os.path.isdir(folder):
        raise DataError(
            f"Fashion-MNIST folder '{folder}' does not exist; it must hold {{train,t10k}}-"
            f"{{images-idx3,labels-idx1}}-ubyte.gz (Debian: apt-get install dataset-fashion-mnist)"
        )
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_idx_path(folder, f"{prefix}-images-idx3-ubyte"), 0x803, 3)
        labels_path = _idx_path(folder, f"{prefix}-labels-idx1-ubyte")
        labels = _read_idx(labels_path, 0x801, 1)
        if len(labels) != len(images) or images.shape[1:] != (28, 28):
            raise DataError(
                f"Fashion-MNIST folder '{folder}': {split} has {len(images)} images of "
                f"{images.shape[1:]} px and {len(labels)} labels; expected equal counts of 28x28 images"
            )
        check_labels(labels, len(FASHION_MNIST_CLASSES), labels_path)
        splits[split] = array_split(images[:, None], labels)  # add the channel axis: (N, 1, 28, 28)
    return Source("fashion-mnist", list(FASHION_MNIST_CLASSES), 1, 28, splits)
