"""The layout of a resolution-staged HDF5 data file, and the check that a file follows it.

Layout (format_version 1; docs/data.md describes it in full):
  /<split>/labels          int64 (N,), split in {train, test}
  /<split>/images/<r>      uint8 (N, C, r, r) when encoding=raw, or vlen uint8 (N,) of JPEG bytes
  root attributes          format_version, source, classes, num_classes, channels, resolutions,
                           encoding, compression, original_size, mean, std, request (JSON)
`mean`/`std` are per channel, of the train split at the highest resolution, in [0, 1] units.

`data/stage.py` writes such files; `validate` checks everything a reader will later trust
(version, attributes, shapes, dtypes, label range, stored bytes) before any use, so a crafted or
truncated file gives a `DataError`, not an h5py traceback.
"""

from __future__ import annotations

import h5py
import numpy as np

from hpc_dualbatch.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
ENCODINGS = ("raw", "jpeg")
COMPRESSIONS = ("none", "gzip", "lzf")
MAX_DEFLATE_RATIO = 1100  # deflate cannot shrink data more than ~1032:1, so more declared bytes = crafted


def staged_error(path: str, problem: str) -> DataError:
    """The error for staged data file `path` that breaks the layout: `problem`, and how to fix it."""
    return DataError(
        f"staged data file '{path}': {problem}; re-create it with `hpc-dualbatch prepare --force`"
    )


def _attr(f: h5py.File, path: str, name: str):
    if name not in f.attrs:
        raise staged_error(path, f"attribute '{name}' is missing")
    return f.attrs[name]


def _plain(value: object) -> object:
    """numpy values as Python ones, so messages read `2`, not `np.int64(2)`."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _int_attr(f: h5py.File, path: str, name: str, low: int) -> int:
    value = _attr(f, path, name)
    if not isinstance(value, (int, np.integer)) or value < low:
        raise staged_error(path, f"attribute '{name}' is {_plain(value)!r}; expected an integer >= {low}")
    return int(value)


def _check_storage(ds: h5py.Dataset, path: str, declared: int) -> None:
    """Refuse a dataset whose stored bytes cannot hold what its shape declares (truncated or crafted).

    Reading such a dataset would allocate `declared` bytes filled with zeros instead of failing.
    """
    stored = ds.id.get_storage_size()
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    if stored < (declared / MAX_DEFLATE_RATIO if filtered else declared):
        raise staged_error(path, f"dataset '{ds.name}' declares {declared} bytes but stores only {stored}")


def validate(f: h5py.File, path: str) -> dict:
    """Check everything the loader relies on; return the header and labels per split."""
    if "format_version" not in f.attrs:
        raise DataError(
            f"'{path}' is an HDF5 file without a 'format_version' attribute: not written by "
            f"`hpc-dualbatch prepare` (expected format_version {FORMAT_VERSION})"
        )
    version = f.attrs["format_version"]
    if not isinstance(version, (int, np.integer)) or version != FORMAT_VERSION:
        raise DataError(
            f"staged data file '{path}' has format_version {_plain(version)!r}; this version of "
            f"hpc_dualbatch reads format_version {FORMAT_VERSION}; "
            "re-create it with `hpc-dualbatch prepare --force`"
        )
    num_classes = _int_attr(f, path, "num_classes", 1)
    channels = _int_attr(f, path, "channels", 1)
    classes = [
        c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(_attr(f, path, "classes"))
    ]
    if len(classes) != num_classes:
        raise staged_error(path, f"{len(classes)} class names for num_classes {num_classes}")
    resolutions = np.atleast_1d(_attr(f, path, "resolutions"))
    if (
        resolutions.dtype.kind not in "iu"
        or len(resolutions) == 0
        or (np.diff(resolutions) <= 0).any()
        or (resolutions.min() < 1)
    ):
        raise staged_error(
            path, f"attribute 'resolutions' is {_plain(resolutions)}; expected rising positive integers"
        )
    encoding = _attr(f, path, "encoding")
    if encoding not in ENCODINGS:
        raise staged_error(
            path, f"attribute 'encoding' is {_plain(encoding)!r}; expected one of {', '.join(ENCODINGS)}"
        )
    stats = {}
    for name in ("mean", "std"):
        v = np.atleast_1d(_attr(f, path, name))
        if v.shape != (channels,) or v.dtype.kind != "f" or not np.isfinite(v).all() or (v < 0).any():
            raise staged_error(
                path, f"attribute '{name}' is {_plain(v)}; expected {channels} finite non-negative floats"
            )
        stats[name] = v.astype(np.float64)
    if (stats["std"] == 0).any():
        raise staged_error(path, "attribute 'std' has a zero entry")
    labels, counts = {}, {}
    for split in SPLITS:
        lname = f"{split}/labels"
        ds = f.get(lname)
        if (
            not isinstance(ds, h5py.Dataset)
            or ds.ndim != 1
            or ds.dtype.kind not in "iu"
            or ds.dtype.itemsize > 8
        ):
            raise staged_error(path, f"'{lname}' is missing or not a 1-D integer dataset")
        n = ds.shape[0]
        _check_storage(ds, path, n * ds.dtype.itemsize)
        lab = ds[()].astype(np.int64)
        if n and (lab.min() < 0 or lab.max() >= num_classes):
            bad = int(lab[(lab < 0) | (lab >= num_classes)][0])
            raise staged_error(path, f"'{lname}' holds label {bad}; valid labels are 0..{num_classes - 1}")
        for r in resolutions.tolist():
            iname = f"{split}/images/{r}"
            im = f.get(iname)
            if not isinstance(im, h5py.Dataset):
                raise staged_error(
                    path, f"dataset '{iname}' is missing (attribute 'resolutions' lists {r} px)"
                )
            if encoding == "raw":
                if im.dtype != np.uint8 or im.shape != (n, channels, r, r):
                    raise staged_error(
                        path, f"'{iname}' is {im.dtype} {im.shape}; expected uint8 {(n, channels, r, r)}"
                    )
                _check_storage(im, path, n * channels * r * r)
            elif h5py.check_vlen_dtype(im.dtype) != np.uint8 or im.shape != (n,):
                raise staged_error(
                    path, f"'{iname}' is {im.dtype} {im.shape}; expected ({n},) of variable-length uint8"
                )
            elif (
                not isinstance(im.attrs.get("encoded_bytes"), (int, np.integer))
                or im.attrs["encoded_bytes"] < 0
            ):
                raise staged_error(path, f"'{iname}' lacks a non-negative integer attribute 'encoded_bytes'")
        lab.setflags(write=False)
        labels[split], counts[split] = lab, n
    if counts["train"] == 0:
        raise staged_error(path, "the train split is empty")
    return {
        "classes": classes,
        "num_classes": num_classes,
        "channels": channels,
        "resolutions": resolutions.tolist(),
        "encoding": str(encoding),
        "source": str(_attr(f, path, "source")),
        "mean": stats["mean"],
        "std": stats["std"],
        "labels": labels,
    }
