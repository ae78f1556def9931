from __future__ import annotations

import json

import pytest

from hpc_dualbatch.cli import main
from hpc_dualbatch.errors import DataError
from hpc_dualbatch.report import load_run


def fake_run(path, accs, wall, state="done"):
    path.mkdir(parents=True)
    recs = [
        {
            "type": "commit",
            "commit": 1,
            "epoch": 1,
            "group": 0,
            "small": False,
            "samples": 100,
            "seconds": 2.0,
            "wall": 1.0,
        }
    ]
    recs += [
        {
            "type": "eval",
            "epoch": i + 1,
            "test_acc": a,
            "test_loss": 1 - a,
            "wall": wall * (i + 1) / len(accs),
        }
        for i, a in enumerate(accs)
    ]
    recs.append({"type": "end", "state": state, "commits": 1, "wall": wall})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_report_means_spreads_and_baseline_ratios(tmp_path):
    runs = [
        fake_run(tmp_path / "base-s1", [0.5, 0.8], 100.0),
        fake_run(tmp_path / "base-s2", [0.6, 0.7], 120.0),
        fake_run(tmp_path / "new-s1", [0.9, 0.85], 55.0),
        fake_run(tmp_path / "new-s2", [0.7, 0.75], 55.0),
    ]
    assert main(["report", *runs, "--baseline", "base", "--out", str(tmp_path / "rep")]) == 0
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["base"]["final_acc"]["mean"] == pytest.approx(0.75)
    assert s["base"]["final_acc"]["std"] == pytest.approx(0.0707106781)
    assert s["new"]["best_acc"]["mean"] == pytest.approx(0.825)  # best of each seed: 0.9 and 0.75
    assert s["new"]["vs_baseline"]["final_acc_diff"] == pytest.approx(0.05)
    assert s["new"]["vs_baseline"]["wall_ratio"] == pytest.approx(0.5)
    # largest fall after epoch 1: base none; new 0.05 (s1: 0.9 -> 0.85), s2 none
    assert s["base"]["max_drop"]["max"] == 0.0
    assert s["new"]["max_drop"]["max"] == pytest.approx(0.05)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| new | 2 | 80.00 ± 7.07 (75.00..85.00)" in md
    assert "| 5.00 |" in md
    for png in ("acc_vs_time.png", "acc_vs_epoch.png", "group_throughput.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def test_unfinished_or_missing_runs_are_refused(tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        load_run(str(tmp_path))
    with pytest.raises(DataError, match="has not finished"):
        load_run(fake_run(tmp_path / "x-s1", [0.5], 1.0, state="preempted"))
