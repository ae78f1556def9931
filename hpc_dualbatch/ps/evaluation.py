"""The final evaluation, shared by the groups that have run out of tasks (no MPI).

A run's last evaluation comes after its last commit, when every other group has no task left.
Made by the closing group alone it keeps the others idle for all of it, where the synchronous
run splits its evaluation over its ranks (on the 2-core grid machine the time after the last
commit fell from 5.2 to 3.1 s: docs/server.md, "Diagnostics"). So the server holds the reply
to every group that runs out of tasks until all have (`Roster.waiting`), then hands each a
block of consecutive *slots*, one per rank, R in all. Slot j recalibrates the
BN statistics on the j-th of R parts of the run's fixed recalibration samples; the server
averages the groups' statistics, weighted by their ranks (the mean over all ranks, as a group
averages its own ranks'), and sends the mean back; slot j then evaluates the j-th of R parts of
the test split, and the server adds the parts into one evaluation record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpc_dualbatch.ps import protocol as P


@dataclass
class SharedEval:
    epoch: float
    closer: int  # the group whose commit closed the last epoch (the record's group)
    slots: dict[int, tuple[int, int]]  # group -> (its first slot, its ranks)
    stats: dict[int, np.ndarray] = field(default_factory=dict)  # group -> its BN statistics
    results: dict[int, P.Evaluation] = field(default_factory=dict)

    @classmethod
    def of(cls, epoch: float, closer: int, ranks: dict[int, int]) -> SharedEval:
        """Slots in group order: group g (ranks[g] ranks) takes the next ranks[g] slots."""
        slots, first = {}, 0
        for g in sorted(ranks):
            slots[g], first = (first, ranks[g]), first + ranks[g]
        return cls(epoch, closer, slots)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.slots.values())

    def task(self, g: int) -> dict[str, float]:
        """Group g's part, as the fields of its STOP reply (`protocol.Task`)."""
        return {"eval_epoch": self.epoch, "eval_slot": self.slots[g][0], "eval_slots": self.total}

    def add_stats(self, g: int, bufs: np.ndarray) -> np.ndarray | None:
        """Group g's BN statistics (the mean over its ranks); once every group's are in, their
        mean over all ranks, which every part evaluates with."""
        self.stats[g] = bufs
        if len(self.stats) < len(self.slots):
            return None
        acc = np.zeros(bufs.size, np.float64)
        for h, (_, n) in sorted(self.slots.items()):
            acc += n * self.stats[h].astype(np.float64)
        return (acc / self.total).astype(np.float32)

    def add_result(self, g: int, ev: P.Evaluation) -> P.Evaluation | None:
        """Group g's part of the test split; once every part is in, the whole evaluation:
        loss and accuracy over all samples, the seconds of the slowest part."""
        self.results[g] = ev
        if len(self.results) < len(self.slots):
            return None
        parts = [self.results[h] for h in sorted(self.results)]  # (a fixed order: the same sums)
        n = sum(e.samples for e in parts)
        return P.Evaluation(
            self.epoch, sum(e.loss * e.samples for e in parts) / max(n, 1),
            sum(e.acc * e.samples for e in parts) / max(n, 1), n, max(e.seconds for e in parts),
            parts[0].resolution, max(e.bn_seconds for e in parts),
        )  # fmt: skip
