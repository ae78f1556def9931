"""Checkpoints: everything needed to continue a run exactly, written atomically.

One `.npz` file per checkpoint under `<out>/checkpoints/`, loaded with
`allow_pickle=False` (plain arrays and one JSON string: no code runs on load):

    weights    float32[n_weights]           the global weights
    momentum   float32[n_groups, n_params]  each group's SGD momentum (it lives on the group)
    group_buffers float32[n_groups, n_buffers]  each group's own BN buffers (server.bn: local);
               absent in sync runs
    outer      float32[2, n_params]         the server's outer momentum and its round's sum
               (server.outer; absent without)
    meta       JSON: format, commits, rounds per group, elapsed seconds, metrics byte offset,
               the resolved config, and the fingerprint of the staged data's content (`data`)

Every random choice of a run derives from (seed, group, round, rank) counters,
so the counters in `meta` replace RNG states. Written to a temporary name,
flushed, fsynced and renamed: a crash mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.yaml_safe import show

FORMAT = 1
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


@dataclass
class Checkpoint:
    weights: np.ndarray
    momentum: np.ndarray  # (n_groups, n_params)
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


def save(out: str, ck: Checkpoint, keep: int = 2) -> str:
    d = checkpoint_dir(out)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{PREFIX}{ck.commits:09d}.npz")
    tmp = path + f".tmp{os.getpid()}"
    meta = {
        "format": FORMAT,
        "commits": ck.commits,
        "rounds": ck.rounds,
        "elapsed": ck.elapsed,
        "metrics_offset": ck.metrics_offset,
        "config": ck.config,
        "extra": ck.extra,
        "data": ck.data if ck.data is not None else _DATA,
    }
    try:
        with open(tmp, "xb") as f:  # exclusive: never through a planted link
            arrays = {"weights": ck.weights, "momentum": ck.momentum, "meta": np.array(json.dumps(meta))}
            if ck.group_buffers is not None:
                arrays["group_buffers"] = ck.group_buffers
            if ck.outer is not None:
                arrays["outer"] = ck.outer
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None
    for old in sorted(glob.glob(os.path.join(d, f"{PREFIX}*.npz")))[:-keep]:
        os.unlink(old)
    return path


def latest(out: str) -> str | None:
    found = sorted(glob.glob(os.path.join(checkpoint_dir(out), f"{PREFIX}*.npz")))
    return found[-1] if found else None


def load(path: str) -> Checkpoint:
    check_regular(
        path, "checkpoint", CheckpointError, "resume from another checkpoint or start the run again"
    )
    try:
        with np.load(path, allow_pickle=False) as z:
            weights, momentum, meta = z["weights"], z["momentum"], json.loads(str(z["meta"]))
            group_buffers = z["group_buffers"] if "group_buffers" in z.files else None
            outer = z["outer"] if "outer" in z.files else None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, RecursionError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or partially written ({type(e).__name__}: {e}); "
            f"delete it to resume from the one before"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path} has format {found}, this version reads {FORMAT}")
    if (
        weights.dtype != np.float32
        or weights.ndim != 1
        or momentum.dtype != np.float32
        or momentum.ndim != 2
        or (group_buffers is not None and (group_buffers.dtype != np.float32 or group_buffers.ndim != 2))
        or (outer is not None and (outer.dtype != np.float32 or outer.shape != (2, momentum.shape[1])))
    ):
        raise CheckpointError(f"checkpoint {path} holds arrays of unexpected type or shape")
    try:
        return Checkpoint(
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
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path} has incomplete metadata ({type(e).__name__}: {e}); it was not written "
            f"by this package, or is damaged: delete it to resume from the one before"
        ) from None


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
