"""Where each worker group stands in the protocol, as the server sees it (no MPI).

A group holds a task (RUN answered, not committed: `outstanding`), or is parked at a checkpoint
barrier (pushed, not answered: `parked`), or has been told STOP (`stopped`); a reply may have
asked it to evaluate (`eval_asked`, until the result is in); after a resume it is first sent its
momentum (`send_state`). Under `server.order: round_robin` the groups are served in the fixed
order 0, 1, ..., n-1, 0, ... (`next_group`); under `rounds` (throughout, or in the learning-rate
stages `server.order_by_lr` names: the server sets `rounds`) a group that pushed waits for its
reply until the round is complete (`held`). A group that has run out of tasks waits for its reply
until every group has (`waiting`): they share the final evaluation (`evaluation.py`), each group
sending its BN statistics and waiting for their mean (`stats_in`); such a group counts as stopped.
Groups the stall watch left out (`left_out`, shared with `stalls.Watch.stalled`) are neither
waited for nor served in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Roster:
    def __init__(self, n_groups: int, order: str, resumed: bool, left_out: set[int]) -> None:
        self.n, self.left_out = n_groups, left_out
        self.round_robin, self.rounds = order == "round_robin", order == "rounds"
        self.stopped: set[int] = set()
        self.parked: list[int] = []
        # order: rounds: group -> (its push was a commit, its reply, made at release)
        self.held: dict[int, tuple[bool, Callable[[], Any]]] = {}
        self.outstanding: set[int] = set()
        self.waiting: list[int] = []  # no task left, no reply yet: the final evaluation is shared
        self.stats_in: set[int] = set()  # sent their statistics, wait for the mean
        self.eval_asked: dict[int, tuple[float, int]] = {}  # group -> (epoch, merges at the asking)
        self.send_state = set(range(n_groups)) if resumed else set()
        self.started: set[int] = set()  # committed in this process: its warm-up is behind it
        self.next_rr = 0

    def serving(self) -> bool:
        """Until every group has been told STOP and its last evaluation is in."""
        unfinished = len(self.stopped) < self.n or bool(self.waiting)
        return unfinished or any(g in self.stopped for g in self.eval_asked)

    def active(self) -> list[int]:
        """Groups a barrier waits for: not stopped, not left out."""
        return [g for g in range(self.n) if g not in self.stopped and g not in self.left_out]

    def awaited(self) -> list[int]:
        """Groups the server waits to hear from: with a task or an evaluation to send, not parked."""
        skip = set(self.parked) | set(self.held) | self.stats_in | self.left_out
        return [g for g in range(self.n) if g not in skip and (g not in self.stopped or g in self.eval_asked)]

    def next_group(self) -> int | None:
        """Under round robin the group whose request is served next; None: any."""
        if not self.round_robin:
            return None
        skip = self.stopped | set(self.parked) | self.left_out
        for _ in range(self.n):
            if self.next_rr not in skip:
                return self.next_rr
            self.next_rr = (self.next_rr + 1) % self.n
        return None

    def served(self, g: int, is_eval: bool) -> None:
        """A request of group g is being served: round robin moves on past g (not for an evaluation)."""
        if self.round_robin and not is_eval:
            self.next_rr = (g + 1) % self.n

    def hold(self, g: int, reply: Callable[[], list[Any]], commit: bool) -> list[Any]:
        """Group g's replies now, or under order: rounds held until the round is complete
        (`release`): one round of pushes from one pull, merged, then answered together. Once
        rounds are off (server.order_by_lr), replies still held go out with the next."""
        if not self.rounds:
            held, self.held = self.held, {}
            return [out for h in sorted(held) for out in held[h][1]()] + reply()
        self.held[g] = (commit, reply)
        return self.release()

    def park(self, g: int) -> None:
        """Group g committed into a checkpoint barrier: it waits for the checkpoint. Under order:
        rounds so do the groups held with a commit of the same round (released now, they would
        start a task of the next round alone)."""
        self.parked.append(g)
        for h in [h for h, (commit, _) in self.held.items() if commit]:
            del self.held[h]
            self.parked.append(h)

    def release(self) -> list[Any]:
        """The held replies, made now in group order, once no active group is still to push
        (parked groups wait for their checkpoint; the driver also asks after a group is left out)."""
        held = self.held
        if not held or any(g not in held and g not in self.parked for g in self.active()):
            return []
        self.held = {}
        return [out for g in sorted(held) for out in held[g][1]()]
