"""Reading a resolution-staged HDF5 file: `open_staged` validates it and hands out a `StagedData`.

The layout and the check run before any use are in `data/layout.py`; `data/stage.py` writes
the files. Each process opens a file version once and keeps it open read-only; `StagedData`
notices when the file on disk changes under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence

import h5py
import numpy as np

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.data.layout import SPLITS, staged_error, validate
from hpc_dualbatch.errors import DataError

FINGERPRINT_SAMPLES = 16  # images per split and resolution hashed into the content fingerprint
CHUNK_CACHE_BYTES = 16 << 20  # per open dataset; holds the chunks a streamed batch touches twice


class StagedData:
    """A validated, read-only staged data file. Get one with `open_staged` (one HDF5 handle per process)."""

    def __init__(self, path: str, handle: h5py.File, header: dict, signature: tuple) -> None:
        self.path = path
        self.signature = signature  # (inode, size, mtime_ns): identifies this version of the file
        self.classes: list[str] = header["classes"]
        self.num_classes: int = header["num_classes"]
        self.channels: int = header["channels"]
        self.resolutions: list[int] = header["resolutions"]
        self.mean: np.ndarray = header["mean"]  # per channel, [0, 1] units
        self.std: np.ndarray = header["std"]
        self.encoding: str = header["encoding"]
        self.source: str = header["source"]
        self._labels: dict[str, np.ndarray] = header["labels"]
        self._handle = handle
        self._fingerprint: dict | None = None

    def check_unchanged(self) -> None:
        """Refuse to go on when the file on disk is no longer the version this handle opened.

        An HDF5 file truncated or rewritten under an open handle reads as zeros past its new end
        (no error): training would go on, on wrong data. The loaders call this at every open
        and after every streamed read.
        """
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise DataError(
                f"staged data file '{self.path}' disappeared while the run was using it ({e.strerror}); "
                f"a run needs its data file in place and unchanged until it ends: restore it, then "
                f"continue with --resume"
            ) from None
        now = (st.st_ino, st.st_size, st.st_mtime_ns)
        if now != self.signature:
            what = (
                f"size {self.signature[1]} -> {st.st_size} bytes"
                if st.st_size != self.signature[1]
                else ("replaced by another file" if st.st_ino != self.signature[0] else "modified in place")
            )
            raise DataError(
                f"staged data file '{self.path}' changed while the run was using it ({what}); a run "
                f"needs its data file unchanged until it ends: restore the file the run started with "
                f"and continue with --resume (a checkpoint refuses other data), or start a new run"
            )

    def check_trainable(self) -> None:
        """A run needs test samples to evaluate on and at least two classes to learn."""
        if self.num_samples("test") == 0:
            raise DataError(
                f"staged data file '{self.path}' has 0 test samples; a run evaluates on the test split "
                f"every epoch: re-stage it with a non-empty test (val/) split"
            )
        present = np.unique(self._labels["train"])
        if self.num_classes < 2 or len(present) < 2:
            only = self.classes[int(present[0])] if len(present) else "none"
            raise DataError(
                f"staged data file '{self.path}' holds {self.num_classes} class(es), and its train split "
                f"only class {only!r}; a classifier needs at least 2 classes: re-stage it with more"
            )

    def fingerprint(self) -> dict:
        """What the file holds, independent of its path, name and compression: counts, classes,
        resolutions, pixel statistics, a hash of all labels and of sampled images ("digest" covers
        all of it). A checkpoint keeps it, so a resume refuses data whose content changed."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            fp: dict = {
                "source": self.source,
                "classes": self.num_classes,
                "channels": self.channels,
                "resolutions": list(self.resolutions),
                "encoding": self.encoding,
                "train_samples": self.num_samples("train"),
                "test_samples": self.num_samples("test"),
                "mean": [round(float(v), 9) for v in self.mean],
                "std": [round(float(v), 9) for v in self.std],
            }
            for split in SPLITS:
                lab = np.ascontiguousarray(self._labels[split], dtype="<i8")
                fp[f"{split}_labels_sha256"] = hashlib.sha256(lab.tobytes()).hexdigest()[:16]
            h.update(json.dumps(fp, sort_keys=True).encode())
            h.update("\0".join(self.classes).encode())
            try:
                for split in SPLITS:
                    n = self.num_samples(split)
                    idx = np.unique(np.linspace(0, n - 1, FINGERPRINT_SAMPLES).astype(np.int64)) if n else []
                    for r in self.resolutions:
                        for i in idx:
                            h.update(np.asarray(self._handle[f"{split}/images/{r}"][int(i)]).tobytes())
            except (OSError, KeyError, ValueError) as e:
                raise staged_error(self.path, f"reading images failed ({type(e).__name__}: {e})") from None
            fp["digest"] = h.hexdigest()[:32]
            self._fingerprint = fp
        return dict(self._fingerprint)

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise DataError(
                f"split '{split}' is not in staged data file '{self.path}'; valid: {', '.join(SPLITS)}"
            )
        return split

    def num_samples(self, split: str) -> int:
        return len(self._labels[self._split(split)])

    def labels(self, split: str) -> np.ndarray:
        """int64 (N,), read-only."""
        return self._labels[self._split(split)]

    def check_resolutions(self, resolutions: Sequence[int]) -> None:
        missing = [r for r in resolutions if r not in self.resolutions]
        if missing:
            raise DataError(
                f"resolution {missing[0]} px is not staged in '{self.path}'; staged: {self.resolutions}; "
                f"re-run `hpc-dualbatch prepare` with --resolutions including {missing[0]}"
            )

    def images(self, split: str, resolution: int) -> h5py.Dataset:
        """The HDF5 dataset of one split at one resolution (for the loader; h5py serialises reads)."""
        self.check_resolutions([resolution])
        return self._handle[f"{self._split(split)}/images/{resolution}"]

    def stored_bytes(self, split: str, resolution: int) -> int:
        """Bytes the file spends on this split's images at this resolution (after compression/encoding)."""
        ds = self.images(split, resolution)
        if self.encoding == "raw":
            return int(ds.id.get_storage_size())
        return int(ds.attrs["encoded_bytes"])  # checked by layout.validate


_OPEN: dict[str, StagedData] = {}
_OPEN_LOCK = threading.Lock()


def open_staged(path: str) -> StagedData:
    """Open and validate a staged file read-only; the same file version is opened once per process."""
    check_regular(
        path,
        "staged data file",
        DataError,
        f"create it with `hpc-dualbatch prepare --source ... --resolutions ... --out {path}`",
    )
    st = os.stat(path)
    signature = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = os.path.abspath(path)
    with _OPEN_LOCK:
        cached = _OPEN.get(key)
        if cached is not None and cached.signature == signature:
            return cached
        try:
            handle = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError as e:
            raise DataError(
                f"staged data file '{path}' is not a readable HDF5 file (truncated or corrupt?): {e}; "
                f"re-create it with `hpc-dualbatch prepare --force`"
            ) from None
        try:
            header = validate(handle, path)
        except DataError:
            handle.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            handle.close()
            raise staged_error(path, f"reading it failed ({type(e).__name__}: {e})") from None
        staged = StagedData(path, handle, header, signature)
        _OPEN[key] = staged  # a re-staged file (new signature) is opened anew; holders of the old keep it
        return staged
