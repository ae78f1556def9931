"""One JSON-lines metrics file per run, written by one rank (the server, or rank 0 in sync mode).

Record types (field `type`):
    commit  one mini-epoch pushed by a group: group, round, samples, seconds (training),
            train_loss, train_acc, lr, resolution, batch, epoch (commits / n_groups), commit,
            wall; on the server also wait (seconds in the task's mid-task exchanges),
            predicted (the adaptive plan's seconds for the task, where it has a fit) and the
            push's merge diagnostics: merge (merges so far), staleness (merges by other
            pushes since the group's pull), distance (the push's size: under server.merge
            paper ||pushed - global|| of the parameters before the merge, with server shards of
            shard 0's slice; under delta and nova the norm of the update it carries,
            ||w_i - w_pulled||, measured by its leader over the whole push; runs made before
            pushes carried updates recorded ||w_i - global|| under every rule), scale (the weight the
            merge gave the push)
    merge   a push inside a task (server.push_every): group, round, merge, staleness,
            distance, scale, wall
    eval    the global weights at an epoch boundary on the test split: epoch, test_loss,
            test_acc, samples, seconds, resolution, wall (seconds of training since the start);
            bn (server.bn or sync.bn) and bn_seconds (a recalibration before it)
    plan    a re-plan of adaptive planning that changed a group's batch or share: epoch,
            resolution, batches, shares, changed, target_seconds, scales, capped, wall
    end     how the run ended: state (done, preempted, diverged, stalled), commits, wall; on the
            server also server_cpu_seconds, server_serve_seconds, server_busy_share (serving
            minus waiting for the next request, of serving) and server_peak_rss_mb (also in
            status.json under "server")
    gap     records of work that a checkpoint holds were lost (a crash lost the file's unsynced
            tail, or the file was deleted), or an evaluation never came (its group was left out:
            ps/stalls.py): after_commit (the last commit still recorded), up_to_commit
            (the checkpoint's), missing_bytes, reason. Nothing is made up for them.
Progress goes to stdout as plain lines (Slurm logs, mpirun output). TensorBoard event files
are made from these same records as they are written (`MetricsLog(events=...)`, events.py).

The checkpoint is fsynced, the metrics file is not: after a crash the file may be shorter than
the checkpoint says, or end in NUL bytes or half a line. `repair` keeps the longest prefix of
whole, valid records and marks what is missing with a gap record; it never pads the file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from hpc_dualbatch.atomic import check_regular, file_kind, open_regular
from hpc_dualbatch.errors import DataError, OutputError


def _write_failed(path: str, e: OSError) -> OutputError:
    return OutputError(
        f"could not write metrics file {path}: {e.strerror or e}; the newest checkpoint is intact: "
        f"free space (or fix the folder), then continue with --resume {os.path.dirname(path) or '.'}"
    )


class MetricsLog:
    """The run's metrics.jsonl; `events` (runtime/events.py), where given, gets every record
    the file holds when it opens and every record written after."""

    def __init__(self, path: str, truncate_to: int | None = None, events: Any = None) -> None:
        self.path, self.events = path, events
        try:
            self._f = open_regular(path)
            if truncate_to is not None and os.fstat(self._f.fileno()).st_size > truncate_to:
                # Resume: drop records of work done after the checkpoint (it is done again). Only
                # ever shorten: a shorter file was repaired by `repair` (never padded with NULs).
                self._f.truncate(truncate_to)
            kept = b""
            if events is not None:
                with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                    kept = f.read()
        except OSError as e:
            raise _write_failed(path, e) from None
        for line in kept.split(b"\n"):  # the event file is rebuilt from the records kept
            rec = _record(line) if line.strip() else None
            if rec is not None:
                self._event("write", rec)
        self._event("flush")

    def _event(self, method: str, *args: Any) -> None:
        if self.events is None:
            return
        try:
            getattr(self.events, method)(*args)
        except Exception as e:  # the event file is a view of this one: losing it never stops a run
            print(
                f"tensorboard: event files stopped ({type(e).__name__}: {e}); {self.path} goes on", flush=True
            )
            self.events = None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
            self._f.flush()
        except OSError as e:
            raise _write_failed(self.path, e) from None
        self._event("write", record)

    def offset(self) -> int:
        self._f.flush()
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        self._event("close")


def _record(line: bytes) -> dict[str, Any] | None:
    """One line as a record, or None when it is not a whole JSON object with a string `type`."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("type"), str) else None


