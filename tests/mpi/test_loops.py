"""The real server and worker loops in-process at 2, 3 and 4 ranks, with a stub trainer.

Rank 0 runs `train.run_server` (state, `server_loop.serve`, checkpoints, status.json) and
every other rank `worker.worker_loop` (the leader's requests, the group's broadcasts, the
evaluations), exactly as `hpc-dualbatch train` does; only the trainer is a stand-in: one SGD
step per part on a tiny linear + batch-norm model, on inputs fixed by (group, round, part), the
same on every rank of a group, reporting seconds from a simulated clock (and sleeping a tenth
of them, so that under `order: arrival` requests arrive in that clock's order). So these tests
check the protocol, the order, STOP, the evaluations, the checkpoint barrier and resume in
seconds; the real trainer's learning and the ways a job fails are the end-to-end `mpirun` jobs
of tests/test_train.py and tests/test_reliability*.py.

Layouts (tests/mpi/common.groups_for): 2 ranks = 1 group of 1, 3 = 1 group of 2,
4 = a group of 2 and a small group of 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest

pytest.importorskip("mpi4py")

import torch  # noqa: E402

from hpc_dualbatch.atomic import write_json  # noqa: E402
from hpc_dualbatch.commands.train import Setup, group_specs, run_server, run_shard, shard_part  # noqa: E402
from hpc_dualbatch.config import config_from_dict  # noqa: E402
from hpc_dualbatch.method.merge import delta_weight, nova_weight  # noqa: E402
from hpc_dualbatch.method.plan import plan_from_config  # noqa: E402
from hpc_dualbatch.method.schedule import resolution_at, stage_at  # noqa: E402
from hpc_dualbatch.ps.worker import worker_loop  # noqa: E402
from hpc_dualbatch.runtime import checkpoint as C  # noqa: E402
from hpc_dualbatch.runtime.flat import FlatModel  # noqa: E402
from hpc_dualbatch.runtime.metrics import read_metrics  # noqa: E402
from hpc_dualbatch.runtime.trainer import MiniEpochStats  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from tests.mpi.common import agreed, groups_for  # noqa: E402

EPOCHS = 4
SAMPLES = 2000  # samples per epoch the plan splits into the groups' shares
TEST = 1000  # test samples the stub evaluates (in parts)
REAL_PER_SIMULATED = 0.1  # a stub task sleeps this share of its simulated seconds (~20-100 ms)


def step_fit(resolution: int) -> tuple[float, float]:
    """(a s/sample, b s/step): the seconds a stub task reports are a*samples + b*steps, times the
    group's workers.slowdown; the same line the adaptive tests' timing file holds."""
    return 2e-4 * (resolution / 12) ** 2, 2e-3  # the cost grows with the pixels


class Flag:
    raised = 0  # what worker.SignalFlag holds, without installing handlers


class StubTrainer:
    """GroupTrainer's interface (flat, opt, train_mini_epoch, recalibrate, evaluate) over a
    3 -> 2 linear layer with batch norm; records every task it was given."""

    def __init__(self, topo, flag: Flag, preempt_round: int | None, slowdown: float = 1.0) -> None:
        torch.manual_seed(0)  # the same initial weights as the server's (initial_weights())
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        self.flat = FlatModel(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.topo, self.flag, self.preempt_round = topo, flag, preempt_round
        self.slowdown = slowdown
        self.tasks: list[tuple[int, int, int, float, int, int]] = []

    n_params = 12  # Linear(3, 2) weight and bias, BatchNorm1d(2) weight and bias

    def train_mini_epoch(self, work, exchange):
        round_idx, shares, resolution, batch, lr, pushes = (
            work.round_idx, work.shares, work.resolution, work.batch, work.lr, work.pushes
        )  # fmt: skip
        g = self.topo.group
        self.tasks.append((round_idx, resolution, batch, float(lr), pushes, shares[g]))
        a, b = step_fit(resolution)
        seconds = self.slowdown * (a * shares[g] + b * -(-shares[g] // batch))  # a simulated clock
        for part in range(pushes):
            time.sleep(REAL_PER_SIMULATED * seconds / pushes)  # requests arrive in the clock's order
            gen = torch.Generator().manual_seed(1000 * g + 10 * round_idx + part)
            x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.model.train()
            loss = ((self.model(x) - y) ** 2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if part < pushes - 1:
                exchange()
        if round_idx == self.preempt_round and g == 0:
            self.flag.raised = signal.SIGUSR1  # as if Slurm signalled this rank mid-task
        mine = len(np.array_split(np.arange(shares[g]), self.topo.group_size)[self.topo.group_rank])
        return MiniEpochStats(mine, seconds, loss.item() * mine, mine // 2)

    def slots(self, slot: int, slots: int) -> range:
        """The parts this rank's group takes (each rank one), as GroupTrainer takes them."""
        return range(slot, slot + self.topo.group_size) if slots else range(self.topo.group_size)

    def recalibrate(self, resolution, slot=0, slots=0):
        """BN running mean = the mean of the group's part indices (what a group's recalibration
        averages over its ranks), so a shared evaluation's mean over all ranks is exact to check."""
        self.model[1].running_mean.fill_(float(np.mean(self.slots(slot, slots))))
        return 0.0

    def evaluate(self, resolution, slot=0, slots=0):
        """The group's samples of a TEST-sample split in its parts (the group's sum)."""
        parts = np.array_split(np.arange(TEST), slots or self.topo.group_size)
        n = sum(len(parts[j]) for j in self.slots(slot, slots))
        return float(np.abs(self.flat.weights()).sum()), 0.5, n, 0.01


