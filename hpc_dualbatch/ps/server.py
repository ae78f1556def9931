"""The asynchronous parameter server's state and decisions (rank 0; with `server.shards`, shard
0 on its slice of the weights, which decides for all shards), free of MPI.

`ParameterServer` is told what arrived (a group's `protocol.Request` and its buffers) and
answers with the replies to send (`Outgoing`, each with its `protocol.Task`); the driver
(`server_loop.serve`) owns every receive and send, the signals and the wait. It holds
the global weights as one flat float32 buffer and serves the group
leaders' requests (protocol in `protocol.py`) as they arrive (`order:
arrival`), or in the fixed order 0, 1, ..., n-1, 0, ... (`order:
round_robin`, bit-for-bit reproducible; where each group stands: `roster.Roster`).

A task is one mini-epoch of a group (what it holds: `tasks.Tasks`). The group pushes its
weights `pushes` times per task (`server.push_every`; once in the method); each push is
merged on arrival by the rule of `server.merge` and `server.bn` (`merge.MergeRule`: the
method's `w <- (w + f*w_i)/(1 + f)`, or the group's own update since its pull, optionally
through outer momentum). A push that ends a task is a commit; n_groups commits make one epoch.
Pushes inside a task are answered CONTINUE with the merged weights. Tasks are handed out until
epochs * n_groups have been issued, so every task issued is committed and no work is thrown
away; every later request is answered STOP. Under `server.order: rounds` (a control: barrier-
synchronous local SGD) every push is answered only once every active group has pushed;
`server.order_by_lr` picks arrival or rounds per learning-rate stage, switched when the first
task of a stage is handed out.

Checkpoints are barriers: from a checkpoint commit on, each pushing group is
merged and parked (no reply) until every active group is parked; then each
sends its momentum, the server writes one checkpoint (`checkpoints.write`) and releases them. The
barrier makes the saved state exactly the state the run continues from, so a
resumed `round_robin` run ends with the same weights as an uninterrupted one.

Stalls (`stalls.Watch`): a group silent past the stall bound, or not parked by a preemption's
cutoff, is left out: the barrier completes without it, the checkpoint holds every other group's
work, the group's unfinished task is handed out again on resume and its momentum restarts from
zero, and the run ends with a `StalledError` naming the group and its ranks.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from hpc_dualbatch.config import Config
from hpc_dualbatch.errors import CheckpointError, DivergedError
from hpc_dualbatch.method.adapt import Adapter
from hpc_dualbatch.method.average import TailAverage
from hpc_dualbatch.method.merge import Outer, PushInfo, make_rule
from hpc_dualbatch.method.replan import Obs
from hpc_dualbatch.ps import checkpoints
from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.ps.evaluation import SharedEval
from hpc_dualbatch.ps.roster import Roster
from hpc_dualbatch.ps.stalls import Watch
from hpc_dualbatch.ps.tasks import GroupSpec, Tasks, TaskStage
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.metrics import MetricsLog, Progress, commit_record, eval_record, merge_record


@dataclass
class ServerState:
    """What the server holds: O(n_params) whatever the number of groups (the groups' momentum
    is on the groups, gathered one group at a time into a checkpoint; `checkpoint.Momenta`)."""

    weights: np.ndarray  # parameters, then batch-norm buffers (flat.py)
    n_params: int
    group_buffers: np.ndarray  # (n_groups, n_buffers): each group's own BN buffers (bn: local)
    commits: int = 0
    merges: int = 0  # pushes merged, commits included (staleness is counted in merges)
    rounds: list[int] = field(default_factory=list)  # mini-epochs handed to each group
    elapsed: float = 0.0  # training seconds before this process started (resume)
    pending_evals: dict[int, float] = field(default_factory=dict)  # group -> epoch to evaluate
    momenta: C.Momenta | None = None  # resume: the checkpoint's momentum, sent to each group once
    outer: np.ndarray | None = None  # (2, n_params): outer momentum and its round's sum (merge.Outer)
    outer_count: int = 0  # pushes the outer momentum has counted
    average: np.ndarray | None = None  # (n_params,) schedule.average's mean so far (resume)
    average_count: int = 0  # merges that mean holds

    @property
    def resumed(self) -> bool:
        return self.momenta is not None

    @classmethod
    def fresh(cls, weights: np.ndarray, n_params: int, n_groups: int, outer: bool = False) -> ServerState:
        """A new run from the initial flat `weights` (parameters, then buffers); `outer`: with
        the server's outer momentum (`server.outer`)."""
        return cls(
            weights, n_params, np.repeat(weights[None, n_params:], n_groups, 0), rounds=[0] * n_groups,
            outer=np.zeros((2, n_params), np.float32) if outer else None,
        )  # fmt: skip

    @classmethod
    def from_checkpoint(cls, ck: C.Checkpoint, weights: np.ndarray, n_params: int, where: str) -> ServerState:
        """The state a checkpoint holds (its arrays taken over, not copied), checked against the
        model (`weights`: its initial ones)."""
        n_groups = ck.momentum.n_groups
        if ck.weights.shape != weights.shape or ck.momentum.n_params != n_params:
            raise CheckpointError(f"checkpoint in {where} does not fit the model ({ck.weights.size} weights)")
        gb = ck.group_buffers
        if gb is None or gb.shape != (n_groups, weights.size - n_params):
            raise CheckpointError(f"checkpoint in {where} holds no BN buffers for {n_groups} groups")
        return cls(
            ck.weights,
            n_params,
            gb,
            ck.commits,
            int(ck.extra.get("merges", ck.commits)),
            list(ck.rounds),
            ck.elapsed,
            {int(g): e for g, e in ck.extra.get("pending_evals", {}).items()},
            momenta=ck.momentum,
            outer=ck.outer,
            outer_count=int(ck.extra.get("outer_count", 0)),
            average=ck.average,
            average_count=int(ck.extra.get("average_count", 0)),
        )