# Fields each record type must hold for `summarize` and `report` to use it.
REQUIRED = {
    "commit": ("commit", "group", "small", "samples", "seconds"),
    "eval": ("epoch", "test_loss", "test_acc", "wall"),
    "end": ("state", "wall"),
}


NUMERIC = {"commit", "group", "samples", "seconds", "epoch", "test_loss", "test_acc", "wall"}


def commit_record(
    *,
    commit: int,
    epoch: float,
    group: int,
    round_idx: int,
    small: bool,
    samples: int,
    seconds: float,
    train_loss: float,
    train_acc: float,
    lr: float,
    resolution: int,
    batch: int,
    wall: float,
    wait: float | None = None,
    waited: float | None = None,
    sleeps: int | None = None,
    late: float | None = None,
    predicted: float | None = None,
    **merge: Any,
) -> dict[str, Any]:
    """One mini-epoch's record, for the server and the sync loop alike: the fields `report`
    and `summarize` read, then the server's own (wait, and of it the server's part, waited; the
    leader's sleeps and their lateness, `protocol.Backoff`; predicted; the merge diagnostics),
    wall last. Seconds are rounded to 0.1 ms, wall to 1 ms."""
    rec = {
        "type": "commit",
        "commit": commit,
        "epoch": epoch,
        "group": group,
        "round": round_idx,
        "small": small,
        "samples": samples,
        "seconds": round(seconds, 4),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "lr": lr,
        "resolution": resolution,
        "batch": batch,
    }
    optional = {"wait": wait, "waited": waited, "sleeps": sleeps, "late": late, "predicted": predicted}
    rec.update((k, round(v, 4)) for k, v in optional.items() if v is not None)  # (an int stays one)
    return {**rec, **merge, "wall": round(wall, 3)}


def merge_record(*, group: int, round_idx: int, wall: float, **merge: Any) -> dict[str, Any]:
    """A push inside a task (server.push_every) and its merge diagnostics."""
    return {"type": "merge", "group": group, "round": round_idx, **merge, "wall": round(wall, 3)}


def plan_record(
    *, epoch: float, resolution: int, replan: Any, changed: list[int], wall: float
) -> dict[str, Any]:
    """A re-plan of adaptive planning (`adapt.Replan`) that changed a group's batch or share."""
    return {
        "type": "plan",
        "epoch": epoch,
        "resolution": resolution,
        "batches": {str(h): b for h, b in sorted(replan.batches.items())},
        "shares": {str(h): d for h, d in sorted(replan.shares.items())},
        "changed": changed,
        "target_seconds": round(replan.target, 4),
        "scales": {str(h): round(v, 4) for h, v in sorted(replan.scales.items())},
        "capped": list(replan.capped),
        "wall": round(wall, 3),
    }


def gap_record(*, after_commit: int, up_to_commit: int, missing_bytes: int, reason: str) -> dict[str, Any]:
    """Records that will never be there (see the module docstring)."""
    return {
        "type": "gap",
        "after_commit": after_commit,
        "up_to_commit": up_to_commit,
        "missing_bytes": missing_bytes,
        "reason": reason,
    }


def eval_record(
    *,
    epoch: float,
    group: int,
    test_loss: float,
    test_acc: float,
    samples: int,
    seconds: float,
    resolution: int,
    wall: float,
    bn: str | None = None,
    bn_seconds: float | None = None,
    parts: int | None = None,
    averaged: int | None = None,
) -> dict[str, Any]:
    """One evaluation of the global model on the test split (server and sync alike; each adds
    its BN mode, `server.bn` or `sync.bn`, and the seconds a recalibration took; where the
    server's groups shared a final evaluation, their number: its seconds are then those of the
    slowest part; under schedule.average, how many steps or merges the evaluated mean holds,
    0 where it evaluated the last iterate)."""
    rec = {
        "type": "eval",
        "epoch": epoch,
        "group": group,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "samples": samples,
        "seconds": round(seconds, 4),
        "resolution": resolution,
    }
    if bn is not None:
        rec["bn"] = bn
    if bn_seconds is not None:
        rec["bn_seconds"] = round(bn_seconds, 4)
    if parts is not None:
        rec["parts"] = parts
    if averaged is not None:
        rec["averaged"] = averaged
    return {**rec, "wall": round(wall, 3)}