CAPTURE: list = []  # pytest's capture manager (run() prints a failing rank's traceback past it)


@pytest.fixture
def shared_dir(pytestconfig):
    """One temporary folder for all ranks (rank 0 makes it; pytest's tmp_path differs per rank)."""
    from mpi4py import MPI

    CAPTURE[:] = [pytestconfig.pluginmanager.getplugin("capturemanager")]
    world = MPI.COMM_WORLD
    path = world.bcast(tempfile.mkdtemp(prefix="hdb-loops-") if world.Get_rank() == 0 else None)  # MPI
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield path
    for s, h in handlers.items():  # serve() installs its own; give pytest its own back
        signal.signal(s, h)
    world.Barrier()  # MPI: every rank is done with the folder
    if world.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def or_abort(fn, *args, **kwargs):
    """fn(*args, **kwargs) on this rank; an exception ends the whole job with its traceback (as
    `launch.fail` does in a real run): the peers would otherwise wait for this rank forever in
    their next collective or receive."""
    from mpi4py import MPI

    try:
        return fn(*args, **kwargs)
    except BaseException:
        with CAPTURE[0].global_and_fixture_disabled():  # pytest holds stderr; Abort would lose it
            traceback.print_exc()
            sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)  # MPI: ends every rank


def run(out: str, preempt_round: int | None = None, resume: bool = False, world=None, **over):
    """One run of the real loops (under `or_abort`) on `world` (default COMM_WORLD). Returns
    (outcome on rank 0 or None, this rank's trainer or None, the config, the group specs)."""
    return or_abort(_run, out, preempt_round, resume, world, **over)