@dataclass
class Outgoing:
    """One reply to a group's leader, sent in this order: `task` (packed), the global
    parameters (none in the reply to a STATS request), the BN buffers, then the group's momentum
    where `task.has_state`. The arrays are views of the server's state: send them before the next
    merge."""

    group: int
    task: P.Task
    params: np.ndarray | None
    buffers: np.ndarray
    momentum: np.ndarray | None = None


class ParameterServer:
    def __init__(
        self,
        cfg: Config,
        groups: list[GroupSpec],
        state: ServerState,
        log: MetricsLog,
        adapter: Adapter | None = None,
    ) -> None:
        self.cfg, self.groups, self.s, self.log = cfg, groups, state, log
        self.adapter = adapter if adapter is not None and adapter.active else None
        self.n, self.n_params = len(groups), state.n_params
        self.total = cfg.schedule.epochs * self.n
        self.tasks = Tasks(cfg, groups, self.adapter, log)
        sv = cfg.server
        self.outer = None  # server.outer: nesterov steps at every push, delayed once every n pushes
        if sv.outer != "none" and state.outer is not None:
            every = 1 if sv.outer == "nesterov" else self.n
            self.outer = Outer(sv.outer_lr, sv.outer_momentum, every, state.outer, state.outer_count)
        # schedule.average: the mean of the parameters over the last rate stage, evaluated and saved
        self.average = None
        if cfg.schedule.average != "none":
            self.average = TailAverage(self.n_params, state.average, state.average_count)
        self.averaged: dict[int, int] = {}  # group -> merges in the mean it was sent to evaluate
        self.rule = make_rule(
            sv.merge, sv.bn, [g.factor for g in groups], state.group_buffers, state.merges, self.outer
        )
        self.written: tuple[int, str] | None = None  # (merges, path) of this process's last checkpoint
        self.last_push: tuple[int, float, float] = (-1, 0.0, 0.0)  # group, weight a, inner lr (shards)
        self.parts = (
            None  # server.shards > 1: shards.Parts, the other shards' checkpoint parts (the driver's)
        )
        self.resumed_merges = state.merges  # (a state merged since holds no momentum of the resume)
        self.watch = Watch(self.n, sv.stall_s, sv.preempt_wait_s, time.perf_counter())
        self.roster = Roster(self.n, sv.order, state.resumed, self.watch.stalled)
        self.group_ranks: list[tuple[int, ...]] = [()] * self.n  # world ranks (the driver sets them)
        self.final_buffers: np.ndarray | None = None  # BN buffers the final evaluation used
        self.shared: SharedEval | None = None  # the final evaluation, once the groups share it
        self.barrier, self.preempt = False, 0  # preempt: the signal that asked for a checkpoint and stop
        self.t0 = time.perf_counter()
        self.progress = Progress()
        self.cpu_seconds = self.serve_seconds = 0.0  # the driver's account of its serving (end record)
        self.busy_seconds = 0.0  # serving minus waiting for the next request
        self.late_ms = 0.0  # mean delay from the end of a sleep in its waits to running, ms

    def wall(self) -> float:
        return self.s.elapsed + time.perf_counter() - self.t0

    # --- replies -------------------------------------------------------------
    def _reply(self, g: int, status: P.Status) -> Outgoing:
        s, run = self.s, status == P.Status.RUN
        eval_epoch = s.pending_evals.pop(g) if g in s.pending_evals and not self.preempt else -1.0
        if eval_epoch >= 0:
            self.roster.eval_asked[g] = (eval_epoch, s.merges)
        task = self.tasks.next(g, status, sum(s.rounds), s.commits, s.rounds[g], self.wall())
        task = dataclasses.replace(task, eval_epoch=eval_epoch, has_state=g in self.roster.send_state)
        if run:
            s.rounds[g] += 1
            self.roster.outstanding.add(g)
            if by_lr := self.cfg.server.order_by_lr:  # the order of the stage the newest task is in
                self.roster.rounds = by_lr[self.tasks.newest_lr_stage] == "rounds"
        out = self._with_weights(g, task)
        if eval_epoch >= 0:  # (it trains from the pull that answers its evaluation: on_eval)
            self._to_evaluate(out)
        if task.has_state and s.momenta is not None:
            out.momentum = s.momenta.get(g)  # the group's momentum (resume), read from the checkpoint
            self.roster.send_state.discard(g)
        if status == P.Status.STOP:
            self.roster.stopped.add(g)
        self.watch.answered(g, time.perf_counter())
        return out

    def _with_weights(self, g: int, task: P.Task) -> Outgoing:
        """A reply carrying the global weights (under bn: local, group g's own BN buffers); a
        reply that lets the group train is its pull."""
        params, buffers = self.s.weights[: self.n_params], self.s.weights[self.n_params :]
        if task.status != P.Status.STOP:
            self.rule.pulled(g, self.s.merges)
        return Outgoing(g, task, params, self.rule.buffers_for(g, buffers))

    def _to_evaluate(self, out: Outgoing) -> None:
        """A reply that asks for an evaluation carries the weights to evaluate: the tail
        average once it holds any (schedule.average), else the global weights."""
        if self.average is not None and out.params is not None:
            out.params = self.average.params(out.params)
            self.averaged[out.group] = self.average.count

    def answer(self, g: int) -> Outgoing:
        """The reply to a hello or a commit: the next task (RUN), or STOP once every task is out."""
        more = sum(self.s.rounds) < self.total and not self.preempt
        return self._reply(g, P.Status.RUN if more else P.Status.STOP)

    def after_commit(self, g: int) -> list[Outgoing]:
        """The reply to a commit: `answer`; but a group with no task left waits without one
        until every group has none, and then all share the final evaluation (`evaluation.py`)."""
        s, roster = self.s, self.roster
        alone = self.n - len(roster.left_out) < 2 or self.cfg.server.bn != "recalibrate"
        other_eval = s.pending_evals.get(g, self.cfg.schedule.epochs) != self.cfg.schedule.epochs
        if sum(s.rounds) < self.total or self.preempt or alone or other_eval:
            return [self.answer(g)]
        roster.waiting.append(g)
        roster.stopped.add(g)  # (no task: neither a barrier nor the stall watch waits for it)
        if any(h not in roster.stopped for h in range(self.n) if h not in roster.left_out):
            return []  # (a group still training; one told STOP before shares nothing)
        waiting, roster.waiting = sorted(roster.waiting), []
        closer = next((h for h in waiting if h in s.pending_evals), None)
        if closer is None or len(waiting) < 2:  # (the others were told STOP before: alone)
            return [self.answer(h) for h in waiting]
        ranks = {h: self.cfg.workers.groups[h] for h in waiting}
        self.shared = SharedEval.of(s.pending_evals.pop(closer), closer, ranks)
        outs = [self._reply(h, P.Status.STOP) for h in waiting]
        for out in outs:
            out.task = dataclasses.replace(out.task, **self.shared.task(out.group))
            self._to_evaluate(out)
            roster.eval_asked[out.group] = (self.shared.epoch, s.merges)
        return outs

    # --- requests ------------------------------------------------------------
    def _merge(self, g: int, wbuf: np.ndarray, norm: float) -> dict[str, float]:
        """Fold group g's push `wbuf` into the global weights; `norm`: the norm of its parameter
        part, measured by its leader over the whole push (every shard's slice). Returns diagnostics."""
        s, n_p, st = self.s, self.n_params, self.tasks.stage.get(g, TaskStage())
        w, wi = s.weights[:n_p], wbuf[:n_p]
        if not math.isfinite(norm):  # before the merge: the global weights stay as they were
            self._diverged(g, f"pushed weights are not finite (norm of the push {norm})")
        dist = self.rule.distance(w, wi, norm)
        staleness, batches = self.rule.staleness(g, s.merges), self.tasks.batches(st.resolution)
        push = PushInfo(g, staleness, st.lr, batches, self._lr_scale(st))
        a = self.rule.fold(push, w, wi)
        self.rule.fold_buffers(g, s.weights[n_p:], wbuf[n_p:])
        if self.average is not None and st.lr_stage == len(self.cfg.schedule.lr) - 1:
            self.average.add(w)  # (a push trained at the last stage's rate)
        s.merges += 1
        self.last_push = (g, a, st.lr)
        return {
            "merge": s.merges,
            "staleness": push.staleness,
            "distance": round(dist, 6),
            "scale": round(a, 6),
        }

    def _lr_scale(self, st: TaskStage) -> float:
        """server.stale_lr: rescale: a push trained in an earlier learning-rate stage than the
        newest task's is merged at the newest stage's rate (its weight times their ratio)."""
        if self.cfg.server.stale_lr != "rescale":
            return 1.0
        rates = self.cfg.schedule.lr
        return min(1.0, rates[self.tasks.newest_lr_stage] / rates[st.lr_stage])

    def _diverged(self, g: int, what: str) -> None:
        st, s = self.tasks.stage.get(g, TaskStage()), self.s
        raise DivergedError.at(
            s.commits + 1, s.commits / self.n, g, what, st.lr, self.cfg.momentum, st.batch,
            st.resolution, self.cfg.out,
        )  # fmt: skip

    def on_merge(self, req: P.Request, wbuf: np.ndarray) -> list[Outgoing]:
        """A push inside a task: merge, log, answer CONTINUE with the merged weights (under
        order: rounds once the round is complete)."""
        g, d = req.group, self._merge(req.group, wbuf, req.norm)
        self.log.write(merge_record(group=g, round_idx=req.round, wall=self.wall(), **d))
        return self.roster.hold(g, lambda: [self._with_weights(g, P.Task(P.Status.CONTINUE))], commit=False)

    def on_push(self, req: P.Request, wbuf: np.ndarray) -> list[Outgoing]:
        """A push that ends a task (a commit): merge, log, then the reply, or none while the
        group is parked at a checkpoint barrier (`barrier_full`, `checkpoint`)."""
        s, g = self.s, req.group
        if not math.isfinite(req.loss):
            self._diverged(g, f"train loss is {req.loss}")
        d = self._merge(g, wbuf, req.norm)
        s.commits += 1
        self.roster.outstanding.discard(g)
        if req.preempt and not self.preempt:
            self.preempt = signal.SIGTERM
        st = self.tasks.stage.get(g, TaskStage())
        if self.adapter is not None and st.resolution:
            obs = Obs(st.resolution, st.batch, req.samples, req.seconds, g not in self.roster.started)
            self.adapter.observe(g, obs)
        self.roster.started.add(g)
        rec = commit_record(
            commit=s.commits, epoch=s.commits / self.n, group=g, round_idx=req.round,
            small=self.groups[g].small, samples=req.samples, seconds=req.seconds, train_loss=req.loss,
            train_acc=req.acc, lr=st.lr, resolution=st.resolution, batch=st.batch, wall=self.wall(),
            wait=req.wait, waited=req.waited, sleeps=req.sleeps, late=req.late, predicted=st.predicted, **d,
        )  # fmt: skip
        self.log.write(rec)
        self.progress.commit(rec, self.cfg.schedule.epochs, self.total)
        if s.commits % self.n == 0:
            s.pending_evals[g] = s.commits / self.n  # this push closed an epoch: evaluate its result
        every = self.cfg.checkpoint.every_epochs * self.n
        if (every and s.commits % every == 0 and s.commits < self.total) or self.preempt:
            self.barrier = True
        if self.barrier:
            self.roster.park(g)
            return self.roster.release()  # (under order: rounds the held groups go on to their commits)
        return self.roster.hold(g, lambda: self.after_commit(g), commit=True)

    def on_eval(self, g: int, ev: P.Evaluation, bufs: np.ndarray) -> list[Outgoing]:
        """An evaluation result and the BN buffers it was made with. A group with a task to train
        is answered with the weights now (status CONTINUE), its pull: it evaluated the weights
        of its commit while the other groups pushed, and would otherwise train its next push
        period from them and push an update that many merges stale (damped to a few percent)."""
        self.roster.eval_asked.pop(g, None)
        averaged = self.averaged.pop(g, None)  # (each part of a shared one was sent the same mean)
        parts = None
        if self.shared is not None and g in self.shared.slots:  # one part of the final evaluation
            whole = self.shared.add_result(g, ev)
            if whole is None:
                return []
            ev, g, parts = whole, self.shared.closer, len(self.shared.slots)
        if ev.epoch == self.cfg.schedule.epochs:
            self.final_buffers = bufs
        rec = eval_record(
            epoch=ev.epoch, group=g, test_loss=ev.loss, test_acc=ev.acc, samples=ev.samples,
            seconds=ev.seconds, resolution=ev.resolution, wall=self.wall(), bn=self.cfg.server.bn,
            bn_seconds=ev.bn_seconds, parts=parts, averaged=averaged,
        )  # fmt: skip
        self.log.write(rec)
        self.progress.evaluation(rec)
        if g in self.roster.stopped:  # its last evaluation: nothing left to train
            return []
        self.watch.answered(g, time.perf_counter())
        return [self._with_weights(g, P.Task(P.Status.CONTINUE))]

    def on_stats(self, g: int, bufs: np.ndarray) -> list[Outgoing]:
        """Group g's BN statistics for the shared final evaluation; once every group's are in,
        their mean to each group (a STOP header and the buffers), which it evaluates with."""
        if self.shared is None or g not in self.shared.slots:
            raise RuntimeError(f"protocol error: group {g} sent BN statistics no evaluation asked for")
        self.roster.stats_in.add(g)
        mean = self.shared.add_stats(g, bufs)
        if mean is None:
            return []
        self.roster.stats_in.clear()
        now = time.perf_counter()
        for h in self.shared.slots:
            self.watch.answered(h, now)
        stop = {h: P.Task(P.Status.STOP, **self.shared.task(h)) for h in self.shared.slots}
        return [Outgoing(h, task, None, mean) for h, task in stop.items()]

    # --- checkpoints ----------------------------------------------------------
    def barrier_full(self) -> bool:
        """Every active group is parked at the barrier or left out: open a `checkpoint_writer`,
        write each parked group's momentum into it as it comes (`leave_out` a group whose momentum
        does not come), then call `checkpoint`."""
        parked = self.roster.parked
        full = sorted(parked) == sorted(self.roster.active())
        return self.barrier and bool(parked or self.watch.stalled) and full

    def checkpoint_writer(self) -> C.Writer:
        return C.Writer(self.cfg.out, self.s.commits)

    def checkpoint(self, writer: C.Writer) -> list[Outgoing]:
        """Finish the checkpoint of a full barrier (`writer` holds the parked groups' momentum)
        and release the parked groups; with groups left out, finish it without them and end the
        run (`checkpoints.end_without`)."""
        if self.watch.stalled:
            checkpoints.end_without(self, sorted(self.watch.stalled), writer)
        checkpoints.write(self, writer)
        parked, self.roster.parked, self.barrier, self.watch.cutoff = self.roster.parked, [], False, None
        self.roster.next_rr = 0  # a resumed run restarts with HELLOs from group 0 on: so does round robin
        outs = [out for g in sorted(parked) for out in self.after_commit(g)]
        if self.preempt:  # the groups waiting for the final evaluation: it will not come
            waiting, self.roster.waiting = self.roster.waiting, []
            outs += [self.answer(g) for g in sorted(waiting)]
        return outs

    # --- what the driver asks ----------------------------------------------------
    def check_preempt(self) -> None:
        """Before each request: a signal (`preempt`, set by the driver) turns into a checkpoint
        barrier at the next pushes, then STOP; groups not parked by the cutoff are left out."""
        if self.preempt and len(self.roster.stopped) < self.n:
            self.barrier = True
            self.watch.start_cutoff(time.perf_counter())

    def on_silence(self, now: float, queued: set[int]) -> None:
        """Nothing came by the watch's deadline: leave out who is silent past the bounds."""
        self.leave_out(self.watch.silent(now, self.roster.awaited(), queued), now)

    def leave_out(self, groups: list[int], now: float, for_good: bool = False) -> None:
        """Leave `groups` out of the next checkpoint; the barrier that writes it starts now."""
        for g in groups:
            self.progress.line(f"server: group {g} silent for {now - self.watch.heard[g]:.0f} s: left out")
        if groups:
            self.watch.leave_out(groups, now, for_good)
            self.barrier = True

    def served(self, g: int, kind: P.Kind) -> None:
        """A request of group g of this kind is being served."""
        if self.watch.heard_from(g, time.perf_counter()):
            self.progress.line(f"server: group {g} heard from again; taken back")
            if not self.watch.stalled and not self.preempt:
                self.watch.cutoff = None
        self.roster.served(g, kind == P.Kind.EVAL)

    def account(self, peak_rss_mb: float) -> dict[str, float]:
        """The server's own account (status.json, the end record): how busy it was and its memory.
        busy_share near 1: the server is the bottleneck (add a shard, or push less often)."""
        serve = max(self.serve_seconds, 1e-9)
        return {
            "busy_share": round(self.busy_seconds / serve, 4),  # serving minus waiting, of serving
            "cpu_per_wall": round(self.cpu_seconds / serve, 4),  # ~0 while it waits: no spinning
            "serve_seconds": round(self.serve_seconds, 3),
            "peak_rss_mb": round(peak_rss_mb, 1),
            "wake_late_ms": round(self.late_ms, 3),  # the node's scheduling delay (simulate check)
        }

    def outcome(self) -> str:
        """done, or preempted: a signal stopped the run before its last commit or before its final
        evaluation (a signal at the last commit: the checkpoint holds it pending, the resume makes it)."""
        final_due = self.cfg.schedule.epochs in self.s.pending_evals.values()
        return "preempted" if self.preempt and (self.s.commits < self.total or final_due) else "done"
