"""What each `make demo` run of a series gave (results/demo/run_demos.sh), and the demo's promise.

    python results/demo/summary.py OUT_DIR      # writes OUT_DIR/summary.md and prints it

Per run: the profile's fixed cost b with its 90 % interval per resolution, the plan's B_S and how
it was chosen, the small group's batches in the order it trained them, the test accuracy after
every epoch, and the promise: final >= 80 %, < 300 s of training, no evaluation after epoch 1 more
than 5 points below the one before.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from hpc_dualbatch.runtime.metrics import evaluations, read_metrics


def run_row(path: str) -> dict:
    def load(name: str):
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return json.load(f)

    timing, plan, status = load("timing.json"), load("plan.json"), load("status.json")
    recs = read_metrics(os.path.join(path, "metrics.jsonl"))
    evals = [100 * r["test_acc"] for r in evaluations(recs)]  # (in epoch order, not the log's)
    drops = [a - b for a, b in zip(evals, evals[1:])]  # from epoch 1 to 2 onwards
    trace = [f"{r['resolution']}:{r['batch']}" + ("" if r["samples"] == plan["d_S"] else f"({r['samples']})")
             for r in recs if r["type"] == "commit" and r["small"]]  # fmt: skip
    fits = timing["resolutions"]
    final = 100 * status["final_test_acc"]
    row = {
        "run": os.path.basename(path),
        "b": {r: (e["b"], e.get("b_ci")) for r, e in fits.items()},
        "B_S": {r: (rp["B_S"], rp["small_source"]) for r, rp in plan["resolutions"].items()},
        "trace": trace,
        "evals": evals,
        "final": final,
        "best": 100 * status["best_test_acc"],
        "seconds": status["wall_seconds"],
        "max_drop": max(drops) if drops else 0.0,
    }
    row["promise"] = final >= 80 and row["seconds"] < 300 and row["max_drop"] <= 5
    return row


def main(out: str) -> int:
    runs = sorted((d for d in os.listdir(out) if d.startswith("run-") and not d.endswith(".tmp")),
                  key=lambda d: int(d.split("-")[1]))  # fmt: skip
    rows = [run_row(os.path.join(out, d)) for d in runs]
    lines = ["| run | b s/step [90 % interval] per px | B_S per px (how) | small group's batches, px:B(samples if cut) "
             "| test acc % per epoch | final % | s training | worst drop after epoch 1 | promise |", "|" + "---|" * 9]  # fmt: skip
    for r in rows:
        b = "; ".join(f"{px}: {v:.2g} [{ci[0]:.1g}, {ci[1]:.1g}]" if ci else f"{px}: {v:.2g}" for px, (v, ci) in r["b"].items())
        bs = ", ".join(f"{px}: {v} ({how})" for px, (v, how) in r["B_S"].items())
        lines.append(f"| {r['run']} | {b} | {bs} | {' '.join(r['trace'])} | {' '.join(f'{e:.1f}' for e in r['evals'])} "
                     f"| {r['final']:.2f} | {r['seconds']:.0f} | {r['max_drop']:+.1f} | {'kept' if r['promise'] else 'BROKEN'} |")  # fmt: skip
    finals, secs = [r["final"] for r in rows], [r["seconds"] for r in rows]
    if rows:
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append("")
        lines.append(
            f"{len(rows)} runs: final {statistics.fmean(finals):.2f} +- {sd:.2f} % (min {min(finals):.2f}, "
            f"max {max(finals):.2f}); training {min(secs):.0f}-{max(secs):.0f} s; worst drop after epoch 1 "
            f"{max(r['max_drop'] for r in rows):+.1f} points; promise kept in "
            f"{sum(r['promise'] for r in rows)} of {len(rows)}"
        )
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(out, "summary.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "summary.md"))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