def _run(out: str, preempt_round: int | None, resume: bool, world, **over):
    from mpi4py import MPI

    from hpc_dualbatch.runtime.topology import build_topology

    world = MPI.COMM_WORLD if world is None else world
    shards = over.get("server__shards", 1)
    groups = groups_for(world.Get_size() - shards + 1)
    over = {"schedule__epochs": EPOCHS, "plan__k": 1.05 if len(groups) > 1 else 1.0, **over}
    raw = tiny_config("unused.h5", out, workers__groups=groups, workers__small=len(groups) - 1, **over)
    cfg = config_from_dict(raw)
    plan = plan_from_config(cfg, SAMPLES)
    specs = group_specs(cfg, plan)
    topo = build_topology(groups, shards, world=world)
    if topo.is_server:
        os.makedirs(out, exist_ok=True)
        manifest = C.latest(out) if resume else None
        flat = StubTrainer(topo, Flag(), None).flat
        setup = Setup(cfg, None, plan, specs, C.load(manifest) if manifest else None, None)
        if topo.shard > 0:  # another shard of a sharded server
            run_shard(
                setup,
                topo,
                flat.weights(),
                flat.n_params,
                shard_part(manifest, topo.shard) if manifest else None,
            )
            return None, None, cfg, specs
        write_json(os.path.join(out, "plan.json"), plan.to_dict())  # as train.setup does
        outcome = run_server(setup, topo, flat.weights(), flat.n_params)
        return outcome, None, cfg, specs
    flag = Flag()
    trainer = StubTrainer(topo, flag, preempt_round, cfg.workers.slowdown.get(topo.group, 1.0))
    worker_loop(cfg, topo, trainer, [s.share for s in specs], flag)
    return None, trainer, cfg, specs


def records(out: str, kind: str) -> list[dict]:
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["type"] == kind]


def groups(out: str) -> list[int]:
    return [r["group"] for r in records(out, "commit")]


@pytest.mark.mpi(min_size=2)
def test_a_run_hands_out_every_task_once_evaluates_each_epoch_and_stops_every_group(shared_dir):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    out = os.path.join(shared_dir, "a")
    outcome, trainer, cfg, specs = run(out, schedule__small_lr="same")  # (the stages' own rates)
    n = len(specs)
    commits = world.bcast(or_abort(records, out, "commit") if world.Get_rank() == 0 else None)  # MPI

    def check() -> tuple[bool, str]:
        if trainer is None:
            return server_side()
        g = trainer.topo.group  # each rank of a group trained exactly the tasks the server logged
        logged = [(r["round"], r["resolution"], r["batch"], r["lr"]) for r in commits if r["group"] == g]
        got = [t[:4] for t in trainer.tasks]
        ok = got == logged and [t[0] for t in got] == list(range(len(got)))
        ok &= all(t[2] == specs[g].batch[t[1]] for t in got)  # the group's own batch
        return ok, f"group {g}: trained {got}, server logged {logged}"

    def server_side() -> tuple[bool, str]:
        status = json.load(open(os.path.join(out, "status.json")))
        bn, ranks = cfg.server.bn, sum(cfg.workers.groups)
        last = C.load(C.latest(out))  # the final model's BN buffers: running mean first
        bufs = last.final_buffers if last.final_buffers is not None else last.weights[StubTrainer.n_params :]
        final_mean = [float(x) for x in bufs[:2]]
        evals, merges = records(out, "eval"), records(out, "merge")
        recs = read_metrics(os.path.join(out, "metrics.jsonl"))
        pushes = [(i, r["group"], r) for i, r in enumerate(recs) if r["type"] in ("merge", "commit")]
        after_eval = [  # each evaluating group's first push after its evaluation, if it pushed again
            next(p for j, h, p in pushes if j > i and h == r["group"])
            for i, r in enumerate(recs)
            if r["type"] == "eval" and any(j > i and h == r["group"] for j, h, _ in pushes)
        ]
        # every epoch's stage is trained by n tasks (which group takes which task is the server's)
        stages = sorted((r["resolution"], r["lr"]) for r in commits)
        planned = sorted(
            (st.resolution, st.lr) for e in range(EPOCHS) for st in [stage_at(e, cfg.schedule)] * n
        )
        ok = (
            outcome == "done"
            and status["state"] == "done"
            and status["commits"] == EPOCHS * n
            and [r["commit"] for r in commits] == list(range(1, EPOCHS * n + 1))
            and stages == planned
            and [r["epoch"] for r in evals] == list(range(1, EPOCHS + 1))  # once per epoch
            # at the resolution each epoch trained at (12, 12, 16, 12), not the next task's
            and [r["resolution"] for r in evals] == [resolution_at(e, cfg.schedule) for e in range(EPOCHS)]
            and all(r["test_acc"] == 0.5 and r["samples"] == TEST for r in evals)
            # the final evaluation: shared by every group under bn: recalibrate (each rank one
            # part; BN statistics the mean over all ranks' parts 0 .. R-1), else the closer's alone
            and [r.get("parts") for r in evals[-1:]] == [n if n > 1 and bn == "recalibrate" else None]
            and (n == 1 or bn != "recalibrate" or final_mean == [(ranks - 1) / 2] * 2)
            and len(merges) > 0  # push_every: pushes inside each task
            and C.load(C.latest(out)).commits == EPOCHS * n  # the final checkpoint
            # an evaluating group pulls once it is done: under round robin its next push is
            # served before any other group's, so nothing was merged since its pull
            and len(after_eval) > 0
            and all(r["staleness"] == 0 for r in after_eval)
            # the leaders' sleeping waits and how late they ended; the server's mean lateness
            and sum(r["sleeps"] for r in commits) > 0
            and all(r["late"] >= 0 for r in commits)
            # the server's part of the pushes inside tasks (header to reply; the stub trainer
            # reports no `wait` of its own to compare it with)
            and all(r["waited"] >= 0 for r in commits)
            and sum(r["waited"] for r in commits) > 0
            and status["server"]["wake_late_ms"] >= 0
        )
        why = f"status {status}, stages {stages}, evals {evals}, final BN mean {final_mean}"
        return ok, f"{why}, pushes after them {after_eval}"

    agreed(world, check)


