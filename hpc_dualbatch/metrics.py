"""One JSON-lines metrics file per run, written by one rank (the server, or rank 0 in sync mode).

Record types (field `type`):
    commit  one mini-epoch pushed by a group: group, round, samples, seconds (training),
            wait (seconds in the task's mid-task exchanges), train_loss, train_acc, lr,
            resolution, batch, epoch (commits / n_groups), commit, wall; on the server also
            the push's merge diagnostics: merge (merges so far), staleness (merges by other
            pushes since the group's pull), distance (||pushed - global|| of the parameters
            before the merge), scale (the weight the merge gave the push)
    merge   a push inside a task (server.push_every): group, round, merge, staleness,
            distance, scale, wall
    eval    the global weights at an epoch boundary on the test split: epoch, test_loss,
            test_acc, samples, seconds, resolution, wall (seconds of training since the start);
            on the server also bn (server.bn) and bn_seconds (recalibration before it)
    end     the run finished or was preempted: state, commits, wall
Progress goes to stdout as plain lines (Slurm logs, mpirun output).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


class MetricsLog:
    def __init__(self, path: str, truncate_to: int | None = None) -> None:
        self.path = path
        if truncate_to is not None and os.path.exists(path):
            # Resume: drop records of work done after the checkpoint (it is done again).
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self._f = open(path, "ab")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._f.flush()

    def offset(self) -> int:
        self._f.flush()
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
