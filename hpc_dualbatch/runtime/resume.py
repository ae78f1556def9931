"""What a resume must match: the config a checkpoint was made with (all but the operational
keys) and the staged data's content."""

from __future__ import annotations

import json
from typing import Any

from hpc_dualbatch.errors import CheckpointError
from hpc_dualbatch.yaml_safe import show

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
        "server.poll_predict",
        "server.stall_s",  # when a silent group is declared stalled
        "server.preempt_wait_s",
        "checkpoint.every_epochs",  # when checkpoints are written, not what they hold
        "checkpoint.keep",
        "metrics.tensorboard",  # event files beside metrics.jsonl: rebuilt from it on every start
        "metrics.tensorboard_x",
    }
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_config(ck: Any) -> dict[str, Any]:
    """The config a checkpoint was made with, as `Config.to_dict` gave it: JSON stored the integer
    keys of the per-resolution maps (plan.large_batch, schedule.dropout, ...) as strings."""

    def restore(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {int(k) if isinstance(k, str) and k.isdigit() else k: restore(x) for k, x in v.items()}

    return restore(ck.config)


# The value a key had in effect before it existed, for keys whose default has changed since: a
# saved config that lacks such a key ran with this value (every other key was added with the
# default that kept the behaviour from before it). BEFORE_KEY_FROM: the same, where the value
# in effect was another key's of the same config.
BEFORE_KEY = {"schedule.small_lr": "same", "schedule.warmup_ramp": "task"}
BEFORE_KEY_FROM = {"optim.ps_momentum": "optim.momentum"}  # the groups trained at optim.momentum


def config_differences(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], ignore: frozenset[str] = OPERATIONAL
) -> list[str]:
    """The keys where two resolved configs differ, outside `ignore`: "key: <names[0]> A, <names[1]> B".
    A key one side lacks (a config saved before the key existed) counts as the behaviour from
    before it: its default, or BEFORE_KEY's value (BEFORE_KEY_FROM's key's) where the default has
    changed since."""
    from hpc_dualbatch.config import Config

    # A JSON round trip makes both sides alike (int dict keys become strings).
    base = {**_flatten(json.loads(json.dumps(Config().to_dict()))), **BEFORE_KEY}

    def resolved(c: dict[str, Any]) -> dict[str, Any]:
        own = _flatten(json.loads(json.dumps(c)))
        out = {**base, **own}
        out.update({k: out[src] for k, src in BEFORE_KEY_FROM.items() if k not in own})
        return out

    fa, fb = resolved(a), resolved(b)
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