def mode_checks(out: str, specs, merge: str, bn: str, push_every: int) -> tuple[bool, str]:
    """The merge records of a run follow its server mode exactly (rank 0)."""
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    merges = [r for r in recs if r["type"] == "merge"]
    pushes = sorted(merges + [r for r in recs if r["type"] == "commit"], key=lambda r: r["merge"])
    f = [s.factor for s in specs]

    def scale(r: dict) -> float:  # paper: f/(1+f); delta: f/sum(f), nova: B/sum(B), damped by staleness
        g = r["group"]
        if merge == "nova":  # (the tiny config's batches are the same at both resolutions)
            return nova_weight(specs[g].batch[12], [s.batch[12] for s in specs], r["staleness"])
        return f[g] / (1 + f[g]) if merge == "paper" else delta_weight(f[g], sum(f), len(f), r["staleness"])

    ok = (
        (len(merges) > 0) == (push_every > 0)
        and [r["merge"] for r in pushes] == list(range(1, len(pushes) + 1))
        and all(abs(r["scale"] - scale(r)) < 1e-6 for r in pushes)
        and all(r["distance"] > 0 for r in pushes)
        and all(e["bn"] == bn for e in recs if e["type"] == "eval")
    )
    return ok, f"{merge}/{bn}/{push_every}: " + str(
        [(r["group"], r["staleness"], r["scale"]) for r in pushes]
    )


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "merge, bn, push_every, outer, overlap",
    [
        ("delta", "recalibrate", 4, "none", False),
        ("paper", "average", 0, "none", False),
        ("delta", "local", 4, "none", False),
        ("delta", "average", 2, "none", False),
        ("nova", "recalibrate", 4, "delayed", False),
        ("delta", "recalibrate", 2, "nesterov", False),
        ("delta", "recalibrate", 4, "none", True),
        ("paper", "local", 3, "none", True),
    ],
)
def test_every_server_mode_merges_by_its_rule_and_a_signalled_run_resumes_bit_identical(
    shared_dir, merge, bn, push_every, outer, overlap
):
    """A rank of group 0 is signalled during its 2nd task: the server checkpoints at a barrier
    and stops every group; the resumed run ends with the uninterrupted run's weights, momentum
    (and outer momentum) and order of commits."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    mode = dict(server__merge=merge, server__bn=bn, server__push_every=push_every, server__outer=outer)
    mode.update(server__overlap=overlap)
    full, cut = os.path.join(shared_dir, "full"), os.path.join(shared_dir, "cut")
    run(full, **mode)
    first, _, _, specs = run(cut, preempt_round=1, **mode)
    if world.Get_rank() == 0:
        barrier = or_abort(lambda: C.load(C.latest(cut)))
        parked_at = barrier.commits
        saved = [bool(barrier.momentum.get(g).any()) for g in range(barrier.momentum.n_groups)]
        state = or_abort(lambda: json.load(open(os.path.join(cut, "status.json")))["state"])
    second, trainer, _, _ = run(cut, resume=True, **mode)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:  # a resumed group starts where the checkpoint left it
            return trainer.topo.group != 0 or trainer.tasks[0][
                0
            ] >= 1, f"group 0 resumed at {trainer.tasks[0]}"
        n = len(specs)
        a, b = C.load(C.latest(full)), C.load(C.latest(cut))
        commits = [r["commit"] for r in records(cut, "commit")]
        ok, why = mode_checks(full, specs, merge, bn, push_every)
        ok &= (
            first == "preempted"
            and state == "preempted"
            and n <= parked_at < EPOCHS * n  # stopped early, after group 0's first commit
            and saved == [True] * n  # every group's momentum is in the barrier's checkpoint
            and second == "done"
            and commits == list(range(1, EPOCHS * n + 1))  # the metrics continue, no repeats
            and groups(cut) == groups(full)  # round robin: the same order of commits
            and np.array_equal(a.weights, b.weights)  # bit-identical to the uninterrupted run (so
            # the groups' momentum went to the barrier's checkpoint and came back exactly)
            and a.momentum.saved == b.momentum.saved == []  # a finished run's final checkpoint holds none
            and (outer == "none" or np.array_equal(a.outer, b.outer))
        )
        return (
            ok,
            why + f"; outcomes {first}/{second}, parked at {parked_at}, momentum {saved}, commits {commits}",
        )

    agreed(world, check)


@pytest.mark.mpi(min_size=2)
def test_overlap_folds_the_reply_in_with_the_steps_taken_since_the_push(shared_dir):
    """server.overlap, under round_robin and delta. One group (2 or 3 ranks): the reply is the
    pushed weights themselves (a = 1), so reply + the steps since the push is where the group
    would be without overlap: the parameters end equal to a run without it (to float32 rounding:
    the reply is rebuilt from an update). Two groups (4 ranks): the reply carries the other
    group's update one push later, so the runs differ; every merge still follows the rule. (The
    paper's rule with overlap: the resume test above.)"""
    merge = "delta"
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    mode = dict(server__order="round_robin", plan__adaptive=False, server__merge=merge, server__push_every=2)
    off, on = os.path.join(shared_dir, "off"), os.path.join(shared_dir, "on")
    run(off, **mode)
    outcome, _, _, specs = run(on, server__overlap=True, **mode)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        n_p = StubTrainer.n_params
        a, b = (C.load(C.latest(out)).weights[:n_p] for out in (off, on))
        ok, why = mode_checks(on, specs, merge, "recalibrate", 2)
        same = np.allclose(a, b, rtol=0, atol=1e-5)
        ok &= outcome == "done" and (same if len(specs) == 1 else not np.array_equal(a, b))
        return ok, why + f"; {len(specs)} groups, max |off - on| {np.abs(a - b).max()}"

    agreed(world, check)


