"""The data sources `hpc-dualbatch prepare` can stage, by name, and `read_source`, which reads one.

One module per family holds its reader: `fashion_mnist.py`, `cifar.py` (CIFAR-10 and -100),
`imagefolder.py`, `synthetic.py`. Each returns a `Source` (`data/source.py`, which says what a
reader promises); every bad input is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

from hpc_dualbatch.data.cifar import read_cifar
from hpc_dualbatch.data.fashion_mnist import read_fashion_mnist
from hpc_dualbatch.data.imagefolder import read_imagefolder
from hpc_dualbatch.data.source import Source
from hpc_dualbatch.data.synthetic import SyntheticSpec, read_synthetic
from hpc_dualbatch.errors import DataError

SOURCES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


def read_source(kind: str, path: str | None, *, synthetic: SyntheticSpec, workers: int = 1) -> Source:
    """Dispatch on the source kind; `path` is the input file or folder (unused for synthetic)."""
    if kind == "fashion-mnist":
        return read_fashion_mnist(path)
    if kind in ("cifar10", "cifar100"):
        return read_cifar(path, kind)
    if kind == "imagefolder":
        return read_imagefolder(path, workers)
    if kind == "synthetic":
        return read_synthetic(synthetic)
    raise DataError(f"unknown source '{kind}'; valid: {', '.join(SOURCES)}")
