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
from hpc_dualbatch.yaml_safe import show

FORMAT = 2  # (1: every group's momentum in one array; still read)
READS = (1, 2)
PREFIX = "ckpt-"
# Config keys a resume may change: where things are and how fast they run, never what is
# computed. Every other key, including any key added later, is part of the run's identity and
# must match the checkpoint. The staged data is compared by content (`data_fingerprint`), not
# by `data.path`, so a requeued job may stage it to another node-local folder.
OPERATIONAL = frozenset(
    {
        "out",  # the run folder itself
        "data.path",  # a node-local copy of the same file
        "data.in_memory",  # RAM or streamed reads: the same pixels either way
        "data.in_memory_max_mb",
        "data.prefetch",  # batches loaded ahead in a thread
        "data.eval_batch",  # evaluation batch per rank (sums over the same samples)
        "device",  # a requeued job may land on other hardware
        "threads",
        "workers.slowdown",  # a simulated slower node (benchmarks): how fast, not what
        "server.poll_min_s",  # how often a waiting rank polls
        "server.poll_max_s",
        "server.stall_s",  # when a silent group is declared stalled
        "server.preempt_wait_s",
        "checkpoint.every_epochs",  # when checkpoints are written, not what they hold
        "checkpoint.keep",
        "metrics.tensorboard",  # event files beside metrics.jsonl: rebuilt from it on every start
        "metrics.tensorboard_x",
    }
)

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


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


class Writer:
    """One checkpoint written in parts, at a temporary name until `finish` renames it: each
    group's momentum as it arrives (`add_momentum`, one n_params buffer at a time), then the rest.
    An OSError at any part leaves the previous checkpoint as it was (CheckpointError)."""

    def __init__(self, out: str, commits: int) -> None:
        self.dir = checkpoint_dir(out)
        self.path = os.path.join(self.dir, f"{PREFIX}{commits:09d}.npz")
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
                "saved": self.groups,
            },
        }
        self._add("weights", ck.weights)
        self._add("meta", np.array(json.dumps(meta)))
        if ck.group_buffers is not None:
            self._add("group_buffers", ck.group_buffers)
        if ck.outer is not None:
            self._add("outer", ck.outer)
        try:
            self._zip.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._fail(e)
        for old in sorted(glob.glob(os.path.join(self.dir, f"{PREFIX}*.npz")))[:-keep]:
            os.unlink(old)
        return self.path

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
    ):
        raise CheckpointError(f"checkpoint {path} holds arrays of unexpected type or shape")
    return ck


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_config(ck: Checkpoint) -> dict[str, Any]:
    """The config a checkpoint was made with, as `Config.to_dict` gave it: JSON stored the integer
    keys of the per-resolution maps (plan.large_batch, schedule.dropout, ...) as strings."""

    def restore(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {int(k) if isinstance(k, str) and k.isdigit() else k: restore(x) for k, x in v.items()}

    return restore(ck.config)


def config_differences(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], ignore: frozenset[str] = OPERATIONAL
) -> list[str]:
    """The keys where two resolved configs differ, outside `ignore`: "key: <names[0]> A, <names[1]> B".
    A key one side lacks (a config saved before the key existed) counts as its default: a key is
    added with the default that keeps the behaviour from before it."""
    from hpc_dualbatch.config import Config

    # A JSON round trip makes both sides alike (int dict keys become strings).
    base = _flatten(json.loads(json.dumps(Config().to_dict())))
    fa, fb = ({**base, **_flatten(json.loads(json.dumps(c)))} for c in (a, b))
    return [
        f"{k}: {names[0]} {show(fa.get(k))}, {names[1]} {show(fb.get(k))}"
        for k in sorted(set(fa) | set(fb))
        if k not in ignore and fa.get(k) != fb.get(k)
    ]


def check_compatible(path: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resume must use the config the checkpoint was made with; only the OPERATIONAL keys
    (where things are, how fast they run) may differ."""
    diffs = config_differences(saved, current, ("checkpoint", "now"))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made with another config ({'; '.join(diffs[:3])}); "
            f"resume with the same config (only {', '.join(sorted(OPERATIONAL))} may change), "
            f"or start a new run in another output folder"
        )


def check_same_data(path: str, saved: dict[str, Any] | None, current: dict[str, Any], data_path: str) -> None:
    """The staged data must hold what it held when the checkpoint was made (its path may move)."""
    if saved is None or saved.get("digest") == current.get("digest"):
        return  # a checkpoint from before fingerprints were kept, or the same content
    first = ["train_samples", "test_samples", "classes", "channels", "resolutions", "encoding", "source"]
    keys = first + sorted((set(saved) | set(current)) - set(first) - {"digest"})
    diffs = [
        f"{k}: checkpoint {show(saved.get(k))}, now {show(current.get(k))}"
        for k in keys
        if saved.get(k) != current.get(k)
    ] or [f"content digest: checkpoint {saved.get('digest')}, now {current.get('digest')}"]
    raise CheckpointError(
        f"checkpoint {path} was made with other data than the staged file '{data_path}' holds now "
        f"({'; '.join(diffs[:3])}); resume with the file the run started with (it may be moved: "
        f"--set data.path=...), or start a new run in another output folder"
    )
