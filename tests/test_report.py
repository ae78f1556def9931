from __future__ import annotations

import json

import pytest

from hpc_dualbatch.cli import main
from hpc_dualbatch.commands.report import group_runs, load_run
from hpc_dualbatch.errors import DataError


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


def test_record_builders_round_once_and_pass_the_reader(tmp_path):
    """The server and the sync loop build their records here; what they write, `report` reads."""
    from hpc_dualbatch.runtime.metrics import commit_record, eval_record, read_metrics

    c = commit_record(
        commit=3, epoch=0.75, group=2, round_idx=0, small=True, samples=7375, seconds=11.88891,
        train_loss=1.09, train_acc=0.58, lr=0.055, resolution=20, batch=115, wall=15.43449,
        wait=0.12345, predicted=7.05921, staleness=2,
    )  # fmt: skip
    assert (c["seconds"], c["wait"], c["predicted"], c["wall"]) == (11.8889, 0.1235, 7.0592, 15.434)
    assert list(c)[0] == "type" and list(c)[-1] == "wall" and c["staleness"] == 2 and c["round"] == 0
    sync = commit_record(
        commit=1, epoch=1, group=0, round_idx=0, small=False, samples=100, seconds=1.0,
        train_loss=1.0, train_acc=0.5, lr=0.1, resolution=28, batch=64, wall=2.0,
    )  # fmt: skip
    assert "wait" not in sync and "predicted" not in sync  # the server's own fields
    e = eval_record(
        epoch=1.0, group=2, test_loss=0.838, test_acc=0.6973, samples=10000, seconds=6.98684,
        resolution=20, wall=24.7474, bn="recalibrate", bn_seconds=2.30981,
    )  # fmt: skip
    assert (e["type"], e["seconds"], e["wall"], e["bn"], e["bn_seconds"]) == (
        "eval", 6.9868, 24.747, "recalibrate", 2.3098,
    )  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(c) + "\n" + json.dumps(e) + "\n")
    assert read_metrics(str(path)) == [c, e]


def _with_config(path: str, **keys) -> str:
    import yaml

    raw = {"seed": 0, "out": path, "optim": {"momentum": 0.9}, "server": {"merge": "delta"}, "threads": 1}
    for k, v in keys.items():
        section, _, leaf = k.partition("__")
        if leaf:
            raw[section][leaf] = v
        else:
            raw[section] = v
    with open(f"{path}/config.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    return path


def test_runs_grouped_by_name_must_share_their_config_and_differ_in_seed(tmp_path, capsys):
    """Two folders named alike are one configuration only if their configs agree (seed and
    operational keys aside); a seed twice, or a folder given twice, is not two seeds."""
    a = _with_config(fake_run(tmp_path / "x" / "hybrid", [0.5, 0.8], 100.0))
    b = _with_config(fake_run(tmp_path / "y" / "hybrid", [0.5, 0.7], 90.0), optim__momentum=0.5)
    with pytest.raises(
        DataError, match=r"both configuration 'hybrid'.*optim\.momentum: first 0\.9, second 0\.5"
    ):
        group_runs([load_run(a), load_run(b)])
    c = _with_config(fake_run(tmp_path / "z" / "hybrid", [0.5, 0.7], 90.0), threads=4)  # operational
    with pytest.raises(DataError, match=r"with seed 0: one configuration needs one run per seed"):
        group_runs([load_run(a), load_run(c)])
    d = _with_config(fake_run(tmp_path / "w" / "hybrid", [0.6, 0.9], 80.0), seed=3, threads=4)
    assert main(["report", a, d, a + "/", "--out", str(tmp_path / "rep")]) == 0
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["hybrid"]["seeds"] == [0, 3]  # the configs' seeds; `a` counted once
    assert "given more than once" in capsys.readouterr().out


def test_a_nan_test_loss_and_odd_command_file_still_report(tmp_path):
    path = tmp_path / "nan-s1"
    fake_run(path, [0.1], 10.0)
    text = (path / "metrics.jsonl").read_text().replace('"test_loss": 0.9', '"test_loss": NaN')
    (path / "metrics.jsonl").write_text(text)
    (path / "command.txt").write_bytes(b"hpc-dualbatch train \xff\xfe\n")  # not UTF-8
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())  # strict JSON: null, not NaN
    assert s["nan"]["final_loss"]["mean"] is None and s["nan"]["final_acc"]["mean"] == pytest.approx(0.1)
    assert "train \ufffd" in load_run(str(path)).command


def test_plots_draw_one_line_per_configuration_in_panels_of_at_most_six():
    from hpc_dualbatch.commands.report import Run, mean_curve, panels

    order = ["sync", "ps-base", "ps-paper", "ps-a", "ps-b", "ps-c", "ps-d", "ps-e", "dual-ns2"]
    got = panels(order, "sync")
    assert all(p[0] == "sync" and len(p) - 1 <= 6 for p in got)  # the baseline in every panel
    assert sorted({c for p in got for c in p}) == sorted(order)  # every configuration drawn
    assert all(
        p[1] == "ps-base" for p in got if "ps-paper" in p or "ps-e" in p
    )  # a split family keeps its lead
    assert panels(["a", "b"], None) == [["a", "b"]]

    def run(accs, walls):
        evals = [{"epoch": i + 1, "test_acc": a, "wall": w} for i, (a, w) in enumerate(zip(accs, walls))]
        return Run("p", "c", 0, accs[-1], max(accs), 0.0, walls[-1], evals, [], "", None)

    xs, mean, low, high = mean_curve([run([0.5, 0.7, 0.9], [10, 20, 30]), run([0.3, 0.9], [12, 22])], "wall")
    assert xs == [11, 21] and mean == pytest.approx([40, 80]) and low == [30, 70] and high == [50, 90]


