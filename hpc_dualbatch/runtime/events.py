"""TensorBoard event files in `<out>/tb/`, beside metrics.jsonl: `metrics.tensorboard` auto
(where the tensorboard package is importable; else one line says none are written), always (a
start-up error without it) or never; `metrics.tensorboard_x` step or wall. Both may change on a
resume (resume.OPERATIONAL).

They hold nothing of their own: `MetricsLog` hands every record it writes to `EventLog.write`,
and `scalars` maps a record to TensorBoard points, so the records are built once (metrics.py)
and the event file is a view of metrics.jsonl. Tags and their steps, with
`metrics.tensorboard_x: step` (the default):

    commit  train/loss/group<g>, train/acc/group<g>,
            train/images_per_s/group<g> (samples / seconds of training)      step: commit
            server/staleness/group<g>, server/distance/group<g> (server runs) step: merge
            B_S/trained/group<g>/<res>px (a small group's batch in the task) step: commit
    merge   server/staleness/group<g>, server/distance/group<g>             step: merge
    eval    test/loss, test/acc                 step: the commit count of the evaluated weights
                                                (epoch x commits per epoch: n groups, sync 1)
    plan    B_S/planned/group<g>/<res>px (each group the re-plan changed)   step: commit count
                                                at the re-plan (epoch x commits per epoch)

so train, test and B_S curves share one axis, commits; every push (merge or commit) is one
staleness and distance point. With `tensorboard_x: wall` every step is the record's `wall` in
milliseconds of training instead. Every event's time is the run's start plus the record's
`wall` (seconds of training, which go on across a resume), so TensorBoard's "relative" axis
shows training time in either mode.

Written by the rank that writes metrics.jsonl (the server; rank 0 in sync mode), flushed after
every evaluation and otherwise every few seconds, so a live `tensorboard --logdir runs/` follows
a running job. When the log opens, `tb/` is emptied and rebuilt from the records metrics.jsonl
holds then (none for a new run; on a resume the file is already cut back to the checkpoint),
and the live records follow in the same file: a resumed run's stream holds each step once.
TensorBoard's Python reader keeps a tag's points in the order written, its data server drops
a tag's points at or past the step of each new point: so a point whose step does not exceed
its tag's last one is left out (`skipped`; metrics.jsonl keeps it): an evaluation that arrives
after a later epoch's (order: arrival), or with the wall axis two of a tag's records in one ms.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.runtime.metrics import MetricsLog

FOLDER = "tb"
FLUSH_SECS = 5  # a live TensorBoard sees a running job's records at most this late
INSTALL = "pip install tensorboard (or pip install -e '.[tensorboard]')"

Point = tuple[str, float, int]  # tag, value, step


def unavailable() -> str | None:
    """Why event files cannot be written in this process (None: they can)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as e:  # ImportError without the package; anything else: a broken install
        return f"{type(e).__name__}: {e}"
    return None


def check(mode: str) -> None:
    """At start-up: `metrics.tensorboard: always` where the tensorboard package cannot be
    imported is an error (auto then writes none and says so)."""
    if mode == "always":
        why = unavailable()
        if why is not None:
            raise ConfigError(
                f"config key 'metrics.tensorboard' is 'always' but TensorBoard cannot be imported "
                f"here ({why}); {INSTALL}, or set metrics.tensorboard: auto (event files where it "
                f"is installed) or never"
            )


