"""TensorBoard event files (runtime/events.py): built from the very records metrics.jsonl gets,
read back with TensorBoard's own reader: tags, steps and values, across a resume, on the wall
axis, and a run without the tensorboard package."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from hpc_dualbatch.config import Config
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.runtime import events as E
from hpc_dualbatch.runtime.metrics import (
    MetricsLog,
    commit_record,
    eval_record,
    gap_record,
    merge_record,
    plan_record,
    read_metrics,
)
from tests.helpers import read_events

pytest.importorskip("torch.utils.tensorboard", reason="tensorboard not installed")

ORIGIN = 1_700_000_000.0  # the event times: the run's start + each record's wall


def commit(c: int, g: int, loss: float, wall: float, merge: int, small: bool = False, **over) -> dict:
    fields = dict(
        commit=c, epoch=c / 2, group=g, round_idx=c, small=small, samples=1000, seconds=2.0,
        train_loss=loss, train_acc=1 - loss / 4, lr=0.1, resolution=12, batch=32 if small else 64,
        wall=wall, wait=0.01, merge=merge, staleness=c % 2, distance=0.1 * c, scale=0.5,
    )  # fmt: skip
    return commit_record(**{**fields, **over})


def merge(g: int, m: int, wall: float) -> dict:
    return merge_record(
        group=g, round_idx=0, wall=wall, merge=m, staleness=m - 1, distance=0.01 * m, scale=0.5
    )


def evaluation(epoch: float, loss: float, wall: float) -> dict:
    return eval_record(
        epoch=epoch, group=0, test_loss=loss, test_acc=1 - loss / 4, samples=400, seconds=0.5,
        resolution=12, wall=wall, bn="recalibrate", bn_seconds=0.1,
    )  # fmt: skip


def replan(epoch: float, batches: dict, changed: list, wall: float) -> dict:
    rp = SimpleNamespace(
        batches=batches, shares={0: 500, 1: 500}, target=2.0, scales={0: 1.0, 1: 1.0}, capped=()
    )
    return plan_record(epoch=epoch, resolution=16, replan=rp, changed=changed, wall=wall)


def open_log(tmp_path, x: str = "step", truncate_to: int | None = None) -> MetricsLog:
    events = E.EventLog(str(tmp_path / "tb"), 2, x, ORIGIN)
    return MetricsLog(str(tmp_path / "metrics.jsonl"), truncate_to, events)


def steps(points: list) -> list[int]:
    return [p[0] for p in points]


def pts(points: list) -> list[tuple[int, float, float]]:
    """(step, value, wall time), the value rounded: the event file holds it as float32."""
    return [(s, round(v, 5), t) for s, v, t in points]


RUN = [  # two groups: 0 large, 1 small; n = 2 commits per epoch
    merge(0, 1, 0.4),
    commit(1, 1, 2.0, 1.0, merge=2, small=True),
    commit(2, 0, 1.6, 1.5, merge=3),
    evaluation(1.0, 1.8, 2.0),
    replan(1.0, {0: 64, 1: 48}, [1], 2.1),
    commit(3, 1, 1.2, 3.0, merge=4, small=True, resolution=16, batch=48),
    gap_record(after_commit=3, up_to_commit=3, missing_bytes=0, reason="a test"),
    {"type": "end", "state": "done", "commits": 3, "wall": 3.5},
]


def test_records_become_the_tags_steps_and_values_of_the_event_file(tmp_path):
    log = open_log(tmp_path)
    for rec in RUN:
        log.write(rec)
    log.close()
    ev = read_events(tmp_path / "tb")
    assert sorted(ev) == sorted(
        [f"train/{k}/group{g}" for k in ("loss", "acc", "images_per_s") for g in (0, 1)]
        + [f"server/{k}/group{g}" for k in ("staleness", "distance") for g in (0, 1)]
        + ["test/loss", "test/acc", "B_S/planned/group1/16px"]
        + ["B_S/trained/group1/12px", "B_S/trained/group1/16px"]
    )
    # train: step = commit; a merge and a commit's merge are one server series, step = merge count
    assert pts(ev["train/loss/group1"]) == [(1, 2.0, ORIGIN + 1.0), (3, 1.2, ORIGIN + 3.0)]
    assert pts(ev["train/acc/group0"]) == [(2, 0.6, ORIGIN + 1.5)]
    assert pts(ev["train/images_per_s/group0"]) == [(2, 500.0, ORIGIN + 1.5)]
    assert pts(ev["server/staleness/group0"]) == [(1, 0.0, ORIGIN + 0.4), (3, 0.0, ORIGIN + 1.5)]
    assert pts(ev["server/distance/group1"]) == [(2, 0.1, ORIGIN + 1.0), (4, 0.3, ORIGIN + 3.0)]
    # eval and plan: the commit count of the epoch (epoch x 2 groups); B_S: planned and trained
    assert pts(ev["test/loss"]) == [(2, 1.8, ORIGIN + 2.0)]
    assert pts(ev["test/acc"]) == [(2, 0.55, ORIGIN + 2.0)]
    assert pts(ev["B_S/planned/group1/16px"]) == [(2, 48.0, ORIGIN + 2.1)]
    assert pts(ev["B_S/trained/group1/12px"]) == [(1, 32.0, ORIGIN + 1.0)]
    assert pts(ev["B_S/trained/group1/16px"]) == [(3, 48.0, ORIGIN + 3.0)]
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == RUN  # the same records, once each


def test_wall_axis_steps_are_milliseconds_of_training(tmp_path):
    log = open_log(tmp_path, x="wall")
    for rec in RUN:
        log.write(rec)
    log.close()
    ev = read_events(tmp_path / "tb")
    assert steps(ev["train/loss/group1"]) == [1000, 3000]
    assert steps(ev["server/staleness/group0"]) == [400, 1500]
    assert steps(ev["test/acc"]) == [2000] and steps(ev["B_S/planned/group1/16px"]) == [2100]


def test_a_resume_continues_the_event_stream_without_repeated_steps(tmp_path):
    """A checkpoint after commit 2 and the evaluation of epoch 1; the first run goes on to commit 4
    and epoch 2, then is cut off; the resume redoes commits 3-4 (other values) and epoch 2."""
    log = open_log(tmp_path)
    for rec in RUN[:4]:
        log.write(rec)
    assert steps(read_events(tmp_path / "tb")["test/acc"]) == [2]  # flushed at an evaluation: live
    offset = log.offset()  # what the checkpoint keeps
    for rec in [commit(3, 1, 1.1, 3.0, merge=4), commit(4, 0, 1.0, 3.5, merge=5), evaluation(2.0, 1.4, 4.0)]:
        log.write(rec)  # work the resume does again
    log.events.flush()
    log.close()  # (a crash leaves the same records: the resume rebuilds the event file from them)
    assert steps(read_events(tmp_path / "tb")["test/acc"]) == [2, 4]

    log = open_log(tmp_path, truncate_to=offset)
    redone = [commit(3, 1, 0.9, 3.2, merge=4), commit(4, 0, 0.8, 3.6, merge=5), evaluation(2.0, 1.0, 4.1)]
    for rec in redone + [{"type": "end", "state": "done", "commits": 4, "wall": 4.2}]:
        log.write(rec)
    log.close()

    assert len(list((tmp_path / "tb").iterdir())) == 1  # one event file: rebuilt, then continued
    ev, recs = read_events(tmp_path / "tb"), read_metrics(str(tmp_path / "metrics.jsonl"))
    assert recs == RUN[:4] + redone + [recs[-1]]
    for tag, points in ev.items():
        assert all(a < b for a, b in zip(steps(points), steps(points)[1:])), (tag, points)
    # every point is the metrics file's, the redone commits with their new values
    for g in (0, 1):
        commits = [r for r in recs if r["type"] == "commit" and r["group"] == g]
        assert pts(ev[f"train/loss/group{g}"]) == [
            (r["commit"], round(r["train_loss"], 5), ORIGIN + r["wall"]) for r in commits
        ]
    assert pts(ev["train/loss/group1"])[-1] == (3, 0.9, ORIGIN + 3.2)
    assert pts(ev["test/loss"]) == [(2, 1.8, ORIGIN + 2.0), (4, 1.0, ORIGIN + 4.1)]
    assert steps(ev["server/staleness/group0"]) == [1, 3, 5]


def test_a_point_that_would_repeat_or_go_back_on_its_steps_is_left_out(tmp_path):
    """An evaluation arriving after a later epoch's (order: arrival): TensorBoard would drop the
    later point, so the event file keeps its tag's steps rising; metrics.jsonl keeps both."""
    log = open_log(tmp_path)
    for rec in (evaluation(2.0, 1.0, 5.0), evaluation(1.0, 1.5, 5.5)):
        log.write(rec)
    assert log.events.skipped == 2
    log.close()
    assert pts(read_events(tmp_path / "tb")["test/loss"]) == [(4, 1.0, ORIGIN + 5.0)]
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 2


