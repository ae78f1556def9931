"""When the server last heard from each group, and which groups it leaves out: pure, no MPI.

A group the server waits for (a task or an evaluation to send, not parked at a barrier) that has
been silent for longer than the stall bound (`server.stall_s`, or 4x the longest silence any group
has shown, so a long task is not taken for a stall) is stalled: a stopped, hung or crashed rank.
So is, once a preemption (or a stall) has set a cutoff `server.preempt_wait_s` ahead, every group
not parked by then. The server then checkpoints without them and ends the run
(`ParameterServer.checkpoint`). A group heard from again before that is taken back.
"""

from __future__ import annotations

import math
from typing import Any


class Watch:
    def __init__(self, n_groups: int, stall_s: float, preempt_wait_s: float, now: float) -> None:
        self.stall_s, self.wait_s = stall_s, preempt_wait_s
        self.heard = [now] * n_groups  # when each group was last heard from or answered
        self.longest_gap = 0.0  # the longest silence of a group before a request, seconds
        self.stalled: set[int] = set()  # groups the next checkpoint leaves out
        self.gone: set[int] = set()  # ... of them, those never served again (a message went astray)
        self.cutoff: float | None = None  # a preemption's or stall's barrier stops waiting then

    def bound(self) -> float | None:
        """Seconds of silence after which a group is stalled; None: never (server.stall_s 0)."""
        return max(self.stall_s, 4 * self.longest_gap) if self.stall_s > 0 else None

    def heard_from(self, g: int, now: float) -> bool:
        """A request of group g arrived; True if g had been left out and is taken back."""
        self.longest_gap = max(self.longest_gap, now - self.heard[g])
        self.heard[g] = now
        if g not in self.stalled or g in self.gone:
            return False
        self.stalled.discard(g)
        return True

    def answered(self, g: int, now: float) -> None:
        """Group g was sent a reply: its silence counts from now."""
        self.heard[g] = now

    def start_cutoff(self, now: float) -> None:
        """A preemption (or a stall): groups not parked within server.preempt_wait_s are left out."""
        if self.cutoff is None:
            self.cutoff = now + self.wait_s

    def deadline(self, awaited: list[int]) -> float | None:
        """The time by which one of the `awaited` groups must speak, else `silent`; None: no bound."""
        bound = self.bound()
        times = [self.heard[g] + bound for g in awaited] if bound is not None else []
        if self.cutoff is not None and awaited:
            times.append(self.cutoff)
        return min(times, default=None)

    def silent(self, now: float, awaited: list[int], queued: set[int]) -> list[int]:
        """The awaited groups to leave out at `now`: past the stall bound, or past the cutoff.
        `queued`: groups whose request waits unserved (round robin serves another first)."""
        for g in queued:
            self.heard[g] = now
        bound, past_cutoff = self.bound(), self.cutoff is not None and now >= self.cutoff
        return [
            g
            for g in awaited
            if g not in queued and (past_cutoff or (bound is not None and now - self.heard[g] >= bound))
        ]

    def leave_out(self, groups: list[int], now: float, for_good: bool = False) -> None:
        """Leave `groups` out of the next checkpoint (`for_good`: never served again); the others
        get server.preempt_wait_s to park."""
        self.stalled.update(groups)
        if for_good:
            self.gone.update(groups)
        self.start_cutoff(now)

    def exchange_deadline(self, now: float) -> float:
        """How long an exchange with a group that has begun may take: the stall bound, and at
        most server.preempt_wait_s past a cutoff, so a preemption ends within twice that."""
        bound = self.bound()
        by = math.inf if bound is None else now + bound
        return min(by, math.inf if self.cutoff is None else self.cutoff + self.wait_s)

    def who(self, groups: list[int], ranks: list[tuple[int, ...]], now: float) -> str:
        """'group 1 (rank 2, silent for 8 s), ...' for messages."""
        return ", ".join(
            f"group {g} (rank{'s' if len(ranks[g]) != 1 else ''} {', '.join(map(str, ranks[g])) or '?'}, "
            f"silent for {now - self.heard[g]:.0f} s)"
            for g in groups
        )


def left_out_message(
    who: str, cfg: Any, preempt: bool, bound: float | None, path: str, lost_task: bool
) -> str:
    """What the run says when it ends without the groups named in `who`."""
    server = cfg.server
    if preempt:
        why = f"the preemption's checkpoint waited server.preempt_wait_s = {server.preempt_wait_s:g} s"
        why += f" and left out {who}"
    else:
        why = (
            f"{who} not heard from within the stall bound of {bound or 0:.0f} s (server.stall_s = "
            f"{server.stall_s:g} s, or 4x the longest silence seen): a stopped, hung or crashed rank"
        )
    task = "its unfinished task and its momentum" if lost_task else "its momentum"
    again = "hands that task out again and starts" if lost_task else "starts"
    return (
        f"{why}. Checkpoint {path} holds every other group's work; of the group(s) left out it lacks {task} "
        f"(the resume {again} that momentum from zero). Continue with: hpc-dualbatch train --resume {cfg.out}"
    )