@pytest.mark.parametrize(
    "size, shards, merge, bn, outer",
    [  # each at one world size (make test runs them all, at 3 and 4 ranks)
        pytest.param(3, 2, "delta", "recalibrate", "none", marks=pytest.mark.mpi(min_size=3)),
        # 3 shards of the stub's 16 weights: the last holds parameters and every BN buffer
        pytest.param(4, 3, "paper", "average", "none", marks=pytest.mark.mpi(min_size=4)),
        # 2 shards and a group of 2 ranks
        pytest.param(4, 2, "nova", "local", "delayed", marks=pytest.mark.mpi(min_size=4)),
    ],
)
def test_server_shards_train_bit_identically_to_one_and_resume_exactly(
    shared_dir, size, shards, merge, bn, outer
):
    """server.shards splits the weights between ranks 0 .. S-1; under round_robin the run ends
    with the weights of the same groups served by one server (run on every rank but 1 .. S-1),
    bit for bit, and a run signalled during group 0's 2nd task resumes across the shards to the
    same weights again."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != size:
        pytest.skip(f"runs at {size} ranks")
    mode = dict(server__order="round_robin", plan__adaptive=False, server__merge=merge, server__bn=bn)
    mode.update(server__outer=outer, schedule__epochs=3, schedule__milestones=[2])
    one, two, cut = (os.path.join(shared_dir, name) for name in ("one", "two", "cut"))
    others = 0 < world.Get_rank() < shards  # the ranks that are shards 1 .. S-1 below
    sub = world.Split(MPI.UNDEFINED if others else 0, world.Get_rank())  # MPI: one server and the groups
    if sub != MPI.COMM_NULL:
        run(one, world=sub, **mode)
        sub.Free()
    run(two, server__shards=shards, **mode)
    run(cut, preempt_round=1, server__shards=shards, **mode)
    if world.Get_rank() == 0:
        parked_at = or_abort(lambda: C.load(C.latest(cut)).commits)
        parts = or_abort(
            lambda: sorted(p.name for p in __import__("pathlib").Path(cut, "checkpoints").iterdir())
        )
    run(cut, resume=True, server__shards=shards, **mode)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        w1, w2, w3 = (C.whole_weights(C.latest(out)) for out in (one, two, cut))
        status = json.load(open(os.path.join(two, "status.json")))
        ok = (
            np.array_equal(w1, w2) and np.array_equal(w2, w3)
            and groups(one) == groups(two) == groups(cut)
            and 0 < parked_at < len(groups(two))
            and all(any(p.endswith(f".shard{s}") for p in parts) for s in range(1, shards))  # the parts
            and len(status["server"]["shards"]) == shards - 1  # the other shards' accounts
        )  # fmt: skip
        return ok, f"max |w1 - w2| {np.abs(w1 - w2).max()}, |w2 - w3| {np.abs(w2 - w3).max()}, parts {parts}"

    agreed(world, check)


@pytest.mark.mpi(min_size=2)
def test_rounds_answer_a_push_once_every_group_pushed(shared_dir):
    """order: rounds (a control): every group takes every task, and no push is merged more than
    one round after its group's pull (staleness < n: the round's pushes all start from one pull)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    out = os.path.join(shared_dir, "rounds")
    outcome, _, _, specs = run(out, server__order="rounds", plan__adaptive=False)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        n, pushes = len(specs), records(out, "merge") + records(out, "commit")
        per_group = [sorted(r["round"] for r in records(out, "commit") if r["group"] == g) for g in range(n)]
        ok = (
            outcome == "done"
            and per_group == [list(range(EPOCHS))] * n
            and max(r["staleness"] for r in pushes) <= n - 1
        )
        return ok, f"{outcome}; rounds per group {per_group}; staleness {[r['staleness'] for r in pushes]}"

    agreed(world, check)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("by_lr", [["arrival", "rounds"], ["rounds", "arrival"]])
