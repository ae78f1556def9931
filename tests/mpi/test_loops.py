"""The real server and worker loops in-process at 2, 3 and 4 ranks, with a stub trainer.

Rank 0 runs `train.run_server` (state, `server_loop.serve`, checkpoints, status.json) and
every other rank `worker.worker_loop` (the leader's requests, the group's broadcasts, the
evaluations), exactly as `hpc-dualbatch train` does; only the trainer is a stand-in: one SGD
step per part on a tiny linear + batch-norm model, on inputs fixed by (group, round, part), the
same on every rank of a group. So these tests check the protocol, the order, STOP, the
evaluations, the checkpoint barrier and resume in seconds; the real trainer's learning and the
ways a job fails are the end-to-end `mpirun` jobs of tests/test_train.py and
tests/test_reliability*.py.

Layouts (tests/mpi/common.groups_for): 2 ranks = 1 group of 1, 3 = 1 group of 2,
4 = a group of 2 and a small group of 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest

pytest.importorskip("mpi4py")

import torch  # noqa: E402

from hpc_dualbatch import checkpoint as C  # noqa: E402
from hpc_dualbatch.config import config_from_dict  # noqa: E402
from hpc_dualbatch.flat import FlatModel  # noqa: E402
from hpc_dualbatch.metrics import read_metrics  # noqa: E402
from hpc_dualbatch.plan import plan_from_config  # noqa: E402
from hpc_dualbatch.schedule import stage_at  # noqa: E402
from hpc_dualbatch.train import Setup, group_specs, run_server  # noqa: E402
from hpc_dualbatch.trainer import MiniEpochStats  # noqa: E402
from hpc_dualbatch.worker import worker_loop  # noqa: E402

from ..helpers import tiny_config  # noqa: E402
from .common import all_true, groups_for  # noqa: E402

EPOCHS = 4
SAMPLES = 2000  # samples per epoch the plan splits into the groups' shares


class Flag:
    raised = 0  # what worker.SignalFlag holds, without installing handlers


class StubTrainer:
    """GroupTrainer's interface (flat, opt, train_mini_epoch, recalibrate, evaluate) over a
    3 -> 2 linear layer with batch norm; records every task it was given."""

    def __init__(self, topo, flag: Flag, preempt_round: int | None) -> None:
        torch.manual_seed(0)  # the same initial weights as the server's (initial_weights())
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        self.flat = FlatModel(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.topo, self.flag, self.preempt_round = topo, flag, preempt_round
        self.tasks: list[tuple[int, int, int, float, int, int]] = []
        self.evals = 0

    def train_mini_epoch(self, round_idx, shares, resolution, batch, lr, dropout, pushes, exchange):
        g = self.topo.group
        self.tasks.append((round_idx, resolution, batch, float(lr), pushes, shares[g]))
        for part in range(pushes):
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
        return MiniEpochStats(mine, 0.01, loss.item() * mine, mine // 2)

    def recalibrate(self, resolution):
        return 0.0

    def evaluate(self, resolution):
        self.evals += 1
        return float(np.abs(self.flat.weights()).sum()), 0.5, 100, 0.01


@pytest.fixture
def shared_dir():
    """One temporary folder for all ranks (rank 0 makes it; pytest's tmp_path differs per rank)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    path = world.bcast(tempfile.mkdtemp(prefix="hdb-loops-") if world.Get_rank() == 0 else None)  # MPI
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield path
    for s, h in handlers.items():  # serve() installs its own; give pytest its own back
        signal.signal(s, h)
    world.Barrier()  # MPI: every rank is done with the folder
    if world.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def run(out: str, preempt_round: int | None = None, resume: bool = False, **over):
    """One run of the real loops. Returns (outcome on rank 0 or None, this rank's trainer or None,
    the config, the group specs)."""
    from mpi4py import MPI

    from hpc_dualbatch.topology import build_topology

    world = MPI.COMM_WORLD
    groups = groups_for(world.Get_size())
    raw = tiny_config("unused.h5", out, workers__groups=groups, workers__small=len(groups) - 1, **over)
    raw["schedule"]["epochs"] = EPOCHS
    raw["plan"]["k"] = 1.05 if len(groups) > 1 else 1.0  # k > 1 buys time for small groups only
    cfg = config_from_dict(raw)
    plan = plan_from_config(cfg, SAMPLES)
    specs = group_specs(cfg, plan)
    topo = build_topology(groups, with_server=True, world=world)
    if topo.is_server:
        os.makedirs(out, exist_ok=True)
        ck = C.load(C.latest(out)) if resume else None
        flat = StubTrainer(topo, Flag(), None).flat
        outcome = run_server(Setup(cfg, None, plan, specs, ck, None), topo, flat.weights(), flat.n_params)
        return outcome, None, cfg, specs
    flag = Flag()
    trainer = StubTrainer(topo, flag, preempt_round)
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
    outcome, trainer, cfg, specs = run(out)
    n = len(specs)
    commits = world.bcast(records(out, "commit") if world.Get_rank() == 0 else None)  # MPI
    ok, why = True, ""
    if trainer is not None:  # each rank of a group trained exactly the tasks the server logged
        g = trainer.topo.group
        logged = [(r["round"], r["resolution"], r["batch"], r["lr"]) for r in commits if r["group"] == g]
        got = [t[:4] for t in trainer.tasks]
        ok = got == logged and [t[0] for t in got] == list(range(len(got)))
        ok &= all(t[2] == specs[g].batch[t[1]] for t in got)  # the group's own batch
        why = f"group {g}: trained {got}, server logged {logged}"
    else:
        status = json.load(open(os.path.join(out, "status.json")))
        evals, merges = records(out, "eval"), records(out, "merge")
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
            and all(r["test_acc"] == 0.5 for r in evals)
            and len(merges) > 0  # push_every: pushes inside each task
            and C.load(C.latest(out)).commits == EPOCHS * n  # the final checkpoint
        )
        why = f"status {status}, stages {stages}, evals {[r['epoch'] for r in evals]}"
    assert all_true(world, ok), why


@pytest.mark.mpi(min_size=2)
def test_a_signal_checkpoints_at_a_barrier_and_the_resumed_run_ends_bit_identical(shared_dir):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    full, cut = os.path.join(shared_dir, "full"), os.path.join(shared_dir, "cut")
    run(full)
    first, _, _, specs = run(cut, preempt_round=1)  # group 0 signalled during its 2nd task
    if world.Get_rank() == 0:
        parked_at = C.load(C.latest(cut)).commits
        state = json.load(open(os.path.join(cut, "status.json")))["state"]
    second, trainer, _, _ = run(cut, resume=True)
    ok, why = True, ""
    if world.Get_rank() == 0:
        n = len(specs)
        a, b = C.load(C.latest(full)), C.load(C.latest(cut))
        commits = [r["commit"] for r in records(cut, "commit")]
        ok = (
            first == "preempted"
            and state == "preempted"
            and n <= parked_at < EPOCHS * n  # stopped early, after group 0's first commit
            and second == "done"
            and commits == list(range(1, EPOCHS * n + 1))  # the metrics continue, no repeats
            and groups(cut) == groups(full)  # round robin: the same order of commits
            and np.array_equal(a.weights, b.weights)  # bit-identical to the uninterrupted run
            and np.array_equal(a.momentum, b.momentum)
        )
        why = f"outcomes {first}/{second}, parked at {parked_at}, commits {commits}"
    elif trainer.topo.group == 0:  # the resumed group starts where the checkpoint left it
        ok = trainer.tasks[0][0] >= 1
    assert all_true(world, ok), why
