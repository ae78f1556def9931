"""Print a part's results table for results/README.md from its summary.json and runs.

    python results/fashion-mnist/table.py dualbatch     # or: server

Columns: final and best test accuracy (mean ± sample sd over seeds), wall seconds, mean wall /
mean sync wall, the same ratio per seed (each run against sync's run of the same seed, made in
the same sitting), the change of test accuracy from epoch 1 to epoch 2 per seed (where the
hybrid runs fell), and the largest fall between evaluations after epoch 1 (worst seed), in points.
"""

import json
import os
import sys

from hpc_dualbatch.runtime.metrics import evaluations, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def evals(path: str) -> list[float]:
    return [r["test_acc"] for r in evaluations(read_metrics(path))]  # (in epoch order)


def wall(part: str, name: str, seed: int) -> float:
    ends = [
        r
        for r in read_metrics(os.path.join(HERE, "runs", part, f"{name}-s{seed}", "metrics.jsonl"))
        if r["type"] == "end"
    ]
    return ends[-1]["wall"]


def main(part: str) -> None:
    with open(os.path.join(HERE, part, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    print(
        "| configuration | final test acc % (mean ± sd, min..max) | best test acc % (mean ± sd) "
        "| wall s (mean ± sd) | wall / sync | wall / sync per seed | change at epoch 2 (points, per seed) "
        "| largest fall after epoch 1 (points, worst seed) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, c in summary.items():
        f, b, w = c["final_acc"], c["best_acc"], c["wall"]
        change, ratios = [], []
        for seed in c["seeds"]:
            if seed in summary["sync"]["seeds"]:
                ratios.append(f"{wall(part, name, seed) / wall(part, 'sync', seed):.2f}")
            acc = evals(os.path.join(HERE, "runs", part, f"{name}-s{seed}", "metrics.jsonl"))
            change.append(f"{100 * (acc[1] - acc[0]):+.1f}" if len(acc) > 1 else "-")
        print(
            f"| {name} | {100 * f['mean']:.2f} ± {100 * f['std']:.2f} ({100 * f['min']:.2f}.."
            f"{100 * f['max']:.2f}) | {100 * b['mean']:.2f} ± {100 * b['std']:.2f} "
            f"| {w['mean']:.1f} ± {w['std']:.1f} | {c['vs_baseline']['wall_ratio']:.3f} "
            f"| {', '.join(ratios)} | {', '.join(change)} | {100 * c['max_drop']['max']:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dualbatch")
