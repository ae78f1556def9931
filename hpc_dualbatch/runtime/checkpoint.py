"""Checkpoints: everything needed to continue a run exactly, written atomically.

One `.npz` file per checkpoint under `<out>/checkpoints/`, loaded with
`allow_pickle=False` (plain arrays and one JSON string: no code runs on load):

    weights    float32[n_weights]           the global weights
    momentum_<g> float32[n_params]          group g's SGD momentum (it lives on the group), one
               entry per group, written as it arrives at the barrier and read one group at a
               time on resume (`Momenta`): the server never holds n_groups x n_params floats.
               A group without an entry (left out; a finished run's final checkpoint) restarts
               from zero. Format 1 held them as one (n_groups, n_params) array `momentum`.
    group_buffers float32[n_groups, n_buffers]  each group's own BN buffers (server.bn: local);
               absent in sync runs
    outer      float32[2, n_params]         the server's outer momentum and its round's sum
               (server.outer; absent without)
    average    float32[n_params]            the mean of the parameters over the last rate stage
               so far (schedule.average; its count in meta's extra, `average_count`; absent
               without). A finished run's final checkpoint holds the mean as its weights.
    meta       JSON: format, commits, rounds per group, elapsed seconds, metrics byte offset,
               the resolved config, the groups and parameters of the momentum entries, and the
               fingerprint of the staged data's content (`data`)

Every random choice of a run derives from (seed, group, round, rank) counters,
so the counters in `meta` replace RNG states. Written to a temporary name,
flushed, fsynced and renamed: a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import numpy as np

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.errors import CheckpointError

FORMAT = 2  # (1: every group's momentum in one array; still read)
READS = (1, 2)
PREFIX = "ckpt-"
# The staged data's fingerprint is kept with every checkpoint a process writes once the run's
# data is bound (`bind_data`, called by `train` on the rank that writes checkpoints).
_DATA: dict[str, Any] | None = None


def bind_data(fingerprint: dict[str, Any] | None) -> None:
    """Record the fingerprint of the run's staged data in every later checkpoint of this process."""
    global _DATA
    _DATA = fingerprint


class Momenta:
    """Each group's SGD momentum in a checkpoint, one group at a time: `get(g)` reads group g's
    (zeros where the checkpoint has none) from wherever it is kept (the file, or arrays; no
    `read`: the entries of a checkpoint being written, which are not read back)."""

    def __init__(
        self, n_groups: int, n_params: int, saved: list[int], read: Callable[[int], np.ndarray] | None = None
    ) -> None:
        self.n_groups, self.n_params, self.saved, self._read = n_groups, n_params, sorted(saved), read

    @classmethod
    def of(cls, arrays: list[Optional[np.ndarray]], n_params: int) -> Momenta:
        """In memory: arrays[g] is group g's momentum, or None (none saved)."""
        saved = [g for g, a in enumerate(arrays) if a is not None]
        return cls(len(arrays), n_params, saved, lambda g: arrays[g])  # type: ignore[return-value]

    def get(self, g: int) -> np.ndarray:
        if g not in self.saved:
            return np.zeros(self.n_params, np.float32)
        if self._read is None:
            raise RuntimeError("the momentum of a checkpoint being written is not read back")
        return self._read(g)


@dataclass
class Checkpoint:
    weights: np.ndarray
    momentum: Momenta
    commits: int
    rounds: list[int]
    elapsed: float  # wall seconds of training before this checkpoint
    metrics_offset: int  # bytes of metrics.jsonl that belong to the work up to here
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # fingerprint of the staged data (None: older checkpoint)
    group_buffers: np.ndarray | None = None  # (n_groups, n_buffers)
    outer: np.ndarray | None = None  # (2, n_params)
    # server.shards > 1: {"count": S, "slices": [[lo, hi], ...]}; this file (the manifest) holds
    # shard 0's slice, `<file>.shard<s>` shard s's (`load_part`)
    shards: dict[str, Any] | None = None
    final_buffers: np.ndarray | None = None  # a sharded final checkpoint: the BN buffers evaluated
    average: np.ndarray | None = None  # (n_params,) schedule.average's mean so far


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


