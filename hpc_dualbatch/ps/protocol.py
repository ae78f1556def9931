"""The parameter-server protocol: message tags, header layouts, and waiting without spinning.

All messages travel on COMM_WORLD between the server (rank 0) and the leader
(group rank 0) of each worker group, as uppercase mpi4py buffer messages
(`Send`/`Irecv` of numpy arrays: no pickles of tensors).

Conversation of one group leader (L) with the server (S)::

    L -> S  TAG_REQ  header(kind=HELLO)                   first request of a run
    S -> L  TAG_REP  header(status=RUN|STOP, stage...)    the answer to every request
    S -> L  TAG_W    float32[n_params]                    the global parameters
    S -> L  TAG_BN   float32[n_buffers]                   BN buffers: global, or the group's own (bn: local)
    S -> L  TAG_OPT  float32[n_params]                    only if reply has_state (resume)
    ... the group trains one mini-epoch (one task) in `pushes` parts; after each part but the last:
    L -> S  TAG_REQ  header(kind=MERGE, norm)             norm: of the pushed parameters (update
                                                          or weights), measured by the leader
    L -> S  TAG_W    float32[n_weights]                   the group's parameters (server.merge delta,
                                                          nova: their update since the pull), then
                                                          its BN buffers
    S -> L  reply as above, status CONTINUE: same task, merged weights
    ... after the last part:
    L -> S  TAG_REQ  header(kind=PUSH, stats..., norm)    the task's commit; stats: samples, seconds,
                                                          loss, the exchanges' wait (and of it the
                                                          server's part), the leader's sleeps and
                                                          their lateness
    L -> S  TAG_W    float32[n_weights]
    S -> L  reply as above (RUN with the next task, or STOP)
    L -> S  TAG_REQ  header(kind=EVAL, ...)               after evaluating a reply's weights
    L -> S  TAG_BN   float32[n_buffers]                   the BN buffers that evaluation used
                                                          (when the reply asked: eval_epoch >= 0)
    S -> L  reply as above, status CONTINUE               unless the reply was STOP: the weights
                                                          merged meanwhile, which the task trains from
The final evaluation, shared (`evaluation.py`: under server.bn recalibrate, several groups)::

    S -> L  reply STOP (eval_epoch, eval_slot, eval_slots) to every group, once all have run out
                                                          of tasks (until then, no reply)
    L -> S  TAG_REQ  header(kind=STATS)                   after recalibrating on its slots' part
    L -> S  TAG_BN   float32[n_buffers]                   the group's BN statistics
    S -> L  TAG_REP  header(status=STOP, ...)             once every group's are in
    S -> L  TAG_BN   float32[n_buffers]                   their mean over all ranks
    L -> S  EVAL as above, on its slots' part of the test split
Checkpoint barrier (every `checkpoint.every_epochs`, and on SIGTERM/SIGUSR1)::

    S -> L  TAG_REP  header(status=SEND_STATE)            instead of the reply to a PUSH
    L -> S  TAG_OPT  float32[n_params]                    the group's momentum buffers
    S -> L  reply as above, once every group's state is in and the checkpoint is written

With `server.shards` S > 1 the server is ranks 0 .. S-1, each owning a contiguous slice of the
flat weights (`shards.py`): headers (TAG_REQ, TAG_REP) and an evaluation's BN buffers go to
and from rank 0 only; every weight, BN-buffer and momentum message above goes to (or comes
from) each shard, shard s with its slice, in shard order.

Messages between one pair of ranks with one tag arrive in the order sent (MPI
non-overtaking rule), which is what keeps the weights after their header.
Headers are float64 arrays of fixed length (integers up to 2**53 are exact), written and read
only by the typed messages below: `Request` (with an `Evaluation`) and `Task` (the reply).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Optional, Union

import numpy as np

TAG_REQ = 11  # leader -> server header
TAG_REP = 12  # server -> leader header
TAG_W = 13  # weights, either way
TAG_OPT = 14  # optimiser (momentum) state, either way
TAG_BN = 15  # batch-norm buffers, either way

HDR_LEN = 20


class Kind(IntEnum):  # request kinds, leader -> server
    HELLO = 1
    PUSH = 2
    EVAL = 3
    MERGE = 4  # a push inside a task (server.push_every): merged, answered CONTINUE
    STATS = 5  # a shared final evaluation's BN statistics of one group (evaluation.py)


class Status(IntEnum):  # reply status, server -> leader
    RUN = 1
    STOP = 2
    SEND_STATE = 3
    CONTINUE = 4  # reply to MERGE: keep training the same task from the merged weights


class Req(IntEnum):  # wire positions of `Request`'s fields
    KIND = 0
    GROUP = 1
    ROUND = 2
    SAMPLES = 3
    SECONDS = 4
    LOSS = 5
    ACC = 6
    EVAL_EPOCH = 7
    EVAL_LOSS = 8
    EVAL_ACC = 9
    EVAL_SAMPLES = 10
    EVAL_SECONDS = 11
    PREEMPT = 12
    EVAL_RESOLUTION = 13
    EVAL_BN_SECONDS = 14
    WAIT = 15
    NORM = 16
    SLEEPS = 17
    LATE = 18
    WAITED = 19


class Rep(IntEnum):  # wire positions of `Task`'s fields
    STATUS = 0
    LR = 1
    RESOLUTION = 2
    BATCH = 3
    SAMPLES = 4
    EPOCH = 5
    COMMITS = 6
    ROUND = 7
    DROPOUT = 8
    EVAL_EPOCH = 9
    HAS_STATE = 10
    PUSHES = 11
    LR_EPOCH = 12
    EVAL_SLOT = 13
    EVAL_SLOTS = 14


@dataclass(frozen=True)
class Evaluation:
    """The result of evaluating the weights of a reply that asked for it (EVAL request)."""

    epoch: float  # the epoch the reply named (Task.eval_epoch)
    loss: float
    acc: float
    samples: int
    seconds: float
    resolution: int  # px it ran at (the current training resolution)
    bn_seconds: float = 0.0  # BN recalibration before it (0: none)


@dataclass(frozen=True)
class Request:
    """Leader -> server header: HELLO; MERGE (a push inside a task) and PUSH (a task's commit)
    with the task's statistics; EVAL with an `Evaluation`."""

    kind: Kind
    group: int
    round: int = 0  # the group's task counter of the work pushed
    samples: int = 0  # samples the task trained (group sum)
    seconds: float = 0.0  # wall seconds of the task's training
    loss: float = 0.0  # mean training loss of the task
    acc: float = 0.0  # training accuracy of the task
    preempt: bool = False  # a rank of the group got SIGTERM/SIGUSR1
    wait: float = 0.0  # seconds the task spent in its MERGE exchanges (not in `seconds`)
    evaluation: Evaluation | None = None
    norm: float = 0.0  # MERGE, PUSH: L2 norm of the pushed parameters' part (flat.push_body)
    # PUSH: the leader's sleeping waits since its last commit (`Backoff.sleeps`, `Backoff.late`):
    # how late a waiting worker of this node runs again, the wake-up `simulate check` replays
    sleeps: int = 0
    late: float = 0.0  # seconds, summed over those sleeps
    # PUSH: of `wait`, the seconds from each push's header to its reply's weights in hand (the
    # server's part: its notice, the transfers, the merge); the rest is the leader's own handling
    waited: float = 0.0

    def pack(self) -> np.ndarray:
        h = np.zeros(HDR_LEN, np.float64)
        h[Req.KIND], h[Req.GROUP], h[Req.ROUND], h[Req.SAMPLES] = (
            self.kind,
            self.group,
            self.round,
            self.samples,
        )
        h[Req.SECONDS], h[Req.LOSS], h[Req.ACC] = self.seconds, self.loss, self.acc
        h[Req.PREEMPT], h[Req.WAIT], h[Req.EVAL_EPOCH], h[Req.NORM] = self.preempt, self.wait, -1, self.norm
        h[Req.SLEEPS], h[Req.LATE], h[Req.WAITED] = self.sleeps, self.late, self.waited
        if (e := self.evaluation) is not None:
            h[Req.EVAL_EPOCH], h[Req.EVAL_LOSS], h[Req.EVAL_ACC] = e.epoch, e.loss, e.acc
            h[Req.EVAL_SAMPLES], h[Req.EVAL_SECONDS] = e.samples, e.seconds
            h[Req.EVAL_RESOLUTION], h[Req.EVAL_BN_SECONDS] = e.resolution, e.bn_seconds
        return h

    @classmethod
    def unpack(cls, h: np.ndarray) -> Request:
        kind = Kind(int(h[Req.KIND]))
        evaluation = None
        if kind == Kind.EVAL:
            evaluation = Evaluation(
                float(h[Req.EVAL_EPOCH]),
                float(h[Req.EVAL_LOSS]),
                float(h[Req.EVAL_ACC]),
                int(h[Req.EVAL_SAMPLES]),
                float(h[Req.EVAL_SECONDS]),
                int(h[Req.EVAL_RESOLUTION]),
                float(h[Req.EVAL_BN_SECONDS]),
            )
        return cls(
            kind,
            int(h[Req.GROUP]),
            int(h[Req.ROUND]),
            int(h[Req.SAMPLES]),
            float(h[Req.SECONDS]),
            float(h[Req.LOSS]),
            float(h[Req.ACC]),
            bool(h[Req.PREEMPT]),
            float(h[Req.WAIT]),
            evaluation,
            float(h[Req.NORM]),
            int(h[Req.SLEEPS]),
            float(h[Req.LATE]),
            float(h[Req.WAITED]),
        )


@dataclass(frozen=True)
class Task:
    """Server -> leader header, the answer to every request but EVAL: what the group does next."""

    status: Status
    lr: float = 0.0
    resolution: int = 0  # px
    batch: int = 0  # the group's batch (split across its ranks)
    samples: int = 0  # the group's samples this task: d_L, d_S or a share adaptive planning cut
    epoch: float = 0.0  # global progress, commits / n_groups
    commits: int = 0
    round: int = 0  # the group's task counter for this task (seeds its data order)
    dropout: float = 0.0
    eval_epoch: float = -1.0  # >= 0: evaluate this reply's weights and report them as this epoch
    has_state: bool = False  # a TAG_OPT buffer follows (resume)
    pushes: int = 1  # pushes in this task (MERGE x (pushes - 1), then PUSH)
    lr_epoch: float = 0.0  # the fractional epoch `lr` is the rate at (schedule.warmup_ramp: step)
    eval_slot: int = 0  # a shared final evaluation: the group's first slot (one per rank) ...
    eval_slots: int = 0  # ... of this many; 0: the group evaluates alone, over its own ranks

    def pack(self) -> np.ndarray:
        h = np.zeros(HDR_LEN, np.float64)
        h[Rep.STATUS], h[Rep.LR], h[Rep.RESOLUTION], h[Rep.BATCH] = (
            self.status,
            self.lr,
            self.resolution,
            self.batch,
        )
        h[Rep.SAMPLES], h[Rep.EPOCH], h[Rep.COMMITS], h[Rep.ROUND] = (
            self.samples,
            self.epoch,
            self.commits,
            self.round,
        )
        h[Rep.DROPOUT], h[Rep.EVAL_EPOCH], h[Rep.HAS_STATE], h[Rep.PUSHES] = (
            self.dropout, self.eval_epoch, self.has_state, self.pushes,
        )  # fmt: skip
        h[Rep.LR_EPOCH], h[Rep.EVAL_SLOT], h[Rep.EVAL_SLOTS] = self.lr_epoch, self.eval_slot, self.eval_slots
        return h

    @classmethod
    def unpack(cls, h: np.ndarray) -> Task:
        return cls(
            Status(int(h[Rep.STATUS])),
            float(h[Rep.LR]),
            int(h[Rep.RESOLUTION]),
            int(h[Rep.BATCH]),
            int(h[Rep.SAMPLES]),
            float(h[Rep.EPOCH]),
            int(h[Rep.COMMITS]),
            int(h[Rep.ROUND]),
            float(h[Rep.DROPOUT]),
            float(h[Rep.EVAL_EPOCH]),
            bool(h[Rep.HAS_STATE]),
            int(h[Rep.PUSHES]),
            float(h[Rep.LR_EPOCH]),
            int(h[Rep.EVAL_SLOT]),
            int(h[Rep.EVAL_SLOTS]),
        )


# a time.perf_counter() deadline, or a function giving it (asked again while waiting); None: none
# (typing.Union: this alias is evaluated at import, and the package supports Python 3.9)
Until = Union[float, Callable[[], Optional[float]], None]


POLL_SHARE = 0.1  # a sleeping wait's sleep: at most this share of the wait so far (see next_sleep)


def next_sleep(waited: float, min_s: float, max_s: float) -> float:
    """How long a wait that has lasted `waited` seconds sleeps before its next test: a tenth of
    the wait so far, between min_s and max_s. So a message is noticed at most ~10 % (or min_s)
    after it arrives, where a doubling back-off noticed it up to 100 % late (bench exchange at
    ResNet-18 size: 14.0 -> 13.4 ms a push, the protocol alone 0.98x a raw round trip). A long
    idle wait still sleeps max_s per test: ~40 more tests than doubling over the first 50 ms."""
    return min(max_s, max(min_s, POLL_SHARE * waited))


def sleep_until_due(now: float, start: float, due: Optional[float], min_s: float, max_s: float) -> float:
    """`next_sleep` for a wait begun at `start` that expects its message at `due` (None: no
    expectation): it never sleeps past `due`, and once `due` has passed the wait counts from
    there, so a message that comes when expected is noticed within ~min_s however long the
    wait had lasted. A message earlier than `due` is noticed as without it."""
    if due is None:
        return next_sleep(now - start, min_s, max_s)
    if now < due:
        return min(next_sleep(now - start, min_s, max_s), due - now)
    return next_sleep(now - max(start, due), min_s, max_s)


EARLY_SHARE = 0.05  # a request is expected this share of its group's last turnaround early (jitter)


class Arrivals:
    """When the server next expects a request: a group's next one is due its last turnaround
    (reply handed to MPI -> its next request noticed) after its reply, less EARLY_SHARE of it.
    A turnaround is mostly the group's training between pushes, steady within a task; one after
    an evaluation or a task's end is longer or shorter, and then only costs a few tests."""

    def __init__(self) -> None:
        self.replied: dict[int, float] = {}  # group -> when its last reply was handed to MPI
        self.turn: dict[int, float] = {}  # group -> its last turnaround, seconds
        # (expected, group, its reply's time): a heap, O(log n) per request at any group count;
        # an entry whose group has spoken since (or was answered again) is dropped when it surfaces
        self.expected: list[tuple[float, int, float]] = []

    def reply(self, group: int, t: float) -> None:
        self.replied[group] = t
        if group in self.turn:
            heapq.heappush(self.expected, (t + (1 - EARLY_SHARE) * self.turn[group], group, t))

    def request(self, group: int, t: float) -> None:
        sent = self.replied.pop(group, None)
        if sent is not None:
            self.turn[group] = t - sent

    def due(self) -> Optional[float]:
        """The earliest expected request of the groups answered since they last spoke."""
        heap = self.expected
        while heap and self.replied.get(heap[0][1]) != heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


class Backoff:
    """A sleeping wait: test, then sleep `next_sleep` (min_s .. max_s), test again.

    A blocking MPI receive in Open MPI spins a core at 100 %; on a node whose
    cores also run the workers that steals their compute. The sleep bounds the
    added latency per message by max_s.
    """

    def __init__(self, min_s: float = 0.0002, max_s: float = 0.005) -> None:  # (server.poll_*_s)
        self.min_s, self.max_s = min_s, max_s
        # Every sleep and how far past its end the process ran again, summed (s): on a node with
        # more busy processes than cores a waking worker waits for a core (milliseconds), which
        # the exchange pays (`simulate check` replays a run with its own measured wake-up).
        self.sleeps, self.late = 0, 0.0

    def wait(self, req: Any, until: Until = None, due: Optional[float] = None) -> Any:
        """Wait for one mpi4py request; returns its status, or None once time.perf_counter()
        passes `until` (a value, or a function asked before each sleep; the request is then
        still pending). `due`: when the message is expected (`sleep_until_due`)."""
        from mpi4py import MPI

        status = MPI.Status()
        start = time.perf_counter()
        while not req.Test(status):  # MPI: non-blocking test of the pending message
            now = time.perf_counter()
            limit = until() if callable(until) else until
            if limit is not None and now >= limit:
                return None
            nap = sleep_until_due(now, start, due, self.min_s, self.max_s)
            time.sleep(nap)
            self.sleeps += 1
            self.late += time.perf_counter() - now - nap
        return status

    def late_ms(self) -> float:
        """Mean wake-up delay of the sleeps so far, ms (0 without any)."""
        return 1e3 * self.late / self.sleeps if self.sleeps else 0.0


CANCEL_S = 1.0  # how long a timed-out receive may take to complete its cancellation, seconds
_ABANDONED: list[tuple[Any, np.ndarray]] = []  # transfers given up on (the process ends soon after)


def recv(
    comm: Any,
    buf: np.ndarray,
    source: int,
    tag: int,
    backoff: Backoff,
    until: Until = None,
    due: Optional[float] = None,
) -> Any:
    """Receive into `buf` without spinning; returns the status. With `until` (a
    time.perf_counter() value) returns None if nothing came by then: the receive is cancelled,
    or, where a message had begun to arrive and does not finish within CANCEL_S, abandoned
    (MPI may still write into `buf`: do not use it again)."""
    req = comm.Irecv(buf, source=source, tag=tag)  # MPI
    status = backoff.wait(req, until, due)
    if status is not None:
        return status
    req.Cancel()  # MPI: a matched message cannot be cancelled; it completes instead
    status = backoff.wait(req, time.perf_counter() + CANCEL_S)
    if status is None:
        _ABANDONED.append((req, buf))  # MPI may still write into buf: keep both alive
    return None if status is None or status.Is_cancelled() else status


def send(comm: Any, buf: np.ndarray, dest: int, tag: int, backoff: Backoff, until: Until) -> bool:
    """Send `buf` without spinning; False if it was not taken by `until` (a time.perf_counter()
    value): the send is then abandoned (a receiver that never comes back never reads it)."""
    req = comm.Isend(buf, dest=dest, tag=tag)  # MPI
    if backoff.wait(req, until) is not None:
        return True
    _ABANDONED.append((req, buf))  # MPI may still read buf: keep both alive
    return False


class InFlight:
    """Sends handed to MPI and not yet known to be complete: the server posts a reply and serves
    the next request while the reply travels (a large message moves only when its receiver, asleep
    in its own Backoff, next tests it). `settle` waits for all of them before the server changes
    what they read (the next merge), each within the bound it was posted with."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, np.ndarray, int, Until]] = []

    def post(self, comm: Any, buf: np.ndarray, dest: int, tag: int, group: int, until: Until) -> None:
        """Start sending `buf` (kept alive until it completes) on behalf of `group`."""
        self.pending.append((comm.Isend(buf, dest=dest, tag=tag), buf, group, until))  # MPI

    def settle(self, backoff: Backoff) -> list[int]:
        """Wait for every posted send; returns the groups whose sends were not taken within their
        bound (abandoned: MPI may still read the buffers, which stay alive)."""
        late = []
        for req, buf, group, until in self.pending:
            if group in late:
                _ABANDONED.append((req, buf))
            elif backoff.wait(req, until) is None:
                _ABANDONED.append((req, buf))
                late.append(group)
        self.pending = []
        return late


def bcast(comm: Any, buf: np.ndarray, backoff: Backoff, root: int = 0) -> None:
    """Broadcast inside a group without spinning (peers may wait a whole server round trip)."""
    backoff.wait(comm.Ibcast(buf, root=root))  # MPI: group communicator
