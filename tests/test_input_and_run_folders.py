"""Bad input and run folders: no run folder left unusable, no silent wrong result, no runaway
input, messages instead of tracebacks. Listed in docs/reliability.md as `I::`.

Unit tests where the behaviour lives in one function; a real `mpirun` job (under hard timeouts,
as in tests/test_reliability.py) only where it needs MPI: start-up agreement of every rank, a
rank killed before the first checkpoint, a data file truncated under a running job.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_dualbatch.commands import train as T
from hpc_dualbatch.config import config_from_dict, load_config
from hpc_dualbatch.data import SyntheticSpec, TrainLoader, open_staged, prepare
from hpc_dualbatch.errors import CheckpointError, ConfigError, DataError, HDBError, OutputError, PlanError
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime import resume as R
from hpc_dualbatch.runtime import runfolder as F
from hpc_dualbatch.runtime.metrics import MetricsLog, read_metrics, repair
from tests.helpers import (
    ROOT,
    hdb,
    kill_job,
    rank_pids,
    start,
    start_up_error,
    tiny_config,
    wait_for,
    write_config,
)
from tests.test_reliability import HAVE_HOROVOD, JOB_S, QUICK_S, one_clean_error, status, timed

mpi = pytest.mark.skipif(not HAVE_HOROVOD, reason="Horovod not installed")
QUIET = {"log": lambda msg: None}
TINY = SyntheticSpec(samples=60, test_samples=20, classes=4, channels=3, size=16, seed=3)


def args(config=None, resume=None, sets=None) -> argparse.Namespace:
    return argparse.Namespace(config=config, resume=resume, set=sets)


def run_folder(tmp: Path, data: str, **over) -> tuple[Path, object]:
    out = tmp / "run"
    out.mkdir(exist_ok=True)
    cfg_path = write_config(tmp / "run.yaml", tiny_config(data, out, **over))
    return out, load_config(cfg_path)


def fake_checkpoint(out: Path, cfg, commits: int = 2, offset: int = 0, data=None) -> str:
    return C.save(
        str(out),
        C.Checkpoint(
            np.zeros(4, np.float32),
            C.Momenta.of([np.zeros(4, np.float32)] * 2, 4),
            commits,
            [1, 1],
            1.0,
            offset,
            cfg.to_dict(),
            data=data,
        ),
    )


def commit(n: int) -> dict:
    return {"type": "commit", "commit": n, "group": n % 2, "small": False, "samples": 8, "seconds": 0.1}


def lines(*recs: dict) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in recs)


# --- 1, 3: every run folder can be started or resumed ------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_folder_with_metrics_but_no_checkpoint_starts_over(tmp_path, synthetic_h5, capsys, resume):
    """A crash (or a full disk) before the first checkpoint: both commands start at commit 0."""
    out, cfg = run_folder(tmp_path, synthetic_h5)
    (out / "metrics.jsonl").write_bytes(lines(commit(1), commit(2)) + b'{"type":"comm')
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.1").write_bytes(b"")
    lock, ck = F.prepare_out(cfg, resume)
    lock.close()
    assert ck is None
    said = capsys.readouterr().out
    assert "holds metrics but no checkpoint" in said and "starting it from commit 0" in said
    assert not (out / "metrics.jsonl").exists()  # the new run writes a new file
    assert (out / "metrics-stopped-1.jsonl").read_bytes().startswith(lines(commit(1)))
    assert not (out / "tb").exists() and (out / "tb-stopped-1" / "events.out.tfevents.1").exists()


def test_resume_of_a_folder_without_any_checkpoint_starts_at_commit_0(tmp_path, synthetic_h5, capsys):
    out, _ = run_folder(tmp_path, synthetic_h5)
    write_config(out / "config.yaml", tiny_config(synthetic_h5, out))
    lock, ck = F.prepare_out(T._config(args(resume=str(out))), True)
    lock.close()
    assert ck is None and "has no checkpoint yet: starting the run from commit 0" in capsys.readouterr().out


def test_fresh_run_in_a_folder_with_checkpoints_but_no_metrics_is_refused(tmp_path, synthetic_h5):
    out, cfg = run_folder(tmp_path, synthetic_h5)
    path = fake_checkpoint(out, cfg)
    with pytest.raises(ConfigError, match=rf"holds a run's checkpoints \({re.escape(path)}\) but no metrics"):
        F.prepare_out(cfg, False)
    assert os.listdir(out / "checkpoints") == [os.path.basename(path)]  # nothing touched


# --- 2: metrics shorter than the checkpoint, or deleted ----------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["cut-mid-line", "nul-tail", "deleted", "longer"],
)
def test_metrics_are_cut_back_to_the_checkpoint_never_padded(tmp_path, damage):
    path = tmp_path / "metrics.jsonl"
    good = lines(
        commit(1), commit(2), {"type": "eval", "epoch": 1.0, "test_loss": 1, "test_acc": 0.5, "wall": 1}
    )
    offset = len(good)
    if damage == "cut-mid-line":
        path.write_bytes(good[:-7])  # a crash lost the unsynced tail
    elif damage == "nul-tail":
        path.write_bytes(good[:20] + b"\0" * (offset - 20))  # a crash left the size, not the data
    elif damage == "longer":
        path.write_bytes(good + lines(commit(3)))  # records after the checkpoint: done again
    size, gap = repair(str(path), offset, commits=2)
    data = path.read_bytes()
    assert b"\0" not in data and size == len(data)
    recs = read_metrics(str(path))  # valid JSON lines only
    if damage == "longer":
        assert gap is None and data == good
        return
    assert gap is not None and recs[-1] == gap and gap["up_to_commit"] == 2
    assert gap["after_commit"] == {"cut-mid-line": 2, "nul-tail": 0, "deleted": 0}[damage]
    assert gap["missing_bytes"] == offset - (len(data) - len(json.dumps(gap, separators=(",", ":"))) - 1)
    # The server then opens the log at the repaired size: nothing is cut, nothing padded.
    log = MetricsLog(str(path), size)
    log.write(commit(3))
    log.close()
    assert read_metrics(str(path))[-1]["commit"] == 3


def test_metrics_log_never_pads_a_short_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(lines(commit(1)))
    MetricsLog(str(path), 10_000).close()
    assert path.read_bytes() == lines(commit(1))


def test_status_counts_the_gaps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"")
    repair(str(path), 100, commits=4)
    with open(path, "ab") as f:
        f.write(lines({"type": "eval", "epoch": 3.0, "test_loss": 1.0, "test_acc": 0.25, "wall": 2.0}))
    assert F.summarize(str(path))["metrics_gaps"] == 1


def test_the_final_accuracy_is_the_last_epochs_though_its_evaluation_reached_the_log_first(tmp_path):
    """Two groups evaluate concurrently: epoch 4's (the final) may be logged before epoch 3's."""
    path = tmp_path / "metrics.jsonl"
    ev = [{"type": "eval", "epoch": e, "test_loss": 1.0 - a, "test_acc": a, "wall": w}
          for e, a, w in [(1.0, 0.5, 1.0), (2.0, 0.6, 2.0), (4.0, 0.8, 3.0), (3.0, 0.7, 3.5)]]  # fmt: skip
    path.write_bytes(lines(*ev))
    s = F.summarize(str(path))
    assert s["final_test_acc"] == 0.8 and s["final_test_loss"] == pytest.approx(0.2)
    assert s["best_test_acc"] == 0.8 and s["epochs_evaluated"] == 4


# --- 4: identity and operational keys; data compared by content --------------------------------


def test_operational_keys_may_change_on_resume_identity_keys_may_not(tmp_path, synthetic_h5):
    raw = tiny_config(synthetic_h5, tmp_path / "run")
    saved = config_from_dict(raw).to_dict()
    moved = tiny_config(
        "/elsewhere/copy.h5",
        tmp_path / "moved",
        threads=2,
        device="auto",
        data__prefetch=4,
        data__in_memory="never",
        data__eval_batch=7,
        server__poll_max_s=0.01,
        checkpoint__keep=5,
        checkpoint__every_epochs=3,
    )
    moved["metrics"] = {"tensorboard": "never", "tensorboard_x": "wall"}
    R.check_compatible("ck.npz", saved, config_from_dict(moved).to_dict())  # accepted
    older = {k: v for k, v in saved.items() if k != "metrics"}  # made before the metrics section
    R.check_compatible("ck.npz", older, config_from_dict(raw).to_dict())
    for key, value in [("server__order", "arrival"), ("data__augment", False), ("plan__k", 1.1)]:
        with pytest.raises(CheckpointError, match=key.replace("__", ".")):
            R.check_compatible(
                "ck.npz", saved, config_from_dict({**raw, **_nested(key, value, raw)}).to_dict()
            )
    # A key this version does not know (added later) is identity too.
    with pytest.raises(CheckpointError, match="server.new_key: checkpoint None, now 1"):
        R.check_compatible("ck.npz", saved, {**saved, "server": {**saved["server"], "new_key": 1}})
    assert "data.path" in R.OPERATIONAL and "seed" not in R.OPERATIONAL


def _nested(key: str, value, raw: dict) -> dict:
    section, leaf = key.split("__")
    return {section: {**raw[section], leaf: value}}


def test_data_is_compared_by_content_not_path(tmp_path, synthetic_h5):
    moved = tmp_path / "node-local" / "copy.h5"
    moved.parent.mkdir()
    shutil.copy(synthetic_h5, moved)
    before = open_staged(synthetic_h5).fingerprint()
    R.check_same_data("ck.npz", before, open_staged(str(moved)).fingerprint(), str(moved))  # accepted
    changed = edited(tmp_path, synthetic_h5, _shift_labels, "changed.h5")  # same shapes, other labels
    with pytest.raises(CheckpointError, match=r"other data than the staged file .*changed.h5.*labels_sha256"):
        R.check_same_data("ck.npz", before, open_staged(changed).fingerprint(), changed)
    R.check_same_data("ck.npz", None, before, synthetic_h5)  # a checkpoint from before fingerprints


def test_resume_checks_the_data_fingerprint_saved_with_the_checkpoint(tmp_path, synthetic_h5):
    out, cfg = run_folder(tmp_path, synthetic_h5)
    other = tmp_path / "other.h5"
    prepare("synthetic", None, "12,16", str(other), synthetic=SyntheticSpec(samples=300, size=16), **QUIET)
    C.bind_data(open_staged(str(other)).fingerprint())
    try:
        path = fake_checkpoint(out, cfg)  # a checkpoint of a run on other.h5
    finally:
        C.bind_data(None)
    (out / "metrics.jsonl").write_bytes(b"")
    assert C.load(path).data["train_samples"] == 300
    with pytest.raises(CheckpointError, match="train_samples: checkpoint 300, now 2000"):
        F.prepare_out(cfg, True, open_staged(synthetic_h5))


# --- 5: the staged file changes under a running job ---------------------------------------------


@pytest.mark.parametrize("change", ["truncate", "rewrite", "remove"])
def test_a_staged_file_that_changes_under_the_loader_stops_it(tmp_path, synthetic_h5, change):
    path = tmp_path / "staged.h5"
    shutil.copy(synthetic_h5, path)
    staged = open_staged(str(path))
    loader = TrainLoader(staged, "train", 12, np.arange(256), 32, in_memory="never", prefetch=0)
    batches = iter(loader)
    next(batches)
    if change == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif change == "rewrite":
        time.sleep(0.01)
        with open(path, "r+b") as f:  # same size, other bytes, new mtime
            f.seek(os.path.getsize(path) - 16)
            f.write(b"\xff" * 16)
    else:
        os.unlink(path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        next(batches)  # the next streamed batch
    with pytest.raises(DataError, match=r"changed while the run was using it|disappeared"):
        TrainLoader(staged, "train", 16, np.arange(8), 8, in_memory="auto")  # the next mini-epoch


# --- 6, 7: data and plans that would record meaningless numbers ----------------------------------


def _empty_test_split(f: h5py.File) -> None:
    for name in list(f["test/images"]):
        del f[f"test/images/{name}"]
        r = int(name)
        f.create_dataset(f"test/images/{name}", (0, int(f.attrs["channels"]), r, r), dtype=np.uint8)
    del f["test/labels"]
    f.create_dataset("test/labels", (0,), dtype=np.int64)


def _shift_labels(f: h5py.File) -> None:
    f["train/labels"][...] = (f["train/labels"][()] + 1) % int(f.attrs["num_classes"])


def _one_class(f: h5py.File) -> None:
    f["train/labels"][...] = 0


def edited(tmp: Path, src: str, edit, name: str = "edited.h5") -> str:
    dst = tmp / name
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return str(dst)


def test_data_without_test_samples_or_with_one_class_is_refused(tmp_path, synthetic_h5):
    with pytest.raises(DataError, match=r"edited.h5' has 0 test samples.*non-empty test"):
        open_staged(edited(tmp_path, synthetic_h5, _empty_test_split)).check_trainable()
    with pytest.raises(DataError, match=r"only class 'class0'; a classifier needs at least 2"):
        open_staged(edited(tmp_path, synthetic_h5, _one_class, "one.h5")).check_trainable()
    open_staged(synthetic_h5).check_trainable()


def test_a_group_whose_share_rounds_below_its_ranks_is_refused(synthetic_h5, tmp_path):
    from hpc_dualbatch.method.plan import plan_from_config

    raw = tiny_config(synthetic_h5, tmp_path, workers__groups=[2, 1], plan__samples_per_epoch=2)
    cfg = config_from_dict(raw)
    with pytest.raises(PlanError, match=r"plan.samples_per_epoch d = 2 gives group 0 \(2 ranks.*at least 3"):
        plan_from_config(cfg, 2)
    plan_from_config(cfg, 3)  # the minimum it names works


# --- 9, 10, 11: runaway input ------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)  # 9**9 = 387 million strings in about 500 bytes


FLOW_BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi"))
    + "]"
)


@pytest.mark.parametrize(
    "text",
    [
        "schedule:\n  lr: *i\n",
        "plan:\n  large_batch: *i\n",
        "seed: *i\n",
    ],
    ids=["list", "mapping", "scalar"],
)
def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, text):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + text)
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert time.time() - t0 < 2
    assert "bomb.yaml' expands to more than 100000 values" in str(e.value) and len(str(e.value)) < 400


def test_yaml_bomb_in_an_override_recursion_and_depth_are_refused():
    t0 = time.time()
    with pytest.raises(ConfigError, match="override 'schedule.lr=.*expands to more than"):
        load_config(None, ["schedule.lr=" + FLOW_BOMB])
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(None, ["schedule.lr=&a [1, *a]"])
    with pytest.raises(ConfigError, match="nests"):
        load_config(None, ["schedule.lr=" + "[" * 200 + "]" * 200])
    assert time.time() - t0 < 2


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.width=" + "x" * 100_000])
    assert len(str(e.value)) < 300 and "..." in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["schedule.resolutions=" + json.dumps(list(range(50_000, 0, -1)))])
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("key", ["server.poll_min_s", "server.poll_max_s"])
def test_poll_intervals_have_an_upper_bound(synthetic_h5, tmp_path, key):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(synthetic_h5, tmp_path / "run"))
    with pytest.raises(ConfigError, match=rf"'{key}' is 100.0 s; valid: up to 1.0 s"):
        load_config(cfg, ["server.poll_max_s=100", f"{key}=100"])


def test_plan_epochs_are_bounded(synthetic_h5, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(synthetic_h5, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"'schedule.epochs' is 1000000000; valid: 1..100000"):
        load_config(cfg, ["schedule.epochs=1000000000"])


@pytest.mark.job
def test_plan_command_at_the_epoch_bound_is_quick_and_small(synthetic_h5, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(synthetic_h5, tmp_path / "run"))
    code = (
        "import resource, sys; from hpc_dualbatch.cli import main; rc = main(sys.argv[1:]); "
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    sets = ["--set", "schedule.epochs=100000", "--set", "schedule.milestones=[50000]"]
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", code, "plan", "--config", cfg, *sets, "--out", str(tmp_path / "p.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 60
    assert int(r.stdout.split("maxrss_kb")[1]) < 1_500_000  # KiB: torch alone is ~ 500 MB


# --- 12: archives and images that would take the machine's memory -------------------------------


def test_cifar_member_larger_than_the_format_is_refused_before_it_is_read(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        meta = pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 40 << 20  # 40 MiB of zeros (compresses to ~40 KiB); a real batch is 31 MB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(
        DataError, match=r"member 'cifar-10-batches-py/data_batch_1' is 41943040 bytes.*at most"
    ):
        prepare("cifar10", str(archive), "32", str(tmp_path / "o.h5"), **QUIET)


def test_decompression_bomb_image_names_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from hpc_dualbatch.data import imagefolder as sources

    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "0.png")
    Image.new("RGB", (64, 64)).save(root / "train" / "b" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: a "bomb"
    with pytest.raises(DataError, match=r"image file '.*train/b/huge.png' is too large to decode safely"):
        sources.load_resized(str(root / "train" / "b" / "huge.png"), [8])
    with pytest.raises(DataError, match="huge.png"):
        prepare("imagefolder", str(root), "8", str(tmp_path / "o.h5"), **QUIET)


# --- 13: messages, not tracebacks ----------------------------------------------------------------


def test_train_without_arguments_asks_for_config_or_resume():
    with pytest.raises(ConfigError, match=r"train needs --config CONFIG.yaml .* or --resume RUN_DIR"):
        T._config(args())


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_unusable_output_folder_is_a_message(tmp_path, synthetic_h5, monkeypatch, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"file": blocker, "under-a-file": blocker / "run", "read-only": tmp_path / "ro" / "run"}[kind]
    cfg = config_from_dict(tiny_config(synthetic_h5, out))
    if kind == "read-only":  # tests run as root, which ignores permissions: simulate the mount
        real = os.makedirs

        def makedirs(path, *a, **k):
            if str(path).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "makedirs", makedirs)
    err = {"file": ConfigError, "under-a-file": OutputError, "read-only": OutputError}[kind]
    text = {
        "file": "which is a file",
        "under-a-file": "Not a directory",
        "read-only": "Read-only file system",
    }
    with pytest.raises(err, match=text[kind]):
        F.prepare_out(cfg, False)


def test_empty_out_is_refused():
    with pytest.raises(ConfigError, match="'out' is empty"):
        load_config(None, ["out=''"])


def test_disk_full_while_writing_metrics_is_a_message(tmp_path):
    class Full(io.BytesIO):  # a disk that fills up: every write fails with ENOSPC, as /dev/full's
        def write(self, data):  # (a device the metrics file is no longer allowed to be)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(str(path))
    log._f.close()
    log._f = Full()
    with pytest.raises(OutputError, match=rf"could not write metrics file {path}: No space left on device"):
        log.write(commit(1))
    with contextlib.suppress(OSError):
        log.close()
    with pytest.raises(OutputError, match="'/dev/full' is a character device, not a regular file"):
        MetricsLog("/dev/full")


@pytest.mark.parametrize(
    ("arch", "text"),
    [
        ("raft_small", "'raft_small': a torchvision model, but not an image classifier"),
        ("resnet_nonexistent", "not resnet18_cifar nor a torchvision classification model"),
        ("vit_b_16", "cannot take 12 px images"),
    ],
)
def test_model_arch_that_cannot_work_is_a_config_error(arch, text):
    from hpc_dualbatch.runtime.model import check_model

    with pytest.raises(ConfigError, match=re.escape(text)):
        check_model(arch, 10, 3, 8, [12, 16])


def _report(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpc_dualbatch", "report", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


REPORT_CASES = {
    "bad-json": (b'{"type": "eval", "epoch": 1,\n', "line 1: not a metrics record"),
    "no-type": (b'{"epoch": 1}\n', "line 1: not a metrics record"),
    "no-test-acc": (b'{"type": "eval", "epoch": 1, "test_loss": 1, "wall": 1}\n', "without test_acc"),
    "binary": (bytes(range(256)) * 4, "not a metrics record"),
    "string-acc": (
        b'{"type": "eval", "epoch": 1, "test_loss": 1, "test_acc": "high", "wall": 1}\n',
        "field 'test_acc' of a 'eval' record is 'high'; expected a number",
    ),
}


@pytest.mark.job
@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_on_a_bad_metrics_file_is_one_message(tmp_path, case):
    data, text = REPORT_CASES[case]
    run = tmp_path / "run-s1"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(data)
    r = _report(str(run), "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("hpc-dualbatch: error") == 1 and text in r.stderr and "metrics.jsonl" in r.stderr


@pytest.mark.job
def test_report_out_that_is_a_file_is_one_message(tmp_path):
    from tests.test_report import fake_run

    run = fake_run(tmp_path / "run-s1", [0.5, 0.6], 10.0)
    (tmp_path / "rep").write_text("a file")
    r = _report(run, "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--out " + str(tmp_path / "rep") + " is a file" in r.stderr


# --- under MPI: start-up agreement and faults ----------------------------------------------------

BAD_STARTS = {
    "no-arguments": (lambda tmp, data: None, ["train needs --config"]),
    "unknown-arch": (lambda tmp, data: {"model__arch": "resnet_nonexistent"}, ["'model.arch'", "valid"]),
    "raft_small": (
        lambda tmp, data: {"model__arch": "raft_small"},
        ["'raft_small'", "not an image classifier"],
    ),
    "no-test-samples": (
        lambda tmp, data: {"data__path": edited(tmp, data, _empty_test_split)},
        ["edited.h5", "0 test samples"],
    ),
    "one-class": (
        lambda tmp, data: {"data__path": edited(tmp, data, _one_class)},
        ["edited.h5", "at least 2"],
    ),
    "out-is-a-file": (lambda tmp, data: {"out": "config.yaml"}, ["which is a file"]),
    "poll-too-long": (
        lambda tmp, data: {"server__poll_min_s": 100.0, "server__poll_max_s": 100.0},
        ["up to 1.0 s"],
    ),
}


@pytest.mark.job
@mpi
@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_start_ends_every_rank_with_one_message(tmp_path, synthetic_h5, case):
    over, needles = BAD_STARTS[case]
    over = over(tmp_path, synthetic_h5)
    args = []
    if over is not None:
        out = tmp_path / over.pop("out", "run")  # out-is-a-file: the config file itself
        args = ["--config", write_config(tmp_path / "config.yaml", tiny_config(synthetic_h5, out, **over))]
    if case == "out-is-a-file":  # fails on rank 0 alone (the run folder): a real job shows all end
        r, seconds = timed(3, "train", *args)
        one_clean_error(r, seconds, *needles)
    else:  # the same checks in-process
        err = start_up_error(args)
        assert all(n in err for n in needles), (needles, err)


@pytest.mark.job
@mpi
def test_crash_before_the_first_checkpoint_then_the_same_command_and_resume_work(tmp_path, synthetic_h5):
    """SIGKILL of a worker before any checkpoint; the fresh command (and --resume) start over.
    8 epochs (16 tasks), so that the run is still going when the first commit has been seen (at 3
    a run once ended in that window, its worker gone before the kill)."""
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            synthetic_h5,
            tmp_path / "run",
            schedule__epochs=8,
            schedule__milestones=[6],
            checkpoint__every_epochs=0,
        ),
    )
    out = tmp_path / "run"
    job = start(3, "train", "--config", cfg)
    try:
        ranks = rank_pids(job, 3)
        metrics = out / "metrics.jsonl"
        wait_for(
            lambda: (metrics.exists() and b"commit" in metrics.read_bytes()) or job.poll() is not None,
            JOB_S,
            "a commit",
        )
        assert job.poll() is None, "the run ended before the fault"
        os.kill(ranks[2], signal.SIGKILL)
        job.communicate(timeout=QUICK_S)
    finally:
        if job.poll() is None:
            kill_job(job)
    assert C.latest(str(out)) is None and metrics.exists()
    r = hdb(3, "train", "--config", cfg, timeout=JOB_S)  # the same command, as a Slurm resubmission runs it
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting it from commit 0" in r.stdout
    assert status(out)["state"] == "done"
    commits = [x["commit"] for x in read_metrics(str(metrics)) if x["type"] == "commit"]
    assert commits == list(range(1, 17))
    assert (out / "metrics-stopped-1.jsonl").exists()


def _finished_run_rolled_back(out: Path, data: str) -> tuple[Path, int]:
    """Train a 3-epoch run, then delete its last checkpoint, as if it had stopped mid-run.
    Returns the run folder and the commit its newest remaining checkpoint holds."""
    cfg = write_config(
        out.parent / f"{out.name}.yaml",
        tiny_config(data, out, schedule__epochs=3, schedule__milestones=[2]),
    )
    r = hdb(3, "train", "--config", cfg, timeout=JOB_S)
    assert r.returncode == 0, r.stdout + r.stderr
    sorted((out / "checkpoints").glob("ckpt-*.npz"))[-1].unlink()
    return out, C.load(C.latest(str(out))).commits


@pytest.mark.job
@mpi
def test_resume_on_another_node_after_the_metrics_lost_their_tail_records_a_gap(tmp_path, synthetic_h5):
    """A requeued job on another node (the data copied elsewhere, other threads and prefetch)
    whose metrics lost their tail: the checkpoint is fsynced, the metrics are not. The resume
    continues from the checkpoint and reports the gap."""
    out, resumed_at = _finished_run_rolled_back(tmp_path / "run-s1", synthetic_h5)
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:150])  # lost: most of what that checkpoint accounts for
    moved = tmp_path / "node-local" / "copy.h5"
    moved.parent.mkdir()
    shutil.copy(synthetic_h5, moved)
    sets = ["--set", f"data.path={moved}", "--set", "threads=2", "--set", "data.prefetch=1"]
    r = hdb(3, "train", "--resume", str(out), *sets, timeout=JOB_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "metrics file shorter than the checkpoint" in r.stdout
    st = status(out)
    assert st["state"] == "done" and st["metrics_gaps"] == 1
    recs = read_metrics(str(metrics))
    gap = [x for x in recs if x["type"] == "gap"]
    assert len(gap) == 1 and gap[0]["up_to_commit"] == resumed_at and gap[0]["after_commit"] == 0
    assert 0 < resumed_at < 6
    assert [x["commit"] for x in recs if x["type"] == "commit"] == list(range(resumed_at + 1, 7))
    rep = _report(str(out), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0 and "gap record" in rep.stdout, rep.stderr


@pytest.mark.job
@mpi
def test_staged_file_truncated_under_a_running_job_stops_it(tmp_path, synthetic_h5):
    data = tmp_path / "staged.h5"
    shutil.copy(synthetic_h5, data)
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            str(data), tmp_path / "run", schedule__epochs=8, schedule__milestones=[7], data__in_memory="never"
        ),
    )
    out = tmp_path / "run"
    job = start(3, "train", "--config", cfg)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(
            lambda: (metrics.exists() and b"commit" in metrics.read_bytes()) or job.poll() is not None,
            JOB_S,
            "a commit",
        )
        assert job.poll() is None, "the run ended before the fault"
        os.truncate(data, os.path.getsize(data) // 2)
        t0 = time.time()
        log, _ = job.communicate(timeout=QUICK_S)
        assert time.time() - t0 < QUICK_S
    finally:
        if job.poll() is None:
            kill_job(job)
    assert job.returncode != 0, log
    assert "hpc-dualbatch: error" in log and "staged.h5'" in log and "Traceback" not in log
    assert not (out / "status.json").exists()  # no "done" on wrong data


def test_config_file_that_is_not_text_is_a_message(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match=r"binary.yaml' is not (UTF-8 text|valid YAML)"):
        load_config(str(path))


@pytest.mark.job
@mpi
@pytest.mark.parametrize("mode", ["ps", "ps-shards", "sync"])
def test_a_diverging_run_stops_with_a_message_and_says_so_in_its_status(tmp_path, synthetic_h5, mode):
    """A learning rate that drives the loss to NaN ends every rank with one message naming the
    learning rate and momentum, exit code 3 and status.json "diverged" (it used to end "done" at
    chance accuracy with NaN in its status); with two server shards too (shard 0 checks the
    leader's norm of the whole push before any shard folds its slice)."""
    mu = {"momentum": 0.99, "ps_momentum": 0.99}
    over = {"schedule__lr": [100.0, 10.0], "optim": mu}  # (the largest rate allowed)
    if mode == "sync":
        over.update(mode="sync", workers__groups=[2], workers__small=0, plan__k=1.0)
    if mode == "ps-shards":
        over.update(server__shards=2)
    cfg = write_config(tmp_path / "run.yaml", tiny_config(synthetic_h5, tmp_path / "run", **over))
    r, seconds = timed({"ps": 3, "ps-shards": 4, "sync": 2}[mode], "train", "--config", cfg)
    key = "optim.momentum" if mode == "sync" else "optim.ps_momentum"  # the key that mode trains with
    one_clean_error(r, seconds, "training diverged", f"{key} 0.99", f"Lower schedule.lr or {key}")
    assert r.returncode == 3
    assert status(tmp_path / "run")["state"] == "diverged"


def test_run_folder_files_are_never_written_through_a_link_or_into_a_fifo(tmp_path, synthetic_h5):
    """A link at .lock, metrics.jsonl or command.txt (another user's file, in a shared run folder)
    is refused by name and its target left as it was; a FIFO at .lock is refused, not waited on;
    an atomic write replaces a link at its name instead of writing through it."""
    from hpc_dualbatch.atomic import open_regular, write_json

    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's data\n")
    for name in (".lock", "metrics.jsonl", "command.txt"):
        link = tmp_path / name
        link.symlink_to(victim)
        with pytest.raises(OutputError, match=rf"'{link}' is a symbolic link"):
            open_regular(str(link))
        link.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.time()
    with pytest.raises(OutputError, match=r"is a FIFO, not a regular file"):
        open_regular(str(fifo))
    assert time.time() - t0 < 5
    with pytest.raises(OutputError, match="is a directory"):
        open_regular(str(tmp_path))
    with open_regular(str(tmp_path / "new.log")) as f:  # a regular file: created, appended to
        f.write(b"a\n")
    with open_regular(str(tmp_path / "new.log")) as f:
        f.write(b"b\n")
    assert (tmp_path / "new.log").read_text() == "a\nb\n"
    # the run folder's own checks: a linked lock and a linked metrics file
    out, cfg = run_folder(tmp_path, synthetic_h5)
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        F.prepare_out(cfg, False)
    (out / ".lock").unlink()
    os.mkfifo(out / ".lock")
    with pytest.raises(OutputError, match="FIFO"):
        F.prepare_out(cfg, False)
    (out / ".lock").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        MetricsLog(str(out / "metrics.jsonl"))
    link = tmp_path / "status.json"
    link.symlink_to(victim)
    write_json(str(link), {"state": "done"})
    assert not link.is_symlink() and json.loads(link.read_text()) == {"state": "done"}
    assert victim.read_text() == "someone else's data\n"


def _odd(tmp: Path, kind: str) -> str:
    """A path that is `kind`: a FIFO, a directory or a symbolic link loop."""
    path = tmp / f"odd-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        os.symlink(path, path)  # a link to itself: resolving it loops
    return str(path)


ODD = {"fifo": "is a FIFO", "dir": "is a directory", "loop": "is a symbolic link loop"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(ODD))
def test_every_file_read_is_checked_for_what_it_is_before_it_is_opened(tmp_path, synthetic_h5, kind):
    """Config, staged data, timing, plan, checkpoint, metrics and source files, and prepare's
    --out: a FIFO (opening it waits for a writer: a hang), a directory or a link loop is named
    for what it is, at once (was: a hang, or "does not exist")."""
    from hpc_dualbatch.data.cifar import read_cifar
    from hpc_dualbatch.method.plan import samples_per_epoch
    from hpc_dualbatch.method.plan_record import load_plan
    from hpc_dualbatch.method.timing import load_timing

    want = ODD[kind]
    readers = {
        "config file": load_config,
        "staged data file": open_staged,
        "timing file": lambda p: load_timing(p, [12]),
        "plan file": load_plan,
        "checkpoint": C.load,
        "metrics file": read_metrics,
        "CIFAR archive": lambda p: read_cifar(p, "cifar10"),
    }
    odd = _odd(tmp_path, kind)
    for what, read in readers.items():
        t0 = time.time()
        with pytest.raises(HDBError, match=rf"{what} '{re.escape(odd)}' {want}, not a regular file"):
            read(odd)
        assert time.time() - t0 < 5, what
    # data.path of a config: the planner opens the staged file and says what it is
    cfg = config_from_dict(tiny_config(odd, tmp_path / "run"))
    with pytest.raises(DataError, match=rf"staged data file '{re.escape(odd)}' {want}"):
        samples_per_epoch(cfg)
    # the metrics of a run folder being resumed (read before they are cut back)
    with pytest.raises(OutputError, match=rf"metrics file '{re.escape(odd)}' {want}"):
        repair(odd, 10, 1)
    # prepare --out: refused before anything is read or staged
    with pytest.raises(DataError, match=rf"prepare --out '{re.escape(odd)}' {want}"):
        prepare("synthetic", None, [12], odd, synthetic=SyntheticSpec(samples=20, test_samples=10))


def test_deeply_nested_or_huge_json_is_one_message(tmp_path):
    """A timing file, plan file or checkpoint meta nested 100,000 deep (was: RecursionError in
    plan and train --resume), or a 5 MB timing file (was: 15 s and 2 GB on every rank)."""
    from hpc_dualbatch.method.plan_record import load_plan
    from hpc_dualbatch.method.timing import load_timing

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "timing.json"
    path.write_text(deep)
    with pytest.raises(PlanError, match="timing file '.*' nests too deeply"):
        load_timing(str(path), [12])
    with pytest.raises(PlanError, match="plan file '.*' nests too deeply"):
        load_plan(str(path))
    path.write_text('{"format": "' + "x" * (5 << 20) + '"}')
    t0 = time.time()
    with pytest.raises(PlanError, match=r"timing file '.*' is 5\.2 MB, more than any such file holds"):
        load_timing(str(path), [12])
    assert time.time() - t0 < 1
    ck = tmp_path / "ckpt-000000001.npz"
    np.savez(ck, weights=np.zeros(4, np.float32), momentum=np.zeros((1, 4), np.float32), meta=np.array(deep))
    with pytest.raises(CheckpointError, match="is corrupt or partially written \\(RecursionError"):
        C.load(str(ck))
