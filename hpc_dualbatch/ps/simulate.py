"""A discrete-event model of a parameter-server run: groups, server shards, the exchange between
them, and the sleeping waits of both ends. Pure Python, no MPI: it predicts what one machine
cannot run (hundreds of groups, several shards) from costs one machine can measure, and is
checked against real runs at 2-6 ranks (`commands/simulate.py check`).

What it models, per push (each group pushes `pushes` times per task; the last push is the commit):

1. The group computes one part of its task: `compute` seconds (a trace of measured task times,
   or a mean with random spread), then its leader computes its update and, after the reply,
   copies it (`update_s_per_float` x P, or the handling a run measured, `leader_s`; counted
   before the push) and sends the request header and (a blocking send) its update.
2. Each of the S shards (equal contiguous slices of the P weights) serves its requests one at a
   time, in arrival order, as `server_loop.serve` does. An idle shard sleeps in `Backoff`
   (`protocol.next_sleep`: a tenth of the wait so far, `poll_min` .. `poll_max`; a wait restarts
   every `TICK_S`; with `predict`, server.poll_predict, it also wakes when the earliest
   expected request is due, `protocol.Arrivals`, and counts its wait from there), so it sees a
   request at its first wake-up at or after the arrival, plus
   `wake` (the delay before a woken process runs); a busy shard sees the next queued request as
   soon as it is done.
3. Serving: the shard copies the slice in at its next test (latency + 4P/S bytes at
   `bandwidth`), merges it (`merge_s_per_float` x P/S) and hands the reply to MPI. The leader,
   asleep in its own `Backoff` since its send returned, copies the reply at its next wake-up plus
   `worker_wake` (a worker's Python thread waits for the GIL its data loader may hold: up to
   `sys.getswitchinterval()`, which worker ranks set to 0.5 ms). With replies in flight (as
   `server_loop` now sends them) the BN buffers come with the header and the shard serves on at
   once; with `blocking_replies` (the server before `protocol.InFlight`) the shard sends the BN
   buffers only once it has seen the parameters taken (at its own next wake-up), and the leader
   sees them at its next one.
4. The leader's link carries the whole push and pull (8P bytes): the exchange takes at least
   that. The group's other ranks, asleep in a `Backoff` broadcast since the part ended, resume at
   their next wake-up after the leader. With `overlap` (server.overlap) a push inside a task does
   not stop the group: its next part starts at once, and when that part ends the group waits for
   the reply if it has not come (the task's last push stays blocking). With `rounds`
   (server.order: rounds) a push is answered only once every group with a task has pushed: each
   group's reply comes when the round's last would (`roster.Roster.hold`).
5. After a commit that closes an epoch (every n commits) the committing group evaluates
   (`evals`: seconds, from the trace or a constant), then pulls the weights merged meanwhile
   (one copy of P floats over its link; the shards only hand that reply to MPI, left out)
   before its next part.

What it leaves out: checkpoints (barriers), adaptive re-planning (a trace holds its outcome),
contention between groups for the leaders' links, and the allreduce inside a group (part of the
measured compute). Outputs (`Outcome`): wall time, commits per second, each shard's busy share,
the groups' mean exchange seconds per push, and samples per second where the caller gives samples.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hpc_dualbatch.ps.protocol import Arrivals, sleep_until_due

TICK_S = 1.0  # server_loop.TICK_S: a shard's wait for the next request restarts this often


def next_wake(
    since: float,
    at: float,
    poll_min: float,
    poll_max: float,
    tick: float = math.inf,
    due: float | None = None,
) -> float:
    """The first time at or after `at` that a `protocol.Backoff` wait begun at `since` tests its
    request: at since, then after each sleep of `protocol.sleep_until_due` (expecting it at
    `due`, or not); a wait that restarts every `tick` seconds begins its sleeps again."""
    if at <= since:
        return since
    if math.isfinite(tick):
        since += math.floor((at - since) / tick) * tick
    t = since
    while t < at:
        delay = sleep_until_due(t, since, due, poll_min, poll_max)
        if delay >= poll_max:  # from here every poll_max, but for one test at `due` if it is ahead
            if due is None or due <= t or at <= due:
                test = t + math.ceil((at - t) / poll_max) * poll_max
                return test if due is None or due <= t else min(test, due)
            t += max(1, math.floor((due - t) / poll_max)) * poll_max
            continue
        t += delay
    return t


@dataclass(frozen=True)
class Link:
    """What moving and merging weights costs: one direction of a link, and the merge."""

    bandwidth: float  # bytes/s of one transfer
    latency: float = 0.0  # s per message
    merge_s_per_float: float = 0.0  # the server's merge (norm + fold) per weight, s
    # the leader's own arithmetic per weight, s: its update w_i - w_pulled before the push and its
    # copy of the reply after it (under overlap the update and the fold-in of the reply)
    update_s_per_float: float = 0.0

    def transfer(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class SimTask:
    seconds: float  # of training (the exchanges excluded), split evenly over its pushes
    pushes: int = 1  # server.push_every's split of the task (the last push is the commit)
    samples: int = 0


@dataclass(frozen=True)
class SimGroup:
    ranks: int  # ranks of the group (the leader and ranks - 1 peers)
    tasks: Sequence[SimTask]  # in order, cycled when the run is longer


@dataclass(frozen=True)
class SimInput:
    groups: Sequence[SimGroup]
    floats: int  # P: weights per push (parameters and BN buffers)
    link: Link
    tasks: int  # tasks in the run (commits), handed out as in the server: while any remain
    shards: int = 1
    poll_min: float = 0.0002  # server.poll_min_s
    poll_max: float = 0.005  # server.poll_max_s
    # mean s from a wake-up to running, drawn uniform in [0, 2x]: a server shard (its node's
    # scheduling delay) and a worker (the GIL its loader thread may hold, the node)
    wake: float = 0.0
    worker_wake: float = 0.0
    evals: Sequence[float] = ()  # seconds of the evaluation after commit n, 2n, ... (cycled)
    spread: float = 0.0  # relative s.d. of a part's compute (lognormal), 0: the trace as is
    seed: int = 0
    # False: a shard hands its reply to MPI and serves on (server_loop: protocol.InFlight); True:
    # it waits for the reply to be taken before the next request (the server before InFlight)
    blocking_replies: bool = False
    # server.overlap: a group trains its next part while a push inside its task travels, and
    # waits for that push's reply only when the next part ends
    overlap: bool = False
    # server.order: rounds: every push is answered once each group with a task has pushed (its
    # reply then comes with the round's last); modelled without overlap only
    rounds: bool = False
    # server.poll_predict: a waiting shard also wakes when a request is due (protocol.Arrivals)
    predict: bool = True
    # The leader's own handling of a push, s (its update and norm, packing, loading the reply into
    # the model), as a run measured it; None: the link's arithmetic (update_s_per_float x P)
    leader_s: float | None = None


@dataclass
class Outcome:
    wall: float  # s from the first part's start to the last commit
    commits: int
    pushes: int
    busy: list[float]  # each shard's busy seconds
    exchange: float  # s the groups spent in exchanges, summed
    samples: int = 0
    mid_exchange: float = 0.0  # s of the pushes inside a task (what a commit record's `wait` sums)
    mid_pushes: int = 0
    compute: float = 0.0  # s the groups trained, summed
    active: float = 0.0  # s from the start to each group's last commit, summed over the groups

    @property
    def training_share(self) -> float:
        """Of the groups' time until their last commit, the share spent training: what the run
        keeps of the throughput the same groups reach without a server (and without the idle
        tail at the end of a finite run, when groups run out of tasks)."""
        return self.compute / self.active if self.active > 0 else 0.0

    @property
    def commits_per_s(self) -> float:
        return self.commits / self.wall if self.wall > 0 else 0.0

    @property
    def busy_share(self) -> float:
        """The busiest shard's busy share of the run."""
        return max(self.busy) / self.wall if self.wall > 0 else 0.0

    @property
    def exchange_per_push(self) -> float:
        return self.exchange / self.pushes if self.pushes else 0.0

    @property
    def mid_exchange_per_push(self) -> float:
        return self.mid_exchange / self.mid_pushes if self.mid_pushes else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall if self.wall > 0 else 0.0


