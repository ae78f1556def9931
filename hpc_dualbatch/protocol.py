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
    L -> S  TAG_REQ  header(kind=MERGE)
    L -> S  TAG_W    float32[n_weights]                   the group's weights (parameters, then buffers)
    S -> L  reply as above, status CONTINUE: same task, merged weights
    ... after the last part:
    L -> S  TAG_REQ  header(kind=PUSH, stats...)          the task's commit
    L -> S  TAG_W    float32[n_weights]
    S -> L  reply as above (RUN with the next task, or STOP)
    L -> S  TAG_REQ  header(kind=EVAL, ...)               after evaluating a reply's weights
    L -> S  TAG_BN   float32[n_buffers]                   the BN buffers that evaluation used
                                                          (when the reply asked: eval_epoch >= 0)
Checkpoint barrier (every `checkpoint.every_epochs`, and on SIGTERM/SIGUSR1)::

    S -> L  TAG_REP  header(status=SEND_STATE)            instead of the reply to a PUSH
    L -> S  TAG_OPT  float32[n_params]                    the group's momentum buffers
    S -> L  reply as above, once every group's state is in and the checkpoint is written

Messages between one pair of ranks with one tag arrive in the order sent (MPI
non-overtaking rule), which is what keeps the weights after their header.
Headers are float64 arrays of fixed length: integers up to 2**53 are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import numpy as np

TAG_REQ = 11  # leader -> server header
TAG_REP = 12  # server -> leader header
TAG_W = 13  # weights, either way
TAG_OPT = 14  # optimiser (momentum) state, either way
TAG_BN = 15  # batch-norm buffers, either way

HDR_LEN = 16


class Kind(IntEnum):  # request kinds, leader -> server
    HELLO = 1
    PUSH = 2
    EVAL = 3
    MERGE = 4  # a push inside a task (server.push_every): merged, answered CONTINUE


class Status(IntEnum):  # reply status, server -> leader
    RUN = 1
    STOP = 2
    SEND_STATE = 3
    CONTINUE = 4  # reply to MERGE: keep training the same task from the merged weights


class Req(IntEnum):  # field positions in a request header
    KIND = 0
    GROUP = 1
    ROUND = 2  # the group's mini-epoch counter of the work pushed
    SAMPLES = 3
    SECONDS = 4  # wall seconds of the mini-epoch (training only)
    LOSS = 5  # mean training loss of the mini-epoch
    ACC = 6  # training accuracy of the mini-epoch
    EVAL_EPOCH = 7
    EVAL_LOSS = 8
    EVAL_ACC = 9
    EVAL_SAMPLES = 10
    EVAL_SECONDS = 11
    PREEMPT = 12  # 1 when the group got SIGTERM/SIGUSR1: the server checkpoints and stops
    EVAL_RESOLUTION = 13  # px the evaluation ran at (the current training resolution)
    EVAL_BN_SECONDS = 14  # wall seconds of the BN recalibration before the evaluation (0: none)
    WAIT = 15  # wall seconds the task spent in MERGE exchanges (not in SECONDS)


class Rep(IntEnum):  # field positions in a reply header
    STATUS = 0
    LR = 1
    RESOLUTION = 2
    BATCH = 3  # the group's batch (split across its ranks)
    SAMPLES = 4  # the group's samples this mini-epoch: d_L, d_S or a share adaptive planning cut
    EPOCH = 5  # global progress, commits / n_groups
    COMMITS = 6
    ROUND = 7  # the group's mini-epoch counter for this task (seeds its data order)
    DROPOUT = 8
    EVAL_EPOCH = 9  # >= 0: evaluate the weights of this reply and report them as this epoch
    HAS_STATE = 10  # 1: a TAG_OPT buffer follows (resume)
    PUSHES = 11  # pushes in this task (MERGE x (PUSHES - 1), then PUSH)


def request(kind: Kind, group: int) -> np.ndarray:
    h = np.zeros(HDR_LEN, dtype=np.float64)
    h[Req.KIND], h[Req.GROUP], h[Req.EVAL_EPOCH] = kind, group, -1
    return h


def reply(status: Status) -> np.ndarray:
    h = np.zeros(HDR_LEN, dtype=np.float64)
    h[Rep.STATUS], h[Rep.EVAL_EPOCH] = status, -1
    return h


Until = float | Callable[[], float | None] | None  # a time.perf_counter() deadline, None: none


class Backoff:
    """A sleeping wait: test, then sleep min_s, 2*min_s, ... up to max_s.

    A blocking MPI receive in Open MPI spins a core at 100 %; on a node whose
    cores also run the workers that steals their compute. The sleep bounds the
    added latency per message by max_s.
    """

    def __init__(self, min_s: float = 0.0002, max_s: float = 0.02) -> None:
        self.min_s, self.max_s = min_s, max_s

    def wait(self, req: Any, until: Until = None) -> Any:
        """Wait for one mpi4py request; returns its status, or None once time.perf_counter()
        passes `until` (a value, or a function asked before each sleep; the request is then
        still pending)."""
        from mpi4py import MPI

        status = MPI.Status()
        delay = self.min_s
        while not req.Test(status):  # MPI: non-blocking test of the pending message
            limit = until() if callable(until) else until
            if limit is not None and time.perf_counter() >= limit:
                return None
            time.sleep(delay)
            delay = min(2 * delay, self.max_s)
        return status


CANCEL_S = 1.0  # how long a timed-out receive may take to complete its cancellation, seconds


def recv(comm: Any, buf: np.ndarray, source: int, tag: int, backoff: Backoff, until: Until = None) -> Any:
    """Receive into `buf` without spinning; returns the status. With `until` (a
    time.perf_counter() value) returns None if nothing came by then: the receive is cancelled,
    or, where a message had begun to arrive and does not finish within CANCEL_S, abandoned
    (MPI may still write into `buf`: do not use it again)."""
    req = comm.Irecv(buf, source=source, tag=tag)  # MPI
    status = backoff.wait(req, until)
    if status is not None:
        return status
    req.Cancel()  # MPI: a matched message cannot be cancelled; it completes instead
    status = backoff.wait(req, time.perf_counter() + CANCEL_S)
    if status is None:
        _ABANDONED.append((req, buf))  # MPI may still write into buf: keep both alive
    return None if status is None or status.Is_cancelled() else status


_ABANDONED: list[tuple[Any, np.ndarray]] = []  # receives given up on (the process ends soon after)


def send(comm: Any, buf: np.ndarray, dest: int, tag: int, backoff: Backoff, until: Until) -> bool:
    """Send `buf` without spinning; False if it was not taken by `until` (a time.perf_counter()
    value): the send is then abandoned (a receiver that never comes back never reads it)."""
    req = comm.Isend(buf, dest=dest, tag=tag)  # MPI
    if backoff.wait(req, until) is not None:
        return True
    _ABANDONED.append((req, buf))  # MPI may still read buf: keep both alive
    return False


def bcast(comm: Any, buf: np.ndarray, backoff: Backoff, root: int = 0) -> None:
    """Broadcast inside a group without spinning (peers may wait a whole server round trip)."""
    backoff.wait(comm.Ibcast(buf, root=root))  # MPI: group communicator