def test_frontier_through_budgets_and_targets_judged_exactly(tmp_path):
    """`sync` at two budgets (sync, sync-e12) and `hyb` at two: the frontier interpolates `hyb`
    at sync's mean wall time; every target's value is computed from the runs."""
    runs = [
        fake_run(tmp_path / "sync-s1", [0.6, 0.80], 100.0),
        fake_run(tmp_path / "sync-s2", [0.6, 0.82], 100.0),
        fake_run(tmp_path / "sync-e12-s1", [0.7, 0.86], 150.0),
        fake_run(tmp_path / "hyb-s1", [0.7, 0.78], 60.0),
        fake_run(tmp_path / "hyb-e12-s1", [0.6, 0.90, 0.84], 140.0),  # falls 6 points after epoch 1
    ]
    targets = [
        {
            "kind": "above",
            "config": "hyb",
            "reference": "sync",
            "margin": 0.0,
            "max_wall_ratio": 1.0,
            "label": "t1",
        },
        {"kind": "above", "config": "hyb", "reference": "sync", "wall": False, "label": "t2"},
        {"kind": "frontier", "family": "hyb", "reference": "sync", "margin": 0.5, "label": "t3"},
        {"kind": "frontier", "family": "hyb", "reference": "sync-e12", "label": "past"},
        {"kind": "frontier", "family": "sync", "reference": "hyb", "label": "before"},
        # sync-e12's accuracy at sync's wall time: 81 % against 86
        {"kind": "frontier", "family": "hyb", "reference": "sync-e12", "wall_of": "sync", "label": "at"},
        {"kind": "no_fall", "configs": ["hyb", "hyb-e12"], "points": 5, "label": "t4"},
    ]
    (tmp_path / "t.json").write_text(json.dumps(targets))
    out = tmp_path / "rep"
    assert (
        main(
            ["report", *runs, "--baseline", "sync", "--out", str(out), "--targets", str(tmp_path / "t.json")]
        )
        == 0
    )
    got = {t["label"]: t for t in json.loads((out / "targets.json").read_text())}
    assert got["t1"]["value"] == pytest.approx(78.0) and got["t1"]["needed"] == pytest.approx(81.0)
    assert not got["t1"]["met"] and got["t1"]["note"] == "hyb 78.00 % vs sync 81.00 % (-3.00); wall 0.600x"
    assert got["t2"]["note"] == "hyb 78.00 % vs sync 81.00 % (-3.00); walls of other sittings"
    # hyb's frontier: (60 s, 78 %) -> (140 s, 84 %); at sync's 100 s: 81 %, needed 81 + 0.5
    assert got["t3"]["value"] == pytest.approx(81.0) and not got["t3"]["met"]
    # past hyb's longest budget (140 s) at sync-e12's 150 s: its best budget, 84 %, has ended
    assert got["past"]["value"] == pytest.approx(84.0) and not got["past"]["met"]
    assert got["at"]["value"] == pytest.approx(81.0) and got["at"]["needed"] == pytest.approx(86.0)
    assert got["at"]["note"] == "hyb at 100 s (sync's): 81.00 % (-5.00 vs 86.00)"
    assert got["before"]["value"] is None and not got["before"]["met"]  # 60 s: no sync budget ended
    assert got["t4"]["value"] == pytest.approx(6.0) and not got["t4"]["met"]
    md = (out / "report.md").read_text()
    assert "| t3 | frontier | 81.50 % | hyb at 100 s: 81.00 % (+0.00 vs 81.00) | **no** |" in md
    assert (out / "frontier.png").stat().st_size > 1000


def test_a_bad_targets_file_is_one_message(tmp_path):
    from hpc_dualbatch.commands import frontier
    from hpc_dualbatch.commands.report import summarize

    bad = tmp_path / "t.json"
    bad.write_text(json.dumps([{"kind": "above", "config": "a"}]))
    with pytest.raises(DataError, match="entry 0.*valid: kind one of above, frontier, no_fall"):
        frontier.load_targets(str(bad))
    bad.write_text(
        json.dumps([{"kind": "above", "config": "a", "reference": "b", "wall": False, "max_wall_ratio": 1}])
    )
    with pytest.raises(DataError, match='entry 0.*"wall": false .* with a max_wall_ratio: drop one'):
        frontier.load_targets(str(bad))
    summary = summarize([load_run(fake_run(tmp_path / "a-s1", [0.5], 10.0))], None)
    with pytest.raises(DataError, match="configuration 'nope', not among a"):
        frontier.judge([{"kind": "above", "config": "a", "reference": "nope"}], summary)


def test_a_run_is_read_in_epoch_order_though_its_evaluations_reached_the_log_out_of_order(tmp_path):
    path = fake_run(tmp_path / "a-s1", [0.5, 0.6, 0.7, 0.8], 10.0)  # epochs 1-4
    m = tmp_path / "a-s1" / "metrics.jsonl"
    recs = [json.loads(x) for x in m.read_text().splitlines()]
    recs[3], recs[4] = recs[4], recs[3]  # epoch 4's evaluation logged before epoch 3's
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = load_run(path)
    assert run.final_acc == 0.8 and [e["epoch"] for e in run.evals] == [1, 2, 3, 4]
    assert run.max_drop == 0.0  # (in log order: 0.8 -> 0.7, a fall of 0.1 that never happened)
