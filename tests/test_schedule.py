"""Schedules epoch by epoch against the paper's stage tables; the shipped configs load."""

from __future__ import annotations

import os

import pytest

from hpc_dualbatch.config import ScheduleConfig, load_config
from hpc_dualbatch.method.schedule import (
    Stage,
    dropout_at,
    epoch_of_commit,
    eval_resolution,
    format_stage_table,
    lr_at,
    lr_stages,
    resolution_at,
    stage_at,
    stage_for_count,
    stage_table,
    task_rate,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "hpc_dualbatch", "configs")


def _cfg(name: str):
    return load_config(os.path.join(CONFIGS, name))


def _paper_table(rows: list[tuple[int, int, float, int]]) -> dict[int, tuple[float, int]]:
    """Paper rows (first, last epoch 1-based inclusive, lr, px) -> {0-based epoch: (lr, px)}."""
    out = {}
    for first, last, lr, px in rows:
        for e in range(first - 1, last):
            out[e] = (lr, px)
    return out


# Method section 2, 1-based as in the paper.
CIFAR = _paper_table(
    [
        (1, 40, 0.2, 24),
        (41, 80, 0.2, 32),
        (81, 100, 0.02, 24),
        (101, 120, 0.02, 32),
        (121, 130, 0.002, 24),
        (131, 140, 0.002, 32),
    ]
)
IMAGENET = _paper_table(
    [
        (1, 20, 0.2, 160),
        (21, 40, 0.2, 224),
        (41, 60, 0.2, 288),
        (61, 70, 0.02, 160),
        (71, 80, 0.02, 224),
        (81, 90, 0.02, 288),
        (91, 95, 0.002, 160),
        (96, 100, 0.002, 224),
        (101, 105, 0.002, 288),
    ]
)


@pytest.mark.parametrize(
    "name, table, dropout",
    [
        ("cifar100_paper.yaml", CIFAR, {24: 0.1, 32: 0.2}),
        ("imagenet_paper.yaml", IMAGENET, {160: 0.1, 224: 0.2, 288: 0.3}),
    ],
)
def test_paper_schedules_epoch_by_epoch(name: str, table: dict, dropout: dict) -> None:
    sched = _cfg(name).schedule
    assert sched.epochs == len(table)
    rows = stage_table(sched)
    assert len(rows) == sched.epochs
    for e, (lr, px) in table.items():
        assert rows[e] == Stage(epoch=e, lr=lr, resolution=px, dropout=dropout[px]), f"epoch {e + 1}"
        assert lr_at(e, sched) == lr and resolution_at(e, sched) == px


def test_paper_b_l_in_configs() -> None:
    assert _cfg("cifar100_paper.yaml").plan.large_batch == {24: 600, 32: 560}
    assert _cfg("imagenet_paper.yaml").plan.large_batch == {160: 2330, 224: 1110, 288: 740}
    assert _cfg("cifar100_paper.yaml").plan.k == 1.05


def test_fashion_mnist_config() -> None:
    cfg = _cfg("fashion_mnist.yaml")
    assert cfg.schedule.resolutions == [20, 24, 28]
    assert cfg.workers.groups == [1, 1, 1] and cfg.workers.small == 1
    assert cfg.plan.timing == "hpc_dualbatch/configs/fashion_mnist_timing.json"
    assert [s.resolution for s in stage_table(cfg.schedule)] == [20, 24, 28, 20, 24, 28]
    assert cfg.out == "runs/fashion_mnist"


def _sched(**kw) -> ScheduleConfig:
    base = dict(epochs=10, lr=[0.1, 0.01], milestones=[7], resolutions=[8, 12, 16], resolution_mode="cyclic")
    base.update(kw)
    return ScheduleConfig(**base)


def test_cyclic_split_earlier_sub_stages_get_extra() -> None:
    # Stage 0: 7 epochs over 3 px -> 3, 2, 2; stage 1: 3 epochs -> 1, 1, 1.
    s = _sched()
    assert [resolution_at(e, s) for e in range(10)] == [8, 8, 8, 12, 12, 16, 16, 8, 12, 16]
    # A stage shorter than the number of resolutions never reaches the highest.
    s = _sched(epochs=9, milestones=[7])
    assert [resolution_at(e, s) for e in range(7, 9)] == [8, 12]


def test_progressive_and_fixed() -> None:
    s = _sched(resolution_mode="progressive")
    assert [resolution_at(e, s) for e in range(10)] == [8, 8, 8, 8, 12, 12, 12, 16, 16, 16]
    s = _sched(resolution_mode="fixed")
    assert {resolution_at(e, s) for e in range(10)} == {16}
    cifar = _cfg("cifar100_paper.yaml").schedule
    cifar.resolution_mode = "progressive"
    assert [resolution_at(e, cifar) for e in (0, 69, 70, 139)] == [24, 24, 32, 32]