def test_the_run_opens_its_event_log_as_configured(tmp_path, capsys):
    cfg = Config(out=str(tmp_path))
    log = E.open_log(cfg, None, cfg.n_groups)  # auto, with tensorboard installed
    assert isinstance(log.events, E.EventLog) and (tmp_path / "tb").is_dir()
    log.close()
    cfg.metrics.tensorboard = "never"
    (tmp_path / "metrics.jsonl").unlink()
    log = E.open_log(cfg, None, cfg.n_groups)
    log.close()
    assert log.events is None and capsys.readouterr().out == ""
    E.check("always")  # installed: nothing to say


def test_without_tensorboard_a_run_says_so_once_and_writes_its_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails
    assert E.unavailable() is not None
    cfg = Config(out=str(tmp_path))
    log = E.open_log(cfg, None, cfg.n_groups)
    for rec in RUN:
        log.write(rec)
    log.close()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith("tensorboard: no event files (") and "pip install" in said[0]
    assert not (tmp_path / "tb").exists()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == RUN
    E.check("auto")
    E.check("never")
    with pytest.raises(ConfigError, match=r"'metrics.tensorboard' is 'always' .* pip install tensorboard"):
        E.check("always")


def test_a_link_or_file_at_the_event_folder_is_replaced_never_written_through(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = Config(out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tb").symlink_to(elsewhere)
    E.open_log(cfg, None, 2).close()
    assert (tmp_path / "run" / "tb").is_dir() and not (tmp_path / "run" / "tb").is_symlink()
    assert list(elsewhere.iterdir()) == []
    (tmp_path / "run" / "metrics.jsonl").unlink()
    for p in (tmp_path / "run" / "tb").iterdir():
        p.unlink()
    (tmp_path / "run" / "tb").rmdir()
    (tmp_path / "run" / "tb").write_text("in the way")
    E.open_log(cfg, None, 2).close()
    assert (tmp_path / "run" / "tb").is_dir() and capsys.readouterr().out == ""


def test_a_failing_event_file_stops_itself_not_the_run(tmp_path, capsys):
    log = open_log(tmp_path)

    def broken(rec):
        raise OSError(28, "No space left on device")

    log.events.write = broken
    for rec in RUN:
        log.write(rec)
    log.close()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "tensorboard: event files stopped (OSError" in said[0]
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == RUN
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "blocked").write_text("a file where the run folder's tb/ would go")
    cfg = Config(out=str(tmp_path / "blocked"))  # tb/ cannot be made: no event files, a line, no error
    assert E.open_events(cfg.out, "auto", "step", 2, 0.0) is None
    assert "tensorboard: no event files (" in capsys.readouterr().out
