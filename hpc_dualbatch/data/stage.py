"""Staging: `prepare` writes a data source into one resolution-staged HDF5 file (`hpc-dualbatch prepare`).

The file layout is in `data/layout.py`; `data/staged.py` opens and reads the files.

A file is written under a temporary name in the same folder and renamed at the end, so an
interrupted prepare never leaves a half file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict

import h5py
import numpy as np

from hpc_dualbatch.atomic import check_writable_target
from hpc_dualbatch.config import MAX_PX
from hpc_dualbatch.data.fashion_mnist import FASHION_MNIST_DIR
from hpc_dualbatch.data.layout import COMPRESSIONS, ENCODINGS, FORMAT_VERSION, SPLITS, validate
from hpc_dualbatch.data.source import Source
from hpc_dualbatch.data.sources import SOURCES, read_source
from hpc_dualbatch.data.synthetic import SyntheticSpec
from hpc_dualbatch.errors import DataError
from hpc_dualbatch.yaml_safe import show

CHUNK_BYTES = 1 << 18  # 256 KiB of images per HDF5 chunk: a random batch read decompresses little extra


def parse_resolutions(text: str | Sequence[int]) -> list[int]:
    """'20,24,28' -> [20, 24, 28]: distinct positive ints, sorted low -> high."""
    try:
        values = [int(v) for v in text.split(",")] if isinstance(text, str) else [int(v) for v in text]
    except ValueError:
        raise DataError(
            f"--resolutions '{text}' must be comma-separated integers in px, e.g. 20,24,28"
        ) from None
    if not values or min(values) < 1 or max(values) > MAX_PX or len(set(values)) != len(values):
        raise DataError(
            f"--resolutions {show(values)} must be distinct integers in 1..{MAX_PX} px, e.g. 20,24,28"
        )
    return sorted(values)


def _encode_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (C, r, r) -> the JPEG file's bytes as uint8 (a vlen HDF5 element)."""
    from PIL import Image

    pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): at 16-32 px, halving the colour resolution costs visible detail
    pil.save(buf, format="JPEG", quality=quality, subsampling=0)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _create_images(group: h5py.Group, r: int, n: int, channels: int, encoding: str, compression: str):
    if encoding == "jpeg":
        # Encoded bytes are already compressed: HDF5 compression would only cost time.
        return group.create_dataset(
            str(r), (n,), dtype=h5py.vlen_dtype(np.uint8), chunks=(max(1, min(n, 1024)),)
        )
    per_chunk = max(1, min(n, CHUNK_BYTES // (channels * r * r)))
    return group.create_dataset(
        str(r),
        (n, channels, r, r),
        dtype=np.uint8,
        chunks=(per_chunk, channels, r, r),
        compression=None if compression == "none" else compression,
    )


def _write(
    tmp: str,
    source: Source,
    resolutions: list[int],
    encoding: str,
    compression: str,
    jpeg_quality: int,
    request: dict,
    log: Callable[[str], None],
) -> None:
    top = resolutions[-1]
    with h5py.File(tmp, "w") as f:
        s1 = np.zeros(source.channels)  # per-channel sums of pixels / 255 and their squares, float64
        s2 = np.zeros(source.channels)
        count = 0
        for split in SPLITS:
            data = source.splits[split]
            n = len(data.labels)
            g = f.create_group(split)
            g.create_dataset("labels", data=data.labels.astype(np.int64))  # uncompressed: size is checkable
            ims = g.create_group("images")
            dsets = {
                r: _create_images(ims, r, n, source.channels, encoding, compression) for r in resolutions
            }
            encoded_bytes = dict.fromkeys(resolutions, 0)
            start = 0
            for block in data.blocks(resolutions):
                end = start + len(block[top])
                for r, arr in block.items():
                    if encoding == "raw":
                        dsets[r][start:end] = arr
                    else:
                        encoded = np.empty(len(arr), dtype=object)
                        for i, img in enumerate(arr):
                            encoded[i] = _encode_jpeg(img, jpeg_quality)
                        dsets[r][start:end] = encoded
                        encoded_bytes[r] += sum(len(b) for b in encoded)
                if split == "train":
                    x = block[top].astype(np.float64) / 255.0
                    s1 += x.sum(axis=(0, 2, 3))
                    s2 += (x * x).sum(axis=(0, 2, 3))
                    count += x.shape[0] * x.shape[2] * x.shape[3]
                start = end
            if encoding == "jpeg":
                for r in resolutions:
                    dsets[r].attrs["encoded_bytes"] = encoded_bytes[r]  # vlen storage size omits the heap
            if start != n:
                raise DataError(f"source {source.kind}: {split} produced {start} images for {n} labels")
            log(f"  {split}: {n} samples at {', '.join(map(str, resolutions))} px")
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
        f.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "source": source.kind,
                "classes": np.array(source.classes, dtype=h5py.string_dtype()),
                "num_classes": len(source.classes),
                "channels": source.channels,
                "resolutions": np.array(resolutions, dtype=np.int64),
                "encoding": encoding,
                "compression": compression,
                "original_size": source.original_size,
                "mean": mean,
                "std": np.maximum(std, 1e-6),  # a constant channel would divide by zero when normalising
                "request": json.dumps(request, sort_keys=True),
            }
        )


