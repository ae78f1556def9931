"""The asynchronous parameter server (rank 0).

It holds the global weights as one flat float32 buffer and serves the group
leaders' requests (protocol in `protocol.py`) as they arrive (`order:
arrival`), or in the fixed order 0, 1, ..., n-1, 0, ... (`order:
round_robin`, bit-for-bit reproducible). Each push is merged on arrival,

    w <- (w + f * w_i) / (1 + f)        (f = 1 for a large group, d_S/d_L, sqrt(d_S/d_L) or 1 for a small one)

and counted as one commit; n_groups commits make one epoch, and the learning
rate, resolution, batch size and dropout of the next task follow from the
commit count (`schedule.stage_for_commit`). Tasks are handed out until
epochs * n_groups have been issued, so every task issued is committed and no
work is thrown away; every later request is answered STOP.

Checkpoints are barriers: from a checkpoint commit on, each pushing group is
merged and parked (no reply) until every active group is parked; then each
sends its momentum, the server writes one checkpoint and releases them. The
barrier makes the saved state exactly the state the run continues from, so a
resumed `round_robin` run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import checkpoint as C
from . import protocol as P
from .config import Config
from .metrics import MetricsLog, Progress
from .schedule import lr_at, stage_for_commit


def merge(w: np.ndarray, wi: np.ndarray, f: float) -> None:
    """w <- (w + f*wi) / (1 + f), in place.

    Written as w + t*(wi - w) with t = f/(1+f): torch's lerp_ does that in one multi-threaded
    pass over both buffers, where the literal formula costs three numpy passes (the merge was
    the server's largest cost per push, see docs/scaling.md).
    """
    torch.from_numpy(w).lerp_(torch.from_numpy(wi), f / (1.0 + f))


@dataclass
class GroupSpec:
    share: int  # samples per mini-epoch (d_L or d_S)
    batch: dict[int, int]  # batch per resolution (B_L or B_S)
    factor: float  # contribution factor f
    small: bool


@dataclass
class ServerState:
    weights: np.ndarray
    momentum: np.ndarray  # (n_groups, n_params), sent to the groups on resume
    commits: int = 0
    rounds: list[int] = field(default_factory=list)  # mini-epochs handed to each group
    elapsed: float = 0.0  # training seconds before this process started (resume)
    pending_evals: dict[int, float] = field(default_factory=dict)  # group -> epoch to evaluate
    resumed: bool = False


class Server:
    def __init__(
        self, cfg: Config, topo: Any, groups: list[GroupSpec], state: ServerState, log: MetricsLog
    ) -> None:
        self.cfg, self.topo, self.groups, self.s, self.log = cfg, topo, groups, state, log
        self.n = len(groups)
        self.total = cfg.schedule.epochs * self.n
        self.back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
        self.hdr = np.zeros(P.HDR_LEN, np.float64)
        self.wbuf = np.empty_like(state.weights)
        self.stopped: set[int] = set()
        self.parked: list[int] = []  # groups waiting at a checkpoint barrier (merged, not answered)
        self.evals_due = 0  # STOP replies that asked for an evaluation not yet received
        self.barrier = False
        self.preempt = 0  # signal number that asked for a checkpoint and stop
        self.send_state = set(range(self.n)) if state.resumed else set()
        self.next_rr = 0
        self.task_stage: dict[int, tuple[float, int, int]] = {}  # (lr, px, batch) of each group's task
        self.t0 = time.perf_counter()
        self.progress = Progress()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.preempt = signum

    def wall(self) -> float:
        return self.s.elapsed + time.perf_counter() - self.t0

    # --- replies -------------------------------------------------------------
    def _reply(self, g: int, status: P.Status) -> None:
        s, spec = self.s, self.groups[g]
        rep = P.reply(status)
        stage = stage_for_commit(s.commits, self.n, self.cfg.schedule)
        # LR at the fractional epoch, so a warm-up ramps per commit, not per epoch.
        lr = lr_at(s.commits / self.n, self.cfg.schedule)
        rep[P.Rep.LR], rep[P.Rep.RESOLUTION], rep[P.Rep.DROPOUT] = lr, stage.resolution, stage.dropout
        rep[P.Rep.BATCH], rep[P.Rep.SAMPLES] = spec.batch[stage.resolution], spec.share
        rep[P.Rep.EPOCH], rep[P.Rep.COMMITS] = s.commits / self.n, s.commits
        if status == P.Status.RUN:
            rep[P.Rep.ROUND] = s.rounds[g]
            s.rounds[g] += 1
            self.task_stage[g] = (lr, stage.resolution, spec.batch[stage.resolution])
        if g in s.pending_evals and not self.preempt:
            rep[P.Rep.EVAL_EPOCH] = s.pending_evals.pop(g)
            if status == P.Status.STOP:
                self.evals_due += 1
        has_state = g in self.send_state
        rep[P.Rep.HAS_STATE] = 1 if has_state else 0
        dest = self.topo.leaders[g]
        world = self.topo.world
        world.Send(rep, dest=dest, tag=P.TAG_REP)  # PS: reply header
        world.Send(s.weights, dest=dest, tag=P.TAG_W)  # PS: global weights
        if has_state:
            world.Send(s.momentum[g], dest=dest, tag=P.TAG_OPT)  # PS: the group's momentum (resume)
            self.send_state.discard(g)
        if status == P.Status.STOP:
            self.stopped.add(g)

    def _answer(self, g: int) -> None:
        issued = sum(self.s.rounds)
        self._reply(g, P.Status.RUN if issued < self.total and not self.preempt else P.Status.STOP)

    # --- requests ------------------------------------------------------------
    def _on_push(self, g: int, src: int) -> None:
        s = self.s
        P.recv(self.topo.world, self.wbuf, src, P.TAG_W, self.back)  # PS: the group's weights
        merge(s.weights, self.wbuf, self.groups[g].factor)
        s.commits += 1
        h = self.hdr
        if h[P.Req.PREEMPT] and not self.preempt:
            self.preempt = signal.SIGTERM
        lr, res, batch = self.task_stage.get(g, (0.0, 0, 0))
        rec = {
            "type": "commit",
            "commit": s.commits,
            "epoch": s.commits / self.n,
            "group": g,
            "round": int(h[P.Req.ROUND]),
            "small": self.groups[g].small,
            "samples": int(h[P.Req.SAMPLES]),
            "seconds": round(float(h[P.Req.SECONDS]), 4),
            "train_loss": float(h[P.Req.LOSS]),
            "train_acc": float(h[P.Req.ACC]),
            "lr": lr,
            "resolution": res,
            "batch": batch,
            "wall": round(self.wall(), 3),
        }
        self.log.write(rec)
        self.progress.line(
            f"epoch {s.commits / self.n:7.2f}/{self.cfg.schedule.epochs} commit {s.commits}/{self.total} "
            f"group {g} {res}px batch {rec['batch']} loss {rec['train_loss']:.3f} "
            f"acc {rec['train_acc']:.3f} wall {rec['wall']:.0f}s"
        )
        if s.commits % self.n == 0:
            s.pending_evals[g] = s.commits / self.n  # this push closed an epoch: evaluate its result
        every = self.cfg.checkpoint.every_epochs * self.n
        if (every and s.commits % every == 0 and s.commits < self.total) or self.preempt:
            self.barrier = True
        if self.barrier:
            self.parked.append(g)
            self._maybe_checkpoint()
        else:
            self._answer(g)

    def _on_eval(self, g: int) -> None:
        h = self.hdr
        if g in self.stopped:
            self.evals_due -= 1
        rec = {
            "type": "eval",
            "epoch": float(h[P.Req.EVAL_EPOCH]),
            "group": g,
            "test_loss": float(h[P.Req.EVAL_LOSS]),
            "test_acc": float(h[P.Req.EVAL_ACC]),
            "samples": int(h[P.Req.EVAL_SAMPLES]),
            "seconds": round(float(h[P.Req.EVAL_SECONDS]), 4),
            "resolution": int(h[P.Req.EVAL_RESOLUTION]),
            "wall": round(self.wall(), 3),
        }
        self.log.write(rec)
        self.progress.line(
            f"epoch {rec['epoch']:7.2f} test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.4f} "
            f"({rec['resolution']}px, wall {rec['wall']:.0f}s)"
        )

    def _maybe_checkpoint(self) -> None:
        active = [g for g in range(self.n) if g not in self.stopped]
        if sorted(self.parked) != sorted(active):
            return
        s, world = self.s, self.topo.world
        for g in self.parked:  # every parked leader sends its group's momentum
            world.Send(P.reply(P.Status.SEND_STATE), dest=self.topo.leaders[g], tag=P.TAG_REP)  # PS
            P.recv(world, s.momentum[g], self.topo.leaders[g], P.TAG_OPT, self.back)  # PS: momentum
        self.save()
        parked, self.parked, self.barrier = self.parked, [], False
        for g in sorted(parked):
            self._answer(g)
        # A resumed run restarts with HELLOs from groups 0, 1, ...: so does the round-robin order here.
        self.next_rr = 0

    def save(self) -> str:
        s = self.s
        return C.save(
            self.cfg.out,
            C.Checkpoint(
                s.weights,
                s.momentum,
                s.commits,
                list(s.rounds),
                self.wall(),
                self.log.offset(),
                self.cfg.to_dict(),
                {"pending_evals": {str(g): e for g, e in s.pending_evals.items()}},
            ),
            keep=self.cfg.checkpoint.keep,
        )

    # --- main loop -------------------------------------------------------------
    def serve(self) -> str:
        """Serve until every group has been told STOP and its last evaluation is in.

        Returns "done" or "preempted".
        """
        world = self.topo.world
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        while len(self.stopped) < self.n or self.evals_due > 0:
            if self.preempt and not self.barrier and len(self.stopped) < self.n:
                self.barrier = True  # a signal: checkpoint at the next pushes, then stop
            if self.cfg.server.order == "round_robin" and len(self.stopped) < self.n:
                while self.next_rr in self.stopped or self.next_rr in self.parked:
                    self.next_rr = (self.next_rr + 1) % self.n
                src = self.topo.leaders[self.next_rr]
            else:
                src = MPI.ANY_SOURCE
            status = P.recv(world, self.hdr, src, P.TAG_REQ, self.back)  # PS: next request header
            g = int(self.hdr[P.Req.GROUP])
            kind = int(self.hdr[P.Req.KIND])
            if kind == P.Kind.EVAL:
                self._on_eval(g)
                continue
            if self.cfg.server.order == "round_robin":
                self.next_rr = (g + 1) % self.n
            if kind == P.Kind.HELLO:
                self._answer(g)
            elif kind == P.Kind.PUSH:
                self._on_push(g, status.Get_source())
            else:
                raise RuntimeError(f"protocol error: request kind {kind} from rank {status.Get_source()}")
        # The server's own CPU use while serving: it must sleep, not spin, while it waits.
        self.cpu_seconds, self.serve_seconds = _cpu_seconds() - cpu0, time.perf_counter() - wall0
        self.progress.line(
            f"server: {self.s.commits} commits in {self.wall():.1f}s; server CPU "
            f"{self.cpu_seconds / max(self.serve_seconds, 1e-9):.3f} s per wall second"
        )
        return "preempted" if self.preempt and self.s.commits < self.total else "done"


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