def scalars(rec: dict[str, Any], per_epoch: int, x: str = "step") -> list[Point]:
    """The TensorBoard points of one metrics record (none for end and gap records)."""
    kind = rec.get("type")
    wall = rec.get("wall")
    ms = round(wall * 1000) if isinstance(wall, (int, float)) else None
    if x == "wall" and ms is None:
        return []

    def at(step: int) -> int:
        return ms if x == "wall" and ms is not None else step

    out: list[Point] = []
    if kind in ("commit", "merge"):
        g = rec["group"]
        if kind == "commit":
            c = rec["commit"]
            out += [
                (f"train/loss/group{g}", rec["train_loss"], at(c)),
                (f"train/acc/group{g}", rec["train_acc"], at(c)),
            ]
            if rec["seconds"] > 0:
                out.append((f"train/images_per_s/group{g}", rec["samples"] / rec["seconds"], at(c)))
            if rec.get("small"):
                out.append((f"B_S/trained/group{g}/{rec['resolution']}px", rec["batch"], at(c)))
        if "merge" in rec:  # the server's diagnostics of a push (sync commits have none)
            m = rec["merge"]
            out += [
                (f"server/staleness/group{g}", rec["staleness"], at(m)),
                (f"server/distance/group{g}", rec["distance"], at(m)),
            ]
    elif kind == "eval":
        step = at(round(rec["epoch"] * per_epoch))
        out += [("test/loss", rec["test_loss"], step), ("test/acc", rec["test_acc"], step)]
    elif kind == "plan":
        step = at(round(rec["epoch"] * per_epoch))
        res = rec["resolution"]
        out += [(f"B_S/planned/group{h}/{res}px", rec["batches"][str(h)], step) for h in rec["changed"]]
    return [(tag, float(v), int(s)) for tag, v, s in out]


class EventLog:
    """One event file in `folder`, emptied first (it is rebuilt from metrics.jsonl: see above)."""

    def __init__(self, folder: str, per_epoch: int, x: str = "step", origin: float = 0.0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder, self.per_epoch, self.x, self.origin = folder, per_epoch, x, origin
        if os.path.islink(folder) or os.path.isfile(folder):
            os.unlink(folder)  # never written through (a link) nor in the way (a file)
        elif os.path.isdir(folder):
            shutil.rmtree(folder)
        self._w = SummaryWriter(folder, flush_secs=FLUSH_SECS)
        self.last: dict[str, int] = {}  # tag -> its last step written
        self.skipped = 0

    def write(self, rec: dict[str, Any]) -> None:
        wall = self.origin + float(rec.get("wall", 0.0))
        for tag, value, step in scalars(rec, self.per_epoch, self.x):
            if step <= self.last.get(tag, -1):
                self.skipped += 1
                continue
            self.last[tag] = step
            self._w.add_scalar(tag, value, step, walltime=wall)
        if rec.get("type") in ("eval", "end"):
            self._w.flush()

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def open_events(out: str, mode: str, x: str, per_epoch: int, elapsed: float) -> EventLog | None:
    """The run's event log (None: metrics.tensorboard never, or auto without TensorBoard, which
    is said in one line). `per_epoch`: commits per epoch (n groups; 1 in sync mode); `elapsed`:
    seconds of training before this start (the checkpoint's), so event times go on from there."""
    if mode == "never":
        return None
    why = unavailable()
    if why is not None:
        print(
            f"tensorboard: no event files ({why}); {INSTALL} for them, or set metrics.tensorboard: never",
            flush=True,
        )
        return None
    folder = os.path.join(out, FOLDER)
    try:
        return EventLog(folder, per_epoch, x, time.time() - elapsed)
    except Exception as e:  # the event files are a view of metrics.jsonl: never a reason to stop
        print(
            f"tensorboard: no event files ({type(e).__name__}: {e}); {folder} could not be made", flush=True
        )
        return None


def open_log(cfg: Any, ck: Any, per_epoch: int) -> MetricsLog:
    """The run's metrics.jsonl (cut back to the checkpoint `ck` on a resume) and its event log,
    on the rank that writes them; `per_epoch`: commits per epoch (n groups; 1 in sync mode)."""
    m = cfg.metrics
    events = open_events(cfg.out, m.tensorboard, m.tensorboard_x, per_epoch, ck.elapsed if ck else 0.0)
    return MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), ck.metrics_offset if ck else None, events)