def test_single_stage_cyclic_is_progressive() -> None:
    s = _sched(lr=[0.1], milestones=[])
    p = _sched(lr=[0.1], milestones=[], resolution_mode="progressive")
    assert stage_table(s) == stage_table(p)
    assert lr_stages(s) == [(0, 10)]


def test_lr_steps_and_fractional_epochs() -> None:
    s = _sched(epochs=140, lr=[0.2, 0.02, 0.002], milestones=[80, 120], resolutions=[24, 32])
    assert lr_at(0.0, s) == 0.2 and lr_at(79.99, s) == 0.2 and lr_at(80.0, s) == 0.02
    assert lr_at(119.5, s) == 0.02 and lr_at(120, s) == 0.002
    assert lr_at(140.0, s) == 0.002  # the final commit lands exactly on `epochs`
    with pytest.raises(ValueError):
        lr_at(-0.1, s)


def test_warmup() -> None:
    s = _sched(lr=[0.2, 0.02], milestones=[7], warmup_epochs=4)
    assert lr_at(0, s) == pytest.approx(0.02)
    assert lr_at(2, s) == pytest.approx(0.02 + 0.18 * 0.5)
    assert lr_at(3.999, s) == pytest.approx(0.2, rel=1e-3)
    assert lr_at(4, s) == 0.2 and lr_at(8, s) == 0.02
    assert stage_at(1, s).lr == pytest.approx(0.02 + 0.18 / 4)


def test_a_task_ramps_its_warm_up_per_step_over_its_share_of_the_epoch() -> None:
    s = _sched(lr=[0.1, 0.01], milestones=[5], warmup_epochs=1, warmup_ramp="task")
    assert task_rate(0.01, 0.0, 1, s) == 0.01  # warmup_ramp: task: one rate
    s = _sched(lr=[0.1, 0.01], milestones=[5], warmup_epochs=1)  # warmup_ramp: step (the default)
    one = task_rate(0.01, 0.0, 1, s)  # one group: the task is the whole first epoch
    assert [one(f) for f in (0.0, 0.5)] == pytest.approx([lr_at(0.0, s), lr_at(0.5, s)])
    third = task_rate(lr_at(0.5, s), 0.5, 4, s)  # 4 groups: the task covers [0.5, 0.75)
    assert [third(f) for f in (0.0, 1.0)] == pytest.approx([lr_at(0.5, s), lr_at(0.75, s)])
    small = task_rate(0.5 * lr_at(0.25, s), 0.25, 4, s)  # a small group at half the rate
    assert small(0.5) == pytest.approx(0.5 * lr_at(0.375, s))
    assert task_rate(0.1, 1.0, 4, s) == 0.1  # past the warm-up: one rate


def test_dropout() -> None:
    s = _sched(dropout={8: 0.1, 16: 0.3})
    assert dropout_at(8, s) == 0.1 and dropout_at(12, s) == 0.0 and dropout_at(16, s) == 0.3
    assert stage_at(0, s).dropout == 0.1


def test_commits() -> None:
    s = _sched()
    assert epoch_of_commit(0, 3, s) == 0
    assert epoch_of_commit(2, 3, s) == 0 and epoch_of_commit(3, 3, s) == 1
    assert epoch_of_commit(30, 3, s) == 9 and epoch_of_commit(10_000, 3, s) == 9  # clamped
    assert stage_for_count(21, 3, s) == stage_at(7, s)
    with pytest.raises(ValueError):
        epoch_of_commit(-1, 3, s)


def test_an_evaluation_uses_the_resolution_of_the_last_epoch_trained() -> None:
    s = _sched()  # epochs 1-10 at 8, 8, 8, 12, 12, 16, 16 | 8, 12, 16 px
    assert [eval_resolution(e, s) for e in range(1, 11)] == [8, 8, 8, 12, 12, 16, 16, 8, 12, 16]
    assert eval_resolution(7, s) == 16  # the cycle's last epoch, though the next task is at 8 px
    assert eval_resolution(6.5, s) == 16 and eval_resolution(0.25, s) == 8  # inside an epoch
    for bad in (0, -1, 10.5):
        with pytest.raises(ValueError, match="epochs_done"):
            eval_resolution(bad, s)


def test_out_of_range() -> None:
    s = _sched()
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            resolution_at(bad, s)


def test_format_stage_table() -> None:
    text = format_stage_table(_cfg("cifar100_paper.yaml").schedule)
    assert len(text.splitlines()) == 6
    assert "epochs    1-40" in text and "epochs  131-140" in text
