"""A run's output folder, on rank 0: the lock, refusing to overwrite a run, finding the
checkpoint to resume, and status.json at the end (used by the server and sync drivers).

A folder holding a checkpoint is refused unless `--resume` names it; one whose run stopped
before its first checkpoint starts over at commit 0 (`prepare_out`); a lock file keeps two
jobs out of one folder.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from hpc_dualbatch.atomic import open_regular, write_json
from hpc_dualbatch.config import Config
from hpc_dualbatch.errors import ConfigError, OutputError
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime import resume as R
from hpc_dualbatch.runtime.metrics import evaluations, read_metrics, repair


def write_failed(what: str, e: OSError) -> OutputError:
    return OutputError(f"cannot write {what}: {e.strerror or e}; choose a writable folder with --set out=...")


def prepare_out(cfg: Config, resume: bool, staged: Any = None) -> tuple[Any, Any]:
    """Rank 0: lock the output folder, refuse to overwrite a run, find the checkpoint to resume.

    What a folder holds decides, for a fresh command and for --resume alike:
      nothing (or only config.yaml)        start at commit 0
      metrics, no checkpoint               the run stopped before its first checkpoint: start
                                           over at commit 0 (old records kept aside), and say so
      checkpoint (+ metrics)               --resume continues it; a fresh command is refused
    """
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(
            f"config key 'out' is '{cfg.out}', which is a file; it must be a folder (new, or a run "
            f"folder): choose another with --set out=..."
        )
    try:
        os.makedirs(cfg.out, exist_ok=True)
        lock = open_regular(os.path.join(cfg.out, ".lock"))
    except OSError as e:
        raise write_failed(f"output folder {cfg.out}", e) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ConfigError(
            f"output folder {cfg.out} is in use by another run (lock {cfg.out}/.lock)"
        ) from None
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    path = C.latest(cfg.out)
    if path is None:
        if os.path.exists(metrics):
            set_aside(cfg.out, metrics)
        elif resume:
            print(
                f"hpc-dualbatch: {cfg.out} has no checkpoint yet: starting the run from commit 0", flush=True
            )
        return lock, None
    if not resume:
        if os.path.exists(metrics):
            raise ConfigError(
                f"output folder {cfg.out} already holds a run ({metrics}); continue it with "
                f"--resume {cfg.out} or choose another folder (--set out=...)"
            )
        raise ConfigError(
            f"output folder {cfg.out} holds a run's checkpoints ({path}) but no metrics.jsonl; "
            f"continue that run with --resume {cfg.out} (the lost records are marked as a gap), or "
            f"choose another folder (--set out=...)"
        )
    ck = C.load(path)
    R.check_compatible(path, ck.config, cfg.to_dict())
    if staged is not None:
        R.check_same_data(path, ck.data, staged.fingerprint(), cfg.data.path)
    return lock, ck


def set_aside(out: str, metrics: str) -> None:
    """A folder with metrics but no checkpoint: the run stopped before its first checkpoint
    (a crash, a full disk). Nothing can be continued, so it starts over; the old records are
    kept under another name, where `report` does not read them."""
    n = 1
    while os.path.exists(os.path.join(out, f"metrics-stopped-{n}.jsonl")):
        n += 1
    aside = os.path.join(out, f"metrics-stopped-{n}.jsonl")
    try:
        os.replace(metrics, aside)
        for name, kept in (("status.json", f"status-stopped-{n}.json"), ("tb", f"tb-stopped-{n}")):
            if os.path.exists(os.path.join(out, name)):  # its status, its TensorBoard event files
                os.replace(os.path.join(out, name), os.path.join(out, kept))
    except OSError as e:
        raise write_failed(f"output folder {out}", e) from None
    print(
        f"hpc-dualbatch: {out} holds metrics but no checkpoint (the run stopped before its first "
        f"checkpoint): starting it from commit 0; the old records are kept in {aside}",
        flush=True,
    )


def summarize(metrics_path: str) -> dict[str, Any]:
    recs = read_metrics(metrics_path)
    evals = evaluations(recs)
    gaps = [r for r in recs if r["type"] == "gap"]
    missing = {"metrics_gaps": len(gaps)} if gaps else {}  # records lost in a crash (see metrics.py)
    if not evals:
        return {"final_test_acc": None, "best_test_acc": None, **missing}
    return {
        **missing,
        "final_test_acc": evals[-1]["test_acc"],
        "best_test_acc": max(e["test_acc"] for e in evals),
        "final_test_loss": evals[-1]["test_loss"],
        "epochs_evaluated": len(evals),
    }


def finish(
    cfg: Config, outcome: str, commits: int, wall: float, ckpt_path: str | None, server: dict | None = None
) -> str:
    """Write status.json (`server`: the parameter server's own account, see `ParameterServer.account`)."""
    summary = summarize(os.path.join(cfg.out, "metrics.jsonl"))
    status = {
        "state": outcome,
        "commits": commits,
        "wall_seconds": round(wall, 3),
        "checkpoint": ckpt_path,
        **summary,
        **({"server": server} if server is not None else {}),
    }
    try:
        write_json(os.path.join(cfg.out, "status.json"), status)
    except OSError as e:
        raise write_failed(f"{cfg.out}/status.json", e) from None
    final, best = summary["final_test_acc"], summary["best_test_acc"]
    accs = "n/a" if final is None else f"{100 * final:.2f} % (best {100 * best:.2f} %)"
    print(
        f"run {outcome}: {commits} commits, {wall:.1f}s of training, final test accuracy {accs}; "
        f"results in {cfg.out}",
        flush=True,
    )
    return outcome


def bind_run_files(out: str, staged: Any, ck: Any) -> None:
    """Rank 0, after every rank agreed to start: checkpoints keep the data's fingerprint, and on a
    resume metrics.jsonl is cut back to the checkpoint (records lost in a crash become a gap)."""
    C.bind_data(staged.fingerprint())
    if ck is None:
        return
    path = os.path.join(out, "metrics.jsonl")
    ck.metrics_offset, gap = repair(path, ck.metrics_offset, ck.commits)
    if gap is not None:
        print(
            f"hpc-dualbatch: warning: {path}: {gap['reason']} ({gap['missing_bytes']} bytes of records "
            f"up to commit {gap['up_to_commit']} are lost, after commit {gap['after_commit']}); "
            f"continuing from the checkpoint with a 'gap' record in their place",
            flush=True,
        )