def test_order_per_learning_rate_stage_ends_and_keeps_rounds_in_its_stage(shared_dir, by_lr):
    """server.order_by_lr switches between arrival and rounds at the LR milestone (epoch 3 of 4,
    with a checkpoint barrier every epoch): the run ends with every task committed, and no push of
    the rounds stage is merged more than one round after its group's pull."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    out = os.path.join(shared_dir, "order-by-lr-" + by_lr[0])
    over = dict(server__order="arrival", server__order_by_lr=by_lr, plan__adaptive=False)
    outcome, _, cfg, specs = run(out, **over)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        n, commits = len(specs), records(out, "commit")
        rounds_lr = cfg.schedule.lr[by_lr.index("rounds")]
        in_rounds = [r["staleness"] for r in commits if r["lr"] == pytest.approx(rounds_lr)]
        ok = outcome == "done" and len(commits) == EPOCHS * n and in_rounds and max(in_rounds) <= n - 1
        return ok, f"{outcome}; {len(commits)} commits; staleness in the rounds stage {in_rounds}"

    agreed(world, check)


# --- adaptive planning (plan.adaptive): a large and a small group, so 4 ranks ---------------------


def adaptive(shared_dir: str, **extra) -> dict:
    """Overrides: B_S planned from a timing file holding the stub's own time line (step_fit),
    8 epochs at one resolution (the re-plans of one resolution converge within the run, whatever
    the order of arrival); rank 0 writes the file."""
    from mpi4py import MPI

    from hpc_dualbatch.method.timing import TimeFit, save_timing

    path = os.path.join(shared_dir, "timing.json")
    if MPI.COMM_WORLD.Get_rank() == 0:
        fits = {r: TimeFit(*step_fit(r), r2=float("nan")) for r in (12, 16)}
        or_abort(save_timing, path, fits, {"made": "for a test: the stub trainer's clock"})
    MPI.COMM_WORLD.Barrier()  # MPI: the file exists before any rank plans from it
    over = dict(
        plan__timing=path,
        plan__small_batch={},
        schedule__epochs=8,
        schedule__milestones=[6],
        schedule__resolution_mode="fixed",
        schedule__resolutions=[12],
        schedule__dropout={12: 0.0},
        plan__large_batch={12: 64},
        server__order="arrival",  # adaptive planning refuses round_robin (it re-plans from time)
    )
    return {**over, **extra}


def static_ratio(commits: list[dict]) -> float:
    """Small / large seconds of each group's first task: the static plan's, at the first
    resolution (which group commits first is the arrival order's, not the test's)."""
    first = {c["small"]: c for c in reversed(commits)}
    assert first[True]["round"] == first[False]["round"] == 0
    return first[True]["seconds"] / first[False]["seconds"]


def ratio(cs: list[dict]) -> float:
    """Median small / median large mini-epoch seconds of commit records."""
    small = [c["seconds"] for c in cs if c["small"]]
    return float(np.median(small) / np.median([c["seconds"] for c in cs if not c["small"]]))


@pytest.mark.mpi(min_size=4)
def test_adaptive_planning_makes_unequal_groups_finish_together(shared_dir):
    """The large group 1.5x slower than its fit: the static plan's small group ends in about two
    thirds of its time; re-planned, the small group's B_S falls until the two end together. (At
    2x the stub's per-step cost would need B_S ~ 6, the edge of what a smaller batch can buy.)"""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    out = os.path.join(shared_dir, "a")
    run(out, **adaptive(shared_dir, checkpoint__every_epochs=0, workers__slowdown={0: 1.5}))

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        recs = read_metrics(os.path.join(out, "metrics.jsonl"))
        commits = [c for c in recs if c["type"] == "commit"]
        plans = [p for p in recs if p["type"] == "plan"]
        static = json.load(open(os.path.join(out, "plan.json")))["resolutions"]
        small = [c for c in commits if c["small"]]
        first, end = static_ratio(commits), ratio([c for c in commits if c["epoch"] > 5])
        errs = [abs(c["predicted"] / c["seconds"] - 1) for c in small if c["epoch"] > 2]
        ok = (
            bool(plans)
            and all(p["changed"] == [1] for p in plans)  # only the small group's batch moves
            and small[0]["batch"] == static[str(small[0]["resolution"])]["B_S"]  # starts as planned
            and first < 0.8  # static: the small group ends well before the large one
            and abs(np.log(end)) < 0.5 * abs(np.log(first))  # at least twice as near on a log scale
            and small[-1]["batch"] < small[0]["batch"]  # more time: a smaller B_S
            and float(np.median(errs)) < 0.05  # the stub's clock is the fit's line: predicted well
        )
        return ok, f"ratio {first} -> {end}, errors {errs}, " + str(
            [(c["small"], c["batch"]) for c in commits]
        )

    agreed(world, check)


