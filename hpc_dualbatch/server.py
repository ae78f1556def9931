"""The asynchronous parameter server (rank 0).

It holds the global weights as one flat float32 buffer and serves the group
leaders' requests (protocol in `protocol.py`) as they arrive (`order:
arrival`), or in the fixed order 0, 1, ..., n-1, 0, ... (`order:
round_robin`, bit-for-bit reproducible).

A task is one mini-epoch of a group. The group pushes its weights
`pushes` times per task (`server.push_every`; once in the method); each push is
merged on arrival by the rule of `server.merge` (`merge.py`: the method's
`w <- (w + f*w_i)/(1 + f)`, or the group's own update since its pull), and the
batch-norm buffers by the rule of `server.bn`. A push that ends a task is a
commit; n_groups commits make one epoch, and the learning rate, resolution,
batch size and dropout of a task follow from its index among the tasks handed out
(`server.stage_by: task`: task t is part of epoch t // n) or, as in the method, from the
commit count when it is handed out (`commit`; `schedule.stage_for_commit` either way).
Pushes inside a task are answered CONTINUE with the merged weights. Tasks are handed out until
epochs * n_groups have been issued, so every task issued is committed and no
work is thrown away; every later request is answered STOP.

Checkpoints are barriers: from a checkpoint commit on, each pushing group is
merged and parked (no reply) until every active group is parked; then each
sends its momentum, the server writes one checkpoint and releases them. The
barrier makes the saved state exactly the state the run continues from, so a
resumed `round_robin` run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from . import checkpoint as C
from . import protocol as P
from .adapt import Adapter, Obs
from .config import Config
from .merge import delta_weight, distance, merge_delta, merge_paper
from .metrics import MetricsLog, Progress, commit_record, eval_record
from .schedule import lr_at, stage_for_commit


def pushes_per_task(share_L: int, batch_L: int, push_every: int) -> int:
    """Pushes in one task: the large group's steps per mini-epoch / push_every, at least 1.

    Every group pushes this many times per task, whatever its batch, so that groups push at
    the same pace (the plan gives small and large mini-epochs equal time) and a small group's
    push weight f means what it means in the method. 0 = one push per task (the method).
    """
    if push_every <= 0:
        return 1
    return max(1, round(math.ceil(share_L / batch_L) / push_every))


@dataclass
class GroupSpec:
    share: int  # samples per mini-epoch (d_L or d_S)
    batch: dict[int, int]  # batch per resolution (B_L or B_S)
    factor: float  # contribution factor f
    small: bool


@dataclass
class ServerState:
    weights: np.ndarray  # parameters, then batch-norm buffers (flat.py)
    momentum: np.ndarray  # (n_groups, n_params), sent to the groups on resume
    group_buffers: np.ndarray  # (n_groups, n_buffers): each group's own BN buffers (bn: local)
    commits: int = 0
    merges: int = 0  # pushes merged, commits included (staleness is counted in merges)
    rounds: list[int] = field(default_factory=list)  # mini-epochs handed to each group
    elapsed: float = 0.0  # training seconds before this process started (resume)
    pending_evals: dict[int, float] = field(default_factory=dict)  # group -> epoch to evaluate
    resumed: bool = False


class Server:
    def __init__(
        self,
        cfg: Config,
        topo: Any,
        groups: list[GroupSpec],
        state: ServerState,
        log: MetricsLog,
        adapter: Adapter | None = None,
    ) -> None:
        self.cfg, self.topo, self.groups, self.s, self.log = cfg, topo, groups, state, log
        self.adapter = adapter if adapter is not None and adapter.active else None
        self.started: set[int] = set()  # groups that committed in this process: warm-up is behind them
        self.n = len(groups)
        self.total = cfg.schedule.epochs * self.n
        self.back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
        self.hdr = np.zeros(P.HDR_LEN, np.float64)
        self.wbuf = np.empty_like(state.weights)
        self.n_params = state.momentum.shape[1]
        self.f_sum = sum(g.factor for g in groups)
        self.ref = next((g for g in groups if not g.small), groups[0])  # push pace: a large group
        # delta rule: the parameters each group last pulled, and the merge count at that pull
        self.pulled = (
            np.repeat(state.weights[None, : self.n_params], self.n, 0)
            if cfg.server.merge == "delta"
            else None
        )
        self.pulled_at = [state.merges] * self.n
        self.final_buffers: np.ndarray | None = None  # BN buffers the final evaluation used
        self.stopped: set[int] = set()
        self.parked: list[int] = []  # groups waiting at a checkpoint barrier (merged, not answered)
        self.evals_due = 0  # STOP replies that asked for an evaluation not yet received
        self.barrier = False
        self.preempt = 0  # signal number that asked for a checkpoint and stop
        self.send_state = set(range(self.n)) if state.resumed else set()
        self.next_rr = 0
        # (lr, px, batch, predicted seconds or None) of each group's current task
        self.task_stage: dict[int, tuple[float, int, int, float | None]] = {}
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
        # server.stage_by: the schedule position of this task: tasks handed out so far, or commits
        at = sum(s.rounds) if self.cfg.server.stage_by == "task" else s.commits
        stage = stage_for_commit(at, self.n, self.cfg.schedule)
        # LR at the fractional epoch, so a warm-up ramps per task, not per epoch.
        lr = lr_at(at / self.n, self.cfg.schedule)
        run = status == P.Status.RUN
        predicted = self._adapt(g, stage.resolution) if run and self.adapter else None
        rep[P.Rep.LR], rep[P.Rep.RESOLUTION], rep[P.Rep.DROPOUT] = lr, stage.resolution, stage.dropout
        share = self.adapter.share(g, stage.resolution) if self.adapter else spec.share
        rep[P.Rep.BATCH], rep[P.Rep.SAMPLES] = spec.batch[stage.resolution], share
        rep[P.Rep.EPOCH], rep[P.Rep.COMMITS] = s.commits / self.n, s.commits
        if run:
            rep[P.Rep.ROUND] = s.rounds[g]
            s.rounds[g] += 1
            self.task_stage[g] = (lr, stage.resolution, spec.batch[stage.resolution], predicted)
        rep[P.Rep.PUSHES] = pushes_per_task(
            self.ref.share, self.ref.batch[stage.resolution], self.cfg.server.push_every
        )
        if g in s.pending_evals and not self.preempt:
            rep[P.Rep.EVAL_EPOCH] = s.pending_evals.pop(g)
            if status == P.Status.STOP:
                self.evals_due += 1
        has_state = g in self.send_state
        rep[P.Rep.HAS_STATE] = 1 if has_state else 0
        dest = self.topo.leaders[g]
        world = self.topo.world
        self._send_weights(g, rep)
        if has_state:
            world.Send(s.momentum[g], dest=dest, tag=P.TAG_OPT)  # PS: the group's momentum (resume)
            self.send_state.discard(g)
        if status == P.Status.STOP:
            self.stopped.add(g)

    def _adapt(self, g: int, res: int) -> float | None:
        """plan.adaptive: re-plan the small groups at `res` from the measured mini-epochs, set
        the groups' batches, log a plan record when a batch or share changed; returns g's
        predicted seconds (None: no fit at `res`)."""
        ad = self.adapter
        assert ad is not None
        if res not in ad.fits:
            return None
        before = [(ad.batches[h][res], ad.share(h, res)) for h in range(self.n)]
        rp = ad.replan(res)  # None: nothing measured since the last re-plan here
        for h, spec in enumerate(self.groups):  # (after a resume the specs start from the static plan)
            spec.batch[res] = ad.batches[h][res]
        changed = [h for h in range(self.n) if before[h] != (ad.batches[h][res], ad.share(h, res))]
        if changed and rp is not None:
            self.log.write(
                {
                    "type": "plan",
                    "epoch": self.s.commits / self.n,
                    "resolution": res,
                    "batches": {str(h): b for h, b in sorted(rp.batches.items())},
                    "shares": {str(h): d for h, d in sorted(rp.shares.items())},
                    "changed": changed,
                    "target_seconds": round(rp.target, 4),
                    "scales": {str(h): round(v, 4) for h, v in sorted(rp.scales.items())},
                    "capped": list(rp.capped),
                    "wall": round(self.wall(), 3),
                }
            )
        return ad.predicted(g, res)

    def _send_weights(self, g: int, rep: np.ndarray) -> None:
        s, world, dest, n_p = self.s, self.topo.world, self.topo.leaders[g], self.n_params
        bufs = s.group_buffers[g] if self.cfg.server.bn == "local" else s.weights[n_p:]
        world.Send(rep, dest=dest, tag=P.TAG_REP)  # PS: reply header
        world.Send(s.weights[:n_p], dest=dest, tag=P.TAG_W)  # PS: global parameters
        world.Send(bufs, dest=dest, tag=P.TAG_BN)  # PS: BN buffers
        if rep[P.Rep.STATUS] != P.Status.STOP:
            self.pulled_at[g] = s.merges
            if self.pulled is not None:
                self.pulled[g] = s.weights[:n_p]

    def _answer(self, g: int) -> None:
        issued = sum(self.s.rounds)
        self._reply(g, P.Status.RUN if issued < self.total and not self.preempt else P.Status.STOP)

    # --- requests ------------------------------------------------------------
    def _merge(self, g: int, src: int) -> dict[str, float]:
        """Receive group g's weights and fold them into the global ones; returns diagnostics."""
        s, n_p, cfg = self.s, self.n_params, self.cfg.server
        P.recv(self.topo.world, self.wbuf, src, P.TAG_W, self.back)  # PS: the group's weights
        w, wi, f = s.weights[:n_p], self.wbuf[:n_p], self.groups[g].factor
        staleness = s.merges - self.pulled_at[g]
        dist = distance(wi, w)
        if cfg.merge == "delta":
            a = delta_weight(f, self.f_sum, self.n, staleness)
            merge_delta(w, wi, self.pulled[g], a)
        else:
            a = f / (1.0 + f)
            merge_paper(w, wi, f)
        if cfg.bn == "local":
            s.group_buffers[g] = self.wbuf[n_p:]
        else:
            merge_paper(s.weights[n_p:], self.wbuf[n_p:], f)
        s.merges += 1
        return {"merge": s.merges, "staleness": staleness, "distance": round(dist, 6), "scale": round(a, 6)}

    def _on_merge(self, g: int, src: int) -> None:
        """A push inside a task: merge, log, answer CONTINUE with the merged weights."""
        d = self._merge(g, src)
        self.log.write(
            {
                "type": "merge",
                "group": g,
                "round": int(self.hdr[P.Req.ROUND]),
                **d,
                "wall": round(self.wall(), 3),
            }
        )
        self._send_weights(g, P.reply(P.Status.CONTINUE))

    def _on_push(self, g: int, src: int) -> None:
        s = self.s
        d = self._merge(g, src)
        s.commits += 1
        h = self.hdr
        if h[P.Req.PREEMPT] and not self.preempt:
            self.preempt = signal.SIGTERM
        lr, res, batch, predicted = self.task_stage.get(g, (0.0, 0, 0, None))
        if self.adapter is not None and res:
            seconds = float(h[P.Req.SECONDS])
            self.adapter.observe(g, Obs(res, batch, int(h[P.Req.SAMPLES]), seconds, g not in self.started))
        self.started.add(g)
        rec = commit_record(
            commit=s.commits,
            epoch=s.commits / self.n,
            group=g,
            round_idx=int(h[P.Req.ROUND]),
            small=self.groups[g].small,
            samples=int(h[P.Req.SAMPLES]),
            seconds=float(h[P.Req.SECONDS]),
            train_loss=float(h[P.Req.LOSS]),
            train_acc=float(h[P.Req.ACC]),
            lr=lr,
            resolution=res,
            batch=batch,
            wall=self.wall(),
            wait=float(h[P.Req.WAIT]),
            predicted=predicted,
            **d,
        )
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

    def _on_eval(self, g: int, src: int) -> None:
        h = self.hdr
        bufs = np.empty(self.s.weights.size - self.n_params, np.float32)
        P.recv(self.topo.world, bufs, src, P.TAG_BN, self.back)  # PS: the BN buffers it evaluated with
        if float(h[P.Req.EVAL_EPOCH]) == self.cfg.schedule.epochs:
            self.final_buffers = bufs
        if g in self.stopped:
            self.evals_due -= 1
        rec = eval_record(
            epoch=float(h[P.Req.EVAL_EPOCH]),
            group=g,
            test_loss=float(h[P.Req.EVAL_LOSS]),
            test_acc=float(h[P.Req.EVAL_ACC]),
            samples=int(h[P.Req.EVAL_SAMPLES]),
            seconds=float(h[P.Req.EVAL_SECONDS]),
            resolution=int(h[P.Req.EVAL_RESOLUTION]),
            wall=self.wall(),
            bn=self.cfg.server.bn,
            bn_seconds=float(h[P.Req.EVAL_BN_SECONDS]),
        )
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

    def save(self, final: bool = False) -> str:
        """Write a checkpoint of the training state. `final`: the run is done, so the saved
        model carries the BN buffers its final evaluation used (recalibrated, or the evaluating
        group's own under bn: local); training never reads them back."""
        s = self.s
        weights = s.weights
        if final and self.final_buffers is not None:
            weights = s.weights.copy()
            weights[self.n_params :] = self.final_buffers
        return C.save(
            self.cfg.out,
            C.Checkpoint(
                weights,
                s.momentum,
                s.commits,
                list(s.rounds),
                self.wall(),
                self.log.offset(),
                self.cfg.to_dict(),
                {
                    "pending_evals": {str(g): e for g, e in s.pending_evals.items()},
                    "merges": s.merges,
                    **({"adapt": self.adapter.state()} if self.adapter else {}),
                },
                group_buffers=s.group_buffers,
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
                self._on_eval(g, status.Get_source())
                continue
            if self.cfg.server.order == "round_robin":
                self.next_rr = (g + 1) % self.n
            if kind == P.Kind.HELLO:
                self._answer(g)
            elif kind == P.Kind.MERGE:
                self._on_merge(g, status.Get_source())
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