class Writer:
    """One checkpoint written in parts, at a temporary name until `finish` renames it: each
    group's momentum as it arrives (`add_momentum`, one n_params buffer at a time), then the rest.
    An OSError at any part leaves the previous checkpoint as it was (CheckpointError)."""

    def __init__(self, out: str, commits: int, shard: int = 0) -> None:
        self.dir = checkpoint_dir(out)
        self.path = os.path.join(self.dir, f"{PREFIX}{commits:09d}.npz")
        if shard:  # server shard s >= 1: its part beside the manifest shard 0 writes last
            self.path += f".shard{shard}"
        self.tmp = self.path + f".tmp{os.getpid()}"
        self.groups: list[int] = []
        self.n_params = 0
        self._file: IO[bytes] | None = None
        self._zip: zipfile.ZipFile | None = None
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._file = open(self.tmp, "xb")  # exclusive: never through a planted link
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        except OSError as e:
            self._fail(e)

    def _add(self, name: str, a: np.ndarray) -> None:
        assert self._zip is not None
        try:  # the layout np.savez writes: one stored NPY entry per array
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
        except OSError as e:
            self._fail(e)

    def add_momentum(self, g: int, momentum: np.ndarray) -> None:
        self._add(f"momentum_{g}", momentum)
        self.groups.append(g)
        self.n_params = momentum.size

    def finish(self, ck: Checkpoint, keep: int) -> str:
        """Add the weights and the rest of `ck` (its `momentum` only says how many groups and
        parameters), make the file durable, rename it into place, drop all but the newest `keep`."""
        assert self._zip is not None and self._file is not None
        meta = {
            "format": FORMAT,
            "commits": ck.commits,
            "rounds": ck.rounds,
            "elapsed": ck.elapsed,
            "metrics_offset": ck.metrics_offset,
            "config": ck.config,
            "extra": ck.extra,
            "data": ck.data if ck.data is not None else _DATA,
            "momentum": {
                "groups": ck.momentum.n_groups,
                "params": ck.momentum.n_params,
                "saved": [g for g in self.groups if g in ck.momentum.saved],
            },
            **({"shards": ck.shards} if ck.shards else {}),
        }
        if ck.final_buffers is not None:
            self._add("final_buffers", ck.final_buffers)
        self._add("weights", ck.weights)
        self._add("meta", np.array(json.dumps(meta)))
        if ck.group_buffers is not None:
            self._add("group_buffers", ck.group_buffers)
        if ck.outer is not None:
            self._add("outer", ck.outer)
        if ck.average is not None:
            self._add("average", ck.average)
        self._close_and_rename()
        for old in sorted(glob.glob(os.path.join(self.dir, f"{PREFIX}*.npz")))[:-keep]:
            for part in [old, *glob.glob(glob.escape(old) + ".shard*")]:  # (a sharded one's parts)
                os.unlink(part)
        for part in glob.glob(os.path.join(self.dir, f"{PREFIX}*.npz.shard*")):
            manifest = part.rsplit(".shard", 1)[0]  # (an older part whose manifest never came: a crash)
            if manifest < self.path and not os.path.exists(manifest):
                os.unlink(part)
        return self.path

    def finish_part(
        self, weights: np.ndarray, group_buffers: np.ndarray, outer: np.ndarray | None, meta: dict
    ) -> str:
        """Server shard s >= 1: its slice of the weights, of each group's BN buffers and of the
        outer momentum, durable under its name; the manifest (shard 0's, written after every
        part) is what makes the checkpoint."""
        assert self._zip is not None
        self._add("weights", weights)
        self._add("group_buffers", group_buffers)
        if outer is not None:
            self._add("outer", outer)
        self._add("meta", np.array(json.dumps({**meta, "saved": self.groups})))
        self._close_and_rename()
        return self.path

    def _close_and_rename(self) -> None:
        assert self._zip is not None and self._file is not None
        try:
            self._zip.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._fail(e)

    def abort(self) -> None:
        """Drop the unfinished file (the previous checkpoint stays the latest)."""
        for close in (self._zip, self._file):
            try:
                if close is not None:
                    close.close()
            except (OSError, ValueError):
                pass
        self._zip = self._file = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def _fail(self, e: OSError) -> None:
        self.abort()
        raise CheckpointError(
            f"could not write checkpoint {self.path}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None


def save(out: str, ck: Checkpoint, keep: int = 2) -> str:
    """Write a whole checkpoint at once (the momentum entries `ck.momentum` holds)."""
    w = Writer(out, ck.commits)
    for g in ck.momentum.saved:
        w.add_momentum(g, ck.momentum.get(g))
    return w.finish(ck, keep)


def latest(out: str) -> str | None:
    found = sorted(glob.glob(os.path.join(checkpoint_dir(out), f"{PREFIX}*.npz")))
    return found[-1] if found else None


def _corrupt(path: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or partially written ({type(e).__name__}: {e}); "
        f"delete it to resume from the one before"
    )


_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, RecursionError)