def evaluations(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's eval records in epoch order. The log holds them as they arrived: two groups'
    evaluations can end out of order (the final one before the one of the epoch before), so
    "the last evaluation" and "the fall from one to the next" must not take the log's order."""
    return sorted((r for r in recs if r["type"] == "eval"), key=lambda r: r["epoch"])


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Every record of a metrics file; a line that is not a valid record is a `DataError`
    naming the file, the line and what is wrong (never a JSONDecodeError traceback)."""
    check_regular(path, "metrics file", DataError, "give a run folder's metrics.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"metrics file {path} cannot be read: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            raise DataError(
                f"metrics file {path}, line {n}: not a metrics record (expected one JSON object with a "
                f"'type' per line, got {line[:60]!r}); the file is damaged or not a metrics file"
            )
        need = REQUIRED.get(rec["type"], ())
        missing = [k for k in need if k not in rec]
        if missing:
            raise DataError(
                f"metrics file {path}, line {n}: a '{rec['type']}' record without {', '.join(missing)}; "
                f"the file is damaged or not written by hpc_dualbatch"
            )
        bad = [
            k
            for k in need
            if k in NUMERIC and (isinstance(rec[k], bool) or not isinstance(rec[k], (int, float)))
        ]
        if bad:
            raise DataError(
                f"metrics file {path}, line {n}: field '{bad[0]}' of a '{rec['type']}' record is "
                f"{str(rec[bad[0]])[:40]!r}; expected a number"
            )
        out.append(rec)
    return out


def repair(path: str, offset: int, commits: int) -> tuple[int, dict[str, Any] | None]:
    """Make `path` hold exactly the records a checkpoint at `offset` bytes and `commits` commits
    accounts for, as far as they survive. Returns (the file's new size, the gap record written
    when records are missing, else None).

    The longest prefix of whole valid records within the first `offset` bytes is kept; what
    follows is cut (records after the checkpoint are redone, and NUL bytes or a half line from a
    crash are dropped). When the kept part is shorter than `offset`, a `gap` record says which
    commits' records are lost; the file is never padded.
    """
    kind = file_kind(path)
    if kind not in (None, "missing"):
        raise OutputError(f"metrics file '{path}' is {kind}, not a regular file; remove it, then --resume")
    try:
        with open(path, "rb") as f:
            data = f.read(offset)
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise DataError(f"metrics file {path} cannot be read: {e.strerror or e}") from None
    kept, last_commit = 0, 0
    while kept < len(data):
        end = data.find(b"\n", kept)
        if end < 0:
            break  # a half line: the crash cut it
        rec = _record(data[kept:end])
        if rec is None:
            break
        if rec["type"] == "commit" and isinstance(rec.get("commit"), int):
            last_commit = rec["commit"]
        kept = end + 1
    gap = None
    if kept < offset:
        reason = (
            "metrics file missing"
            if not os.path.exists(path)
            else (
                "metrics file shorter than the checkpoint" if len(data) < offset else "metrics file damaged"
            )
        )
        gap = gap_record(
            after_commit=last_commit, up_to_commit=commits, missing_bytes=offset - kept, reason=reason
        )
    try:
        with open_regular(path) as f:
            f.truncate(kept)
            if gap is not None:
                f.write((json.dumps(gap, separators=(",", ":")) + "\n").encode())
        return os.path.getsize(path), gap
    except OSError as e:
        raise _write_failed(path, e) from None


class Progress:
    """Plain progress lines on stdout, one per commit and per evaluation.

    Plain lines because ranks rarely write to a real terminal: Slurm writes to a log file,
    and mpirun gives every rank a pseudo-terminal even when its own output is a pipe, where
    a rewritten line would leave escape codes in the log.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def commit(self, rec: dict[str, Any], epochs: int, total: int) -> None:
        """The line of a server's commit record."""
        self.line(
            f"epoch {rec['epoch']:7.2f}/{epochs} commit {rec['commit']}/{total} group {rec['group']} "
            f"{rec['resolution']}px batch {rec['batch']} loss {rec['train_loss']:.3f} "
            f"acc {rec['train_acc']:.3f} wall {rec['wall']:.0f}s"
        )

    def evaluation(self, rec: dict[str, Any]) -> None:
        """The line of an eval record."""
        self.line(
            f"epoch {rec['epoch']:7.2f} test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.4f} "
            f"({rec['resolution']}px, wall {rec['wall']:.0f}s)"
        )
