"""The asynchronous parameter server's state and decisions (rank 0), free of MPI.

`ParameterServer` is told what arrived (a group's hello, push or evaluation, with its
header and buffers) and answers with the replies to send (`Outgoing`); the driver
(`server_loop.serve`) owns every receive and send, the signals and the wait. It holds
the global weights as one flat float32 buffer and serves the group
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

Stalls: the server tracks when it last heard from (or answered) each group it waits for.
A group silent for longer than the stall bound (`server.stall_s`, or 4x the longest silence
seen), or not parked when a preemption's barrier reaches its cutoff (`server.preempt_wait_s`
after the signal), is left out: the barrier completes without it, the checkpoint holds every
other group's work, the group's unfinished task is handed out again on resume and its momentum
restarts from zero, and the job ends with a `StalledError` naming the group and its ranks. A
group heard from again before that checkpoint is written is taken back.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint as C
from . import protocol as P
from .adapt import Adapter, Obs
from .config import Config
from .errors import DivergedError, StalledError
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


@dataclass
class Outgoing:
    """One reply to a group's leader, sent in this order: header (P.Rep), the global
    parameters, the BN buffers, then the group's momentum where the header says HAS_STATE.
    The arrays are views of the server's state: send them before the next merge."""

    group: int
    header: np.ndarray
    params: np.ndarray
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
        self.started: set[int] = set()  # groups that committed in this process: warm-up is behind them
        self.n = len(groups)
        self.total = cfg.schedule.epochs * self.n
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
        # group -> (epoch, merges) of an evaluation a reply asked for (of the weights after that
        # many merges), not received yet
        self.eval_asked: dict[int, tuple[float, int]] = {}
        self.outstanding: set[int] = set()  # groups holding a task they have not committed
        self.barrier = False
        # stalls: when each group was last heard from or answered (perf_counter seconds)
        self.heard = [time.perf_counter()] * self.n
        self.longest_gap = 0.0  # the longest silence of a group before a request, seconds
        self.stalled: set[int] = set()  # groups the next checkpoint leaves out
        self.gone: set[int] = set()  # ... of them, those never served again (a message went astray)
        self.cutoff: float | None = None  # a preemption's or stall's barrier stops waiting then
        self.group_ranks: list[tuple[int, ...]] = [()] * self.n  # world ranks (the driver sets them)
        self.preempt = 0  # signal number that asked for a checkpoint and stop
        self.send_state = set(range(self.n)) if state.resumed else set()
        self.next_rr = 0
        # (lr, px, batch, predicted seconds or None) of each group's current task
        self.task_stage: dict[int, tuple[float, int, int, float | None]] = {}
        self.t0 = time.perf_counter()
        self.progress = Progress()
        self.cpu_seconds = self.serve_seconds = 0.0  # the driver's account of its serving (end record)

    def wall(self) -> float:
        return self.s.elapsed + time.perf_counter() - self.t0

    # --- replies -------------------------------------------------------------
    def _reply(self, g: int, status: P.Status) -> Outgoing:
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
            rep[P.Rep.EVAL_EPOCH] = epoch = s.pending_evals.pop(g)
            self.eval_asked[g] = (epoch, s.merges)
        has_state = g in self.send_state
        rep[P.Rep.HAS_STATE] = 1 if has_state else 0
        out = self._with_weights(g, rep)
        if has_state:
            out.momentum = s.momentum[g]  # the group's momentum (resume)
            self.send_state.discard(g)
        if status == P.Status.STOP:
            self.stopped.add(g)
        if run:
            self.outstanding.add(g)
        self.heard[g] = time.perf_counter()  # its silence counts from this answer
        return out

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

    def _with_weights(self, g: int, rep: np.ndarray) -> Outgoing:
        """A reply carrying the global weights (group g's own BN buffers under bn: local); a
        reply that lets the group train records what it pulled (the delta rule's base)."""
        s, n_p = self.s, self.n_params
        bufs = s.group_buffers[g] if self.cfg.server.bn == "local" else s.weights[n_p:]
        if rep[P.Rep.STATUS] != P.Status.STOP:
            self.pulled_at[g] = s.merges
            if self.pulled is not None:
                self.pulled[g] = s.weights[:n_p]
        return Outgoing(g, rep, s.weights[:n_p], bufs)

    def answer(self, g: int) -> Outgoing:
        """The reply to a hello or a commit: the next task (RUN), or STOP once every task is out."""
        issued = sum(self.s.rounds)
        return self._reply(g, P.Status.RUN if issued < self.total and not self.preempt else P.Status.STOP)

    # --- requests ------------------------------------------------------------
    def _merge(self, g: int, wbuf: np.ndarray) -> dict[str, float]:
        """Fold group g's pushed weights `wbuf` into the global ones; returns diagnostics."""
        s, n_p, cfg = self.s, self.n_params, self.cfg.server
        w, wi, f = s.weights[:n_p], wbuf[:n_p], self.groups[g].factor
        staleness = s.merges - self.pulled_at[g]
        dist = distance(wi, w)
        if not math.isfinite(dist):  # before the merge: the global weights stay as they were
            self._diverged(g, f"pushed weights are not finite (distance to the global weights {dist})")
        if cfg.merge == "delta":
            a = delta_weight(f, self.f_sum, self.n, staleness)
            merge_delta(w, wi, self.pulled[g], a)
        else:
            a = f / (1.0 + f)
            merge_paper(w, wi, f)
        if cfg.bn == "local":
            s.group_buffers[g] = wbuf[n_p:]
        else:
            merge_paper(s.weights[n_p:], wbuf[n_p:], f)
        s.merges += 1
        return {"merge": s.merges, "staleness": staleness, "distance": round(dist, 6), "scale": round(a, 6)}

    def _diverged(self, g: int, what: str) -> None:
        lr, res, batch, _ = self.task_stage.get(g, (0.0, 0, 0, None))
        raise DivergedError(
            f"training diverged at commit {self.s.commits + 1} (epoch {self.s.commits / self.n:.2f}): "
            f"group {g}'s {what}, training at lr {lr:g}, optim.momentum {self.cfg.optim.momentum:g}, "
            f"batch {batch}, {res} px; nothing of it was merged. Lower schedule.lr or optim.momentum "
            f"and start again, or resume from the last checkpoint in {self.cfg.out}/checkpoints"
        )

    def on_merge(self, g: int, h: np.ndarray, wbuf: np.ndarray) -> Outgoing:
        """A push inside a task (header h, weights wbuf): merge, log, answer CONTINUE with the
        merged weights."""
        d = self._merge(g, wbuf)
        self.log.write(
            {
                "type": "merge",
                "group": g,
                "round": int(h[P.Req.ROUND]),
                **d,
                "wall": round(self.wall(), 3),
            }
        )
        return self._with_weights(g, P.reply(P.Status.CONTINUE))

    def on_push(self, g: int, h: np.ndarray, wbuf: np.ndarray) -> list[Outgoing]:
        """A push that ends a task (a commit): merge, log, then the reply, or none while the
        group is parked at a checkpoint barrier (`barrier_full`, `checkpoint`)."""
        s = self.s
        if not math.isfinite(float(h[P.Req.LOSS])):
            self._diverged(g, f"train loss is {float(h[P.Req.LOSS])}")
        d = self._merge(g, wbuf)
        s.commits += 1
        self.outstanding.discard(g)
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
            return []
        return [self.answer(g)]

    def on_eval(self, g: int, h: np.ndarray, bufs: np.ndarray) -> None:
        """An evaluation result (header h) and the BN buffers it was made with."""
        if float(h[P.Req.EVAL_EPOCH]) == self.cfg.schedule.epochs:
            self.final_buffers = bufs
        self.eval_asked.pop(g, None)
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

    def barrier_full(self) -> bool:
        """Every active group is parked at the barrier or left out: collect the parked groups'
        momentum into `s.momentum[g]` (`leave_out` a group whose momentum does not come), then
        call `checkpoint`."""
        active = [g for g in range(self.n) if g not in self.stopped and g not in self.stalled]
        return self.barrier and bool(self.parked or self.stalled) and sorted(self.parked) == sorted(active)

    def checkpoint(self) -> list[Outgoing]:
        """Write the checkpoint of a full barrier and release the parked groups; with groups
        left out, write it without them and end the run (`StalledError`)."""
        if self.stalled:
            self._end_without(sorted(self.stalled))
        self.save()
        parked, self.parked, self.barrier, self.cutoff = self.parked, [], False, None
        replies = [self.answer(g) for g in sorted(parked)]
        # A resumed run restarts with HELLOs from groups 0, 1, ...: so does the round-robin order here.
        self.next_rr = 0
        return replies

    def _end_without(self, missing: list[int]) -> None:
        """Checkpoint the state without the `missing` groups' work in flight, then raise."""
        s, now = self.s, time.perf_counter()
        lost = [g for g in missing if g in self.outstanding]
        for g in lost:
            s.rounds[g] -= 1  # handed out again on resume, with the same data order (its round)
        for g, (epoch, merges) in self.eval_asked.items():  # evaluations asked for, not received
            if merges == s.merges:  # of the weights saved now: the resume evaluates them
                s.pending_evals.setdefault(g, epoch)
            else:  # of weights merged over since: nothing can measure them any more
                self.log.write(
                    {
                        "type": "gap",
                        "after_commit": s.commits,
                        "up_to_commit": s.commits,
                        "missing_bytes": 0,
                        "reason": f"evaluation of epoch {epoch:g} lost: group {g} did not send it before "
                        "the run ended without it",
                    }
                )
        s.momentum[missing] = 0.0  # never received (or stale): restarts from zero on resume
        path = self.save(missing=missing)
        who = ", ".join(
            f"group {g} (rank{'s' if len(self.group_ranks[g]) != 1 else ''} "
            f"{', '.join(map(str, self.group_ranks[g])) or '?'}, silent for {now - self.heard[g]:.0f} s)"
            for g in missing
        )
        cfg = self.cfg.server
        if self.preempt:
            why = (
                f"the preemption's checkpoint waited server.preempt_wait_s = {cfg.preempt_wait_s:g} s "
                f"and left out {who}"
            )
        else:
            why = (
                f"{who} not heard from within the stall bound of {self.stall_bound():.0f} s "
                f"(server.stall_s = {cfg.stall_s:g} s, or 4x the longest silence seen): a stopped, hung "
                "or crashed rank"
            )
        tasks = f"{'its' if len(missing) == 1 else 'their'} unfinished task" if lost else "no unfinished task"
        raise StalledError(
            f"{why}. Checkpoint {path} holds every other group's work; it lacks {tasks} and the "
            f"momentum of group{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
            f"(the resume hands {'that task' if lost else 'nothing'} out again and starts that momentum "
            f"from zero). Continue with: hpc-dualbatch train --resume {self.cfg.out}",
            "preempted" if self.preempt else "stalled",
        )

    def save(self, final: bool = False, missing: list[int] | None = None) -> str:
        """Write a checkpoint of the training state. `final`: the run is done, so the saved
        model carries the BN buffers its final evaluation used (recalibrated, or the evaluating
        group's own under bn: local); training never reads them back. `missing`: groups left
        out (recorded in the checkpoint; the resume says so)."""
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
                    **({"missing_groups": missing} if missing else {}),
                    **({"adapt": self.adapter.state()} if self.adapter else {}),
                },
                group_buffers=s.group_buffers,
            ),
            keep=self.cfg.checkpoint.keep,
        )

    # --- what the driver asks ----------------------------------------------------
    def serving(self) -> bool:
        """Until every group has been told STOP and its last evaluation is in."""
        return len(self.stopped) < self.n or any(g in self.stopped for g in self.eval_asked)

    def check_preempt(self) -> None:
        """Before each request: a signal (`preempt`, set by the driver) turns into a checkpoint
        barrier at the next pushes, then STOP; groups not parked within server.preempt_wait_s
        are left out (`on_silence`)."""
        if self.preempt and len(self.stopped) < self.n:
            self.barrier = True
            if self.cutoff is None:
                self.cutoff = time.perf_counter() + self.cfg.server.preempt_wait_s

    def stall_bound(self) -> float | None:
        """Seconds of silence after which a group is stalled; None: never (server.stall_s 0)."""
        stall_s = self.cfg.server.stall_s
        return max(stall_s, 4 * self.longest_gap) if stall_s > 0 else None

    def awaited(self) -> list[int]:
        """Groups the server waits to hear from: with a task or an evaluation to send, not parked."""
        return [
            g
            for g in range(self.n)
            if g not in self.parked
            and g not in self.stalled
            and (g not in self.stopped or g in self.eval_asked)
        ]

    def deadline(self) -> float | None:
        """The perf_counter time by which some request must come, else the driver calls
        `on_silence`; None: wait without bound."""
        awaited, bound = self.awaited(), self.stall_bound()
        times = [self.heard[g] + bound for g in awaited] if bound is not None else []
        if self.cutoff is not None and awaited:
            times.append(self.cutoff)
        return min(times, default=None)

    def on_silence(self, now: float, queued: set[int]) -> None:
        """Nothing came by `deadline()`: leave out the groups silent past the stall bound, and,
        past a barrier's cutoff, every group not parked yet. `queued`: groups whose request is
        waiting unserved (round robin serves another first): not silent."""
        for g in queued:
            self.heard[g] = now
        bound = self.stall_bound()
        past_cutoff = self.cutoff is not None and now >= self.cutoff
        self.leave_out(
            [
                g
                for g in self.awaited()
                if g not in queued and (past_cutoff or (bound is not None and now - self.heard[g] >= bound))
            ],
            now,
        )

    def leave_out(self, groups: list[int], now: float, for_good: bool = False) -> None:
        """Leave `groups` out of the next checkpoint (a stall, or their momentum or weights did
        not come: `for_good`, never served again); the others get server.preempt_wait_s to
        park, then the run ends."""
        if not groups:
            return
        if for_good:
            self.gone.update(groups)
        for g in groups:
            self.progress.line(f"server: group {g} not heard from for {now - self.heard[g]:.0f} s: left out")
        self.stalled.update(groups)
        self.barrier = True
        if self.cutoff is None:
            self.cutoff = now + self.cfg.server.preempt_wait_s

    def next_group(self) -> int | None:
        """Under `order: round_robin` the group whose request is served next; None: any."""
        if self.cfg.server.order != "round_robin":
            return None
        for _ in range(self.n):
            if (
                self.next_rr not in self.stopped
                and self.next_rr not in self.parked
                and self.next_rr not in self.stalled
            ):
                return self.next_rr
            self.next_rr = (self.next_rr + 1) % self.n
        return None

    def served(self, g: int, kind: int) -> None:
        """A request of group g of this kind is being served (round robin moves on past g)."""
        now = time.perf_counter()
        self.longest_gap = max(self.longest_gap, now - self.heard[g])
        self.heard[g] = now
        if g in self.stalled and g not in self.gone:  # heard from again in time: take it back
            self.stalled.discard(g)
            self.progress.line(f"server: group {g} heard from again; taken back")
            if not self.stalled and not self.preempt:
                self.cutoff = None
        if kind != P.Kind.EVAL and self.cfg.server.order == "round_robin":
            self.next_rr = (g + 1) % self.n

    def outcome(self) -> str:
        return "preempted" if self.preempt and self.s.commits < self.total else "done"