def prepare(
    source: str,
    input_path: str | None,
    resolutions: str | Sequence[int],
    out: str,
    *,
    encoding: str = "raw",
    compression: str = "none",
    force: bool = False,
    workers: int = 1,
    jpeg_quality: int = 90,
    synthetic: SyntheticSpec | None = None,
    log: Callable[[str], None] = print,
) -> bool:
    """Stage `source` into `out`; returns False when `out` already holds this exact request (no-op)."""
    if source not in SOURCES:
        raise DataError(f"unknown source '{source}'; valid: {', '.join(SOURCES)}")
    if encoding not in ENCODINGS:
        raise DataError(f"--encoding '{encoding}' is not one of {', '.join(ENCODINGS)}")
    if compression not in COMPRESSIONS:
        raise DataError(f"--compression '{compression}' is not one of {', '.join(COMPRESSIONS)}")
    if not 1 <= jpeg_quality <= 95:
        raise DataError(f"--jpeg-quality {jpeg_quality} must be in 1..95 (PIL's useful range)")
    res = parse_resolutions(resolutions)
    synthetic = synthetic or SyntheticSpec()
    # Everything that changes the file's bytes; `workers` and `force` do not.
    request = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "input": None if source == "synthetic" else _input_path(source, input_path),
        "resolutions": res,
        "encoding": encoding,
        "compression": compression,
        "jpeg_quality": jpeg_quality if encoding == "jpeg" else None,
        "synthetic": asdict(synthetic) if source == "synthetic" else None,
    }
    check_writable_target(out, "prepare --out", DataError)
    with _exclusive(out, log):  # a second prepare to the same folder waits, then finds its file done
        if os.path.exists(out) and not force and _stored_request(out) == request:
            log(f"{out} is up to date (same request; --force re-stages)")
            return False
        src = read_source(source, request["input"], synthetic=synthetic, workers=workers)
        folder = os.path.dirname(os.path.abspath(out))  # (_exclusive made it)
        if encoding == "raw" and compression == "none":  # its size is known: check it fits first
            need = sum(len(sp.labels) for sp in src.splits.values()) * src.channels * sum(r * r for r in res)
            vfs = os.statvfs(folder)
            free = vfs.f_bavail * vfs.f_frsize
            if need > free:
                raise DataError(
                    f"staging {out} needs {need / 1e9:.2f} GB (raw, {', '.join(map(str, res))} px) but "
                    f"{folder} has {free / 1e9:.2f} GB free; free space, stage fewer or smaller resolutions, "
                    "or use --encoding jpeg"
                )
        tmp = os.path.join(folder, f".{os.path.basename(out)}.tmp-{os.getpid()}")
        log(f"staging {source} -> {out} ({encoding}, compression {compression})")
        try:
            _write(tmp, src, res, encoding, compression, jpeg_quality, request, log)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, out)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError):  # disk full, no permission, a folder named like the file
                raise DataError(f"writing staged data file '{out}' failed: {e}") from None
            if isinstance(e, RuntimeError) and "write failed" in str(e):  # h5py's form of the same
                m = re.search(r"error message = '([^']*)'", str(e))
                cause = m.group(1) if m else str(e)
                raise DataError(f"writing staged data file '{out}' failed: {cause} (a full disk?)") from None
            raise
        return True


@contextlib.contextmanager
def _exclusive(out: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of the folder of staged file `out` (flock on the folder itself, so nothing
    is left behind): two prepares into one folder run one after the other, so neither reports a
    file the other replaced; the second then finds the first's file up to date."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another prepare writing into {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock (so does the process's death)


def _input_path(source: str, input_path: str | None) -> str | None:
    if not input_path:
        return FASHION_MNIST_DIR if source == "fashion-mnist" else None
    return os.path.abspath(input_path)


def _stored_request(path: str) -> dict | None:
    """The request a valid staged file was made from; None when the file is not a valid staged file."""
    try:
        with h5py.File(path, "r") as f:
            validate(f, path)
            return json.loads(f.attrs["request"])
    except (DataError, OSError, KeyError, ValueError, TypeError):
        return None