def simulate(sim: SimInput) -> Outcome:
    """Run the model until `sim.tasks` tasks are committed (see the module docstring)."""
    n, S = len(sim.groups), sim.shards
    if n < 1 or S < 1 or sim.tasks < 1 or sim.floats < 1:
        raise ValueError(
            f"need groups, shards, tasks and floats >= 1; got {n}, {S}, {sim.tasks}, {sim.floats}"
        )
    if sim.rounds and sim.overlap:
        raise ValueError("the model covers order: rounds without server.overlap only")
    rng = random.Random(sim.seed)
    tr = sim.link.transfer(4.0 * sim.floats / S)  # one slice, one way
    merge = sim.link.merge_s_per_float * sim.floats / S
    pull = sim.link.transfer(4.0 * sim.floats)  # the whole model one way on the leader's link
    leader_link = 2 * pull  # the whole push and pull
    # the leader's own part of a push, on the group's time whether the push is overlapped or not
    leader_math = sim.leader_s if sim.leader_s is not None else sim.link.update_s_per_float * sim.floats
    waits = (sim.poll_min, sim.poll_max)
    free = [0.0] * S  # when each shard finished its last request (and began waiting again)
    busy = [0.0] * S
    issued, commits, pushes, samples, mid, mid_pushes = 0, 0, 0, 0, 0.0, 0
    computed, last_commit = 0.0, [0.0] * n
    replied = [0.0] * n  # overlap: when the reply to each group's push in flight is taken
    current: list[SimTask] = [SimTask(0.0)] * n  # the task each group trains
    taken = [0] * n  # tasks each group has taken
    exchange, wall = 0.0, 0.0
    in_task: set[int] = set()  # groups with a task not yet committed
    # order: rounds: group -> (part, its end, its reply, when the server handed its merge's reply to MPI)
    held: dict[int, tuple[int, float, float, float]] = {}
    arrivals = Arrivals()  # predict: what the server expects, from shard 0's replies and sightings

    def late(mean: float) -> float:
        return rng.uniform(0.0, 2.0 * mean) if mean > 0 else 0.0

    def part_seconds(g: int) -> float:
        task = current[g]
        t = task.seconds / task.pushes
        return t * rng.lognormvariate(-(sim.spread**2) / 2, sim.spread) if sim.spread > 0 else t

    def start_part(g: int, at: float, part: int) -> None:
        nonlocal seq, computed
        seq += 1
        t = part_seconds(g)
        computed += t
        heapq.heappush(events, (at + t, seq, g, part))

    def take(g: int, at: float) -> None:
        nonlocal issued
        tasks = sim.groups[g].tasks
        current[g] = tasks[taken[g] % len(tasks)]
        taken[g] += 1
        issued += 1
        in_task.add(g)
        start_part(g, at, 0)

    def answered(g: int, part: int, t_end: float, done: float) -> None:
        """Group g's push after `part` (ended at t_end) is answered at `done`: it trains on."""
        nonlocal exchange, mid, mid_pushes, commits, samples, wall
        exchange += done - t_end
        if part < current[g].pushes - 1:  # a push inside the task
            mid_pushes += 1
            mid += done - t_end
            start_part(g, done, part + 1)
            return
        commits += 1
        samples += current[g].samples
        wall = max(wall, done)
        last_commit[g] = done
        in_task.discard(g)
        if sim.evals and commits % n == 0:  # this commit closed an epoch: its group evaluates
            done += sim.evals[(commits // n - 1) % len(sim.evals)] + pull
        if issued < sim.tasks:
            take(g, done)

    # events: (time the part ends, tie-break, group, part index within its task)
    events: list[tuple[float, int, int, int]] = []
    seq = 0
    for g in range(min(n, sim.tasks)):  # every group is handed a task at the start (HELLO)
        take(g, 0.0)
    while events:
        t_end, _, g, part = heapq.heappop(events)
        if replied[g] > t_end:  # overlap: the part is done, the reply to the push before it is not
            mid += replied[g] - t_end
            exchange += replied[g] - t_end
            seq += 1
            heapq.heappush(events, (replied[g], seq, g, part))
            continue
        t0 = t_end + leader_math  # the leader's arithmetic, then the push leaves
        done = t0 + leader_link
        # predict: the earliest request due of the groups answered since they last pushed
        due = arrivals.due() if sim.predict else None
        posted = 0.0
        for s in range(S):  # each shard serves this push's slice
            if free[s] <= t0:  # asleep waiting: sees the header at a wake-up
                seen = next_wake(free[s], t0, *waits, TICK_S, due) + late(sim.wake)
            else:  # busy: takes the queued request as soon as it is free
                seen = free[s]
            if s == 0:
                arrivals.request(g, seen)
            lead = seen + tr  # the leader's blocking send returns once the shard copied the slice
            post = next_wake(seen, lead, *waits) + merge  # received at its test, merged, handed to MPI
            reply = next_wake(lead, post, *waits) + late(sim.worker_wake) + tr  # the leader copies the reply
            if sim.blocking_replies:  # BN buffers only after the shard saw the parameters taken
                free[s] = next_wake(post, reply, *waits) + late(sim.wake)
                reply = next_wake(reply, free[s], *waits) + late(sim.worker_wake)
            else:
                free[s] = post
            busy[s] += free[s] - seen
            done = max(done, reply)
            if s == 0:
                posted = post
        if sim.groups[g].ranks > 1:  # the peers, asleep in a broadcast since t0, resume at their next wake
            done = next_wake(t0, done, *waits) + late(sim.worker_wake)
        pushes += 1
        if not sim.rounds:
            arrivals.reply(g, posted)
        if sim.overlap and part < current[g].pushes - 1:  # the group trains on; the reply is
            mid_pushes += 1  # waited for when the next part ends
            replied[g] = done
            mid += leader_math
            exchange += leader_math
            start_part(g, t0, part + 1)
            continue
        if not sim.rounds:
            answered(g, part, t_end, done)
            continue
        held[g] = (part, t_end, done, posted)  # order: rounds: answered once every group with a task pushed
        if len(held) == len(in_task):
            release = max(d for _, _, d, _ in held.values())  # the last reply of the round
            out = max(q for _, _, _, q in held.values())  # handed to MPI with the round's last push
            for h, (p, t, _, _) in sorted(held.items()):
                arrivals.reply(h, out)
                answered(h, p, t, release)
            held.clear()
    active = sum(last_commit)
    return Outcome(wall, commits, pushes, busy, exchange, samples, mid, mid_pushes, computed, active)