@pytest.mark.mpi(min_size=4)
def test_a_slowed_small_group_trains_a_cut_share(shared_dir):
    """The small group 3x slower: no batch that still buys time lets it finish with the large one;
    the server cuts its share (plan records say so) and the group trains exactly what it is handed."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    out = os.path.join(shared_dir, "a")
    _, trainer, _, _ = run(
        out, **adaptive(shared_dir, checkpoint__every_epochs=0, workers__slowdown={1: 3.0})
    )
    recs = world.bcast(
        or_abort(read_metrics, os.path.join(out, "metrics.jsonl")) if world.Get_rank() == 0 else None
    )  # MPI
    small = [c for c in recs if c["type"] == "commit" and c["small"]]

    def check() -> tuple[bool, str]:
        why = str([c["samples"] for c in small])
        if trainer is not None:  # the small group trained exactly what it was handed
            return trainer.topo.group != 1 or [t[5] for t in trainer.tasks] == [
                c["samples"] for c in small
            ], why
        commits = [c for c in recs if c["type"] == "commit"]
        d_S = json.load(open(os.path.join(out, "plan.json")))["d_S"]
        handed = {d_S} | {p["shares"]["1"] for p in recs if p["type"] == "plan"}
        first, end = static_ratio(commits), ratio(commits[-6:])
        ok = (
            any(p["capped"] == [1] for p in recs if p["type"] == "plan")
            and small[0]["samples"] == d_S  # the first task as planned
            and {c["samples"] for c in small} <= handed
            and small[-1]["samples"] < 0.7 * d_S
            and first > 1.5
            and abs(np.log(end)) < 0.5 * abs(np.log(first))
        )
        return ok, why + f", handed {handed}, ratio {first} -> {end}"

    agreed(world, check)


@pytest.mark.mpi(min_size=4)
def test_adaptive_planning_resumes_with_the_plan_state_it_had(shared_dir):
    """Signalled mid-run and resumed, the server hands the small group the batch and share that
    the saved plan state re-plans to: the plan state travels in the checkpoint."""
    from mpi4py import MPI

    from hpc_dualbatch.method.adapt import Adapter
    from hpc_dualbatch.method.plan import small_floor
    from hpc_dualbatch.method.timing import load_timing

    world = MPI.COMM_WORLD
    cut = os.path.join(shared_dir, "cut")
    over = adaptive(shared_dir, workers__slowdown={0: 3.0}, schedule__epochs=6, schedule__milestones=[5])
    first, _, cfg, specs = run(cut, preempt_round=3, **over)
    ck = or_abort(lambda: C.load(C.latest(cut))) if world.Get_rank() == 0 else None  # before the resume
    second, _, _, _ = run(cut, resume=True, **over)

    def check() -> tuple[bool, str]:
        if world.Get_rank() != 0:
            return True, ""
        res = cfg.schedule.resolutions
        plan = json.load(open(os.path.join(cut, "plan.json")))
        static = {g: dict(s.batch) for g, s in enumerate(specs)}
        ad = Adapter(
            load_timing(cfg.plan.timing, res),
            cfg.plan.large_batch,
            static,
            [s.small for s in specs],
            (plan["d_L"], plan["d_S"]),
            cfg.workers.groups,
            floor=small_floor(cfg),
        )
        ad.load_state(ck.extra["adapt"])
        after = [r for r in records(cut, "commit") if r["commit"] > ck.commits and r["small"]][0]
        ad.replan(after["resolution"])  # None when nothing was measured since the last re-plan there
        ok = (
            first == "preempted"
            and second == "done"
            and bool(ck.extra["adapt"]["obs"])
            and after["batch"] == ad.batches[1][after["resolution"]]
            and after["samples"] == ad.share(1, after["resolution"])
        )
        return ok, f"{first}/{second}: resumed with {after}, saved state re-plans to {ad.batches[1]}"

    agreed(world, check)