def _npy_header(z: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one entry of an open npz file, from its header only."""
    with z.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return shape, dtype


def _momenta(path: str, z: Any, meta: dict[str, Any]) -> Momenta:
    """The momentum entries of an open checkpoint: format 1's one array (read whole), or
    format 2's one entry per group, checked by header now and read when asked for (the file stays
    open, so a later rotation does not take it away)."""
    if meta["format"] == 1:
        m = z["momentum"]
        if m.dtype != np.float32 or m.ndim != 2:
            raise CheckpointError(f"checkpoint {path} holds arrays of unexpected type or shape")
        return Momenta.of(list(m), m.shape[1])
    info = meta["momentum"]
    n, n_params, saved = int(info["groups"]), int(info["params"]), [int(g) for g in info["saved"]]
    for g in saved:
        if not 0 <= g < n or _npy_header(z, f"momentum_{g}") != ((n_params,), np.dtype(np.float32)):
            raise CheckpointError(f"checkpoint {path} holds arrays of unexpected type or shape")

    def read(g: int) -> np.ndarray:
        try:
            return z[f"momentum_{g}"]
        except _READ_ERRORS as e:
            raise _corrupt(path, e) from None

    return Momenta(n, n_params, saved, read)


def load(path: str) -> Checkpoint:
    check_regular(
        path, "checkpoint", CheckpointError, "resume from another checkpoint or start the run again"
    )
    try:
        z = np.load(path, allow_pickle=False)  # NpzFile: entries are read when asked for
        weights, meta = z["weights"], json.loads(str(z["meta"]))
        group_buffers = z["group_buffers"] if "group_buffers" in z.files else None
        outer = z["outer"] if "outer" in z.files else None
        final_buffers = z["final_buffers"] if "final_buffers" in z.files else None
        average = z["average"] if "average" in z.files else None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    if not isinstance(meta, dict) or meta.get("format") not in READS:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"checkpoint {path} has format {found}, this version reads {' and '.join(map(str, READS))}"
        )
    try:
        momentum = _momenta(path, z, meta)
        ck = Checkpoint(
            weights,
            momentum,
            int(meta["commits"]),
            [int(r) for r in meta["rounds"]],
            float(meta["elapsed"]),
            int(meta["metrics_offset"]),
            dict(meta["config"]),
            dict(meta.get("extra", {})),
            dict(meta["data"]) if meta.get("data") is not None else None,
            group_buffers,
            outer,
            dict(meta["shards"]) if meta.get("shards") else None,
            final_buffers,
            average,
        )
    except (KeyError, TypeError, ValueError, AttributeError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint {path} has incomplete metadata ({type(e).__name__}: {e}); it was not written "
            f"by this package, or is damaged: delete it to resume from the one before"
        ) from None
    if (
        weights.dtype != np.float32
        or weights.ndim != 1
        or (group_buffers is not None and (group_buffers.dtype != np.float32 or group_buffers.ndim != 2))
        or (outer is not None and (outer.dtype != np.float32 or outer.shape != (2, momentum.n_params)))
        or (average is not None and (average.dtype != np.float32 or average.shape != (momentum.n_params,)))
    ):
        raise CheckpointError(f"checkpoint {path} holds arrays of unexpected type or shape")
    return ck


@dataclass
class Part:
    """Server shard s's part of a sharded checkpoint (`<manifest>.shard<s>`)."""

    weights: np.ndarray  # its slice of the flat weights
    group_buffers: np.ndarray  # (n_groups, BN buffers in the slice)
    outer: np.ndarray | None  # (2, parameters in the slice)
    momentum: Momenta  # each group's slice


def load_part(manifest: Checkpoint, path: str, shard: int) -> Part:
    """Shard `shard`'s part of the sharded checkpoint whose manifest (`path`, loaded as
    `manifest`) shard 0 wrote after every part: it must hold the same commit and the slice the
    manifest names."""
    part = f"{path}.shard{shard}"
    check_regular(part, "checkpoint part", CheckpointError, "resume from another checkpoint")
    lo, hi = (manifest.shards or {"slices": [[0, 0]] * (shard + 1)})["slices"][shard]
    try:
        z = np.load(part, allow_pickle=False)  # NpzFile: the momentum entries are read when asked for
        weights, meta, gb = z["weights"], json.loads(str(z["meta"])), z["group_buffers"]
        outer = z["outer"] if "outer" in z.files else None
        commits, saved = int(meta["commits"]), [int(g) for g in meta["saved"]]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint part {part} does not exist: the checkpoint is incomplete"
        ) from None
    except (*_READ_ERRORS, TypeError) as e:
        raise _corrupt(part, e) from None
    if commits != manifest.commits or weights.shape != (hi - lo,) or gb.ndim != 2:
        raise CheckpointError(f"checkpoint part {part} does not belong to {path} (another commit or slice)")
    n_p = weights.size - gb.shape[1]
    saved = [g for g in saved if g in manifest.momentum.saved]  # a group some shard lacks restarts from zero
    info = {
        "format": FORMAT,
        "momentum": {"groups": manifest.momentum.n_groups, "params": n_p, "saved": saved},
    }
    return Part(weights, gb, outer, _momenta(part, z, info))


def whole_weights(path: str) -> np.ndarray:
    """The flat weights a checkpoint holds, assembled from its parts where the server was
    sharded (with a final checkpoint's evaluated BN buffers): for tools and tests; a server shard
    reads only its own part (`load_part`)."""
    ck = load(path)
    if not ck.shards:
        return ck.weights
    w = np.concatenate([ck.weights] + [load_part(ck, path, s).weights for s in range(1, ck.shards["count"])])
    if ck.final_buffers is not None and ck.final_buffers.size:
        w[-ck.final_buffers.size :] = ck.final_buffers  # the BN buffers are the tail of the flat weights
    return w
