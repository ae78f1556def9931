"""A worker group's steps (every rank the same count; pushes split a task evenly) and
batch-norm recalibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_dualbatch.runtime.engine import recalibrate_bn
from hpc_dualbatch.runtime.trainer import bn_indices, part_ends, rank_batches


@pytest.mark.parametrize(
    "steps, parts, ends", [(10, 1, [10]), (10, 4, [2, 5, 8, 10]), (3, 5, [1, 2, 3]), (0, 3, [0])]
)
def test_part_ends(steps, parts, ends):
    assert part_ends(steps, parts) == ends


def test_bn_samples_are_fixed_by_the_seed_and_inside_the_training_split():
    a, b, c = bn_indices(1000, 256, 1), bn_indices(1000, 256, 1), bn_indices(1000, 256, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 256 and a.min() >= 0 and a.max() < 1000
    assert len(bn_indices(100, 256, 1)) == 100


def test_recalibration_recovers_the_statistics_of_the_data():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(512, 1, 3, 3) * 3 + 5
    model[1].running_mean.fill_(100.0)  # stale statistics, e.g. averaged from other models
    batches = [(x[i : i + 128], None) for i in range(0, 512, 128)]
    assert recalibrate_bn(model, batches) == 512
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3)), rtol=2e-2, atol=1e-3)
    assert model[1].momentum == 0.1 and not model.training


@pytest.mark.parametrize(
    "n, batch, size", [(1000, 64, 1), (1000, 64, 2), (1001, 65, 3), (130, 64, 3), (129, 64, 2)]
)
def test_every_rank_takes_the_same_number_of_steps(n, batch, size):
    order = np.random.default_rng(0).permutation(n)
    parts = [rank_batches(order, batch, r, size) for r in range(size)]
    steps = {math.ceil(len(idx) / b) for idx, b in parts}
    assert len(steps) == 1  # one Horovod allreduce per step on every rank
    got = np.concatenate([idx for idx, _ in parts])
    assert len(set(got.tolist())) == len(got)  # disjoint
    dropped = n - len(got)
    assert 0 <= dropped < size  # at most a last step smaller than the group


@pytest.mark.parametrize("mode, momentum", [("ps", 0.7), ("sync", 0.95)])
def test_a_group_trains_at_its_modes_momentum(tmp_path, mode, momentum):
    """A parameter-server run's groups take optim.ps_momentum, a synchronous run optim.momentum."""
    from types import SimpleNamespace

    from hpc_dualbatch.config import config_from_dict
    from hpc_dualbatch.runtime.trainer import GroupTrainer
    from tests.helpers import tiny_config

    raw = tiny_config("unused.h5", tmp_path / "run", optim={"momentum": 0.95, "ps_momentum": 0.7}, mode=mode)
    if mode == "sync":
        raw.update(workers={"groups": [1], "small": 0}, plan={**raw["plan"], "k": 1.0})
    cfg = config_from_dict(raw)
    staged = SimpleNamespace(num_classes=10, channels=1, num_samples=lambda split: 100)
    topo = SimpleNamespace(group=0, group_rank=0, group_size=1, local_rank=0)
    trainer = GroupTrainer(cfg, staged, topo, lambda opt, params: opt, lambda x: None)
    assert cfg.momentum == (f"optim.{'ps_' if mode == 'ps' else ''}momentum", momentum)
    assert [g["momentum"] for g in trainer.opt.param_groups] == [momentum]


def test_a_task_trains_at_its_stages_momentum(tmp_path, synthetic_h5):
    """optim.ps_momentum_by_lr: a task's momentum is that of the learning-rate stage of its
    place in the schedule (the tiny schedule: lr 0.01 from epoch 3), set on the optimiser for
    its mini-epoch; without the list, optim.ps_momentum."""
    import dataclasses
    from types import SimpleNamespace

    from hpc_dualbatch.config import config_from_dict
    from hpc_dualbatch.data import open_staged
    from hpc_dualbatch.method.schedule import task_momentum
    from hpc_dualbatch.runtime.trainer import GroupTrainer, MiniEpoch
    from tests.helpers import tiny_config

    optim = {"ps_momentum": 0.8, "ps_momentum_by_lr": [0.7, 0.9]}
    cfg = config_from_dict(tiny_config(synthetic_h5, tmp_path / "run", optim=optim))
    at = [task_momentum(e, cfg.optim, cfg.schedule) for e in (0.0, 2.75, 3.0, 3.5)]
    assert at == [0.7, 0.7, 0.9, 0.9]
    assert task_momentum(3.0, dataclasses.replace(cfg.optim, ps_momentum_by_lr=[]), cfg.schedule) == 0.8
    topo = SimpleNamespace(group=0, group_rank=0, group_size=1, local_rank=0)
    trainer = GroupTrainer(cfg, open_staged(synthetic_h5), topo, lambda opt, params: opt, lambda x: None)
    assert [g["momentum"] for g in trainer.opt.param_groups] == [0.8]
    trainer.train_mini_epoch(MiniEpoch(0, [64], 12, 32, 0.01, 0.0, momentum=0.9))
    assert [g["momentum"] for g in trainer.opt.param_groups] == [0.9]


def test_the_parts_of_a_shared_final_evaluation_add_up_to_the_whole(tmp_path, synthetic_h5):
    """One rank as slots 0-2 of 3: the parts cover the test split once and their sums are what
    the rank measures alone (the server adds the parts of a shared final evaluation so)."""
    from types import SimpleNamespace

    from hpc_dualbatch.config import config_from_dict
    from hpc_dualbatch.data import open_staged
    from hpc_dualbatch.runtime.trainer import GroupTrainer
    from tests.helpers import tiny_config

    cfg = config_from_dict(tiny_config(synthetic_h5, tmp_path / "run"))
    topo = SimpleNamespace(group=0, group_rank=0, group_size=1, local_rank=0)
    trainer = GroupTrainer(cfg, open_staged(synthetic_h5), topo, lambda opt, params: opt, lambda x: None)
    loss, acc, n, _ = trainer.evaluate(12)
    parts = [trainer.evaluate(12, j, 3) for j in range(3)]
    assert [p[2] for p in parts] == [134, 133, 133] and n == 400
    assert round(sum(p[1] * p[2] for p in parts)) == round(acc * n)  # correct answers, exactly
    assert sum(p[0] * p[2] for p in parts) == pytest.approx(loss * n, rel=1e-5)
