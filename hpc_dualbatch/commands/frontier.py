"""The report's accuracy-vs-wall-time frontier and its targets (`hpc-dualbatch report --targets`).

A configuration run at other epoch budgets is named `<name>-e<epochs>` (`sync-e12` is `sync` at
12 epochs); `<name>` and its budgets form one family. The frontier of a family is one point per
budget: the mean wall seconds and mean final test accuracy over seeds, with their spread, joined
in order of wall time. Pure functions of the report's summary (`report.summarize`); the plot
needs matplotlib.

A targets file is a JSON list; each target one of:

    {"kind": "above", "config": A, "reference": B, "margin": 0.5, "max_wall_ratio": 1.0}
        mean final accuracy of A >= that of B + margin points (and, if given, mean wall of A
        <= max_wall_ratio x that of B); "wall": false where A and B ran in different sittings,
        whose wall times do not compare: no ratio shown, no max_wall_ratio allowed
    {"kind": "frontier", "family": A, "reference": B, "margin": 0.5, "wall_of": C}
        A's frontier, interpolated linearly at B's mean wall seconds, >= B + margin points (past
        A's longest budget: A's best budget, which has ended by then; not met where B's wall
        time lies before A's shortest budget: said so). With "wall_of", at C's mean wall
        seconds instead: B's accuracy, the wall time of a C that ran beside A (wall times
        compare only within one sitting)
    {"kind": "no_fall", "configs": [A, ...], "points": 5}
        no evaluation after epoch 1 more than `points` below the one before, in any seed

each with an optional "label". Every value is computed from the runs; a target is met or not,
with by how much.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hpc_dualbatch.atomic import read_json
from hpc_dualbatch.errors import DataError

BUDGET = re.compile(r"-e(\d+)$")


def family(name: str) -> str:
    return BUDGET.sub("", name)


def frontiers(summary: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """family -> its points (wall mean/sd, final accuracy mean/sd in %, config), by wall time."""
    out: dict[str, list[dict[str, float]]] = {}
    for name, s in summary.items():
        point = {
            "config": name, "wall": s["wall"]["mean"], "wall_sd": s["wall"]["std"],
            "acc": 100 * s["final_acc"]["mean"], "acc_sd": 100 * s["final_acc"]["std"],
        }  # fmt: skip
        out.setdefault(family(name), []).append(point)
    return {f: sorted(ps, key=lambda p: p["wall"]) for f, ps in out.items()}


def at_wall(points: list[dict[str, Any]], wall: float) -> float | None:
    """Mean final accuracy (%) of a frontier, linear in wall seconds between its budgets; past
    its longest budget, the best of its budgets (each has ended by then); None before its
    shortest (nothing has ended)."""
    for a, b in zip(points, points[1:]):
        if a["wall"] <= wall <= b["wall"]:
            t = (wall - a["wall"]) / (b["wall"] - a["wall"]) if b["wall"] > a["wall"] else 0.0
            return a["acc"] + t * (b["acc"] - a["acc"])
    if points and wall >= points[-1]["wall"] - 1e-9 * max(1.0, wall):
        return max(p["acc"] for p in points)
    return None


def load_targets(path: str) -> list[dict[str, Any]]:
    raw = read_json(path, "targets file", DataError, "give a JSON list of targets (see `report --help`)")
    kinds = {"above": ("config", "reference"), "frontier": ("family", "reference"), "no_fall": ("configs",)}
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise DataError(f"targets file {path} must hold a JSON list of objects (see `report --help`)")
    for i, t in enumerate(raw):
        need = kinds.get(t.get("kind"))
        if need is None or any(k not in t for k in need):
            raise DataError(
                f"targets file {path}, entry {i}: {json.dumps(t)[:200]}; valid: kind one of "
                f"{', '.join(kinds)} with the keys {json.dumps(kinds)}"
            )
        if t.get("wall") is False and "max_wall_ratio" in t:
            raise DataError(
                f'targets file {path}, entry {i}: {json.dumps(t)[:200]}; "wall": false (wall times '
                "that do not compare) with a max_wall_ratio: drop one of them"
            )
    return raw


def judge(targets: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with `value`, `needed` (points or ratio), `met` and a `note`."""
    fronts, out = frontiers(summary), []

    def of(name: str) -> dict[str, Any]:
        if name not in summary:
            raise DataError(f"target names configuration '{name}', not among {', '.join(sorted(summary))}")
        return summary[name]

    def acc(name: str) -> float:
        return 100 * of(name)["final_acc"]["mean"]

    def wall(name: str) -> float:
        return of(name)["wall"]["mean"]

    for t in targets:
        kind, label = t["kind"], t.get("label", "")
        if kind == "above":
            a, b = acc(t["config"]), acc(t["reference"])
            ratio = wall(t["config"]) / wall(t["reference"])
            need = b + t.get("margin", 0.0)
            cap = t.get("max_wall_ratio")
            met = a >= need and (cap is None or ratio <= cap)
            note = f"{t['config']} {a:.2f} % vs {t['reference']} {b:.2f} % ({a - b:+.2f})"
            note += f"; wall {ratio:.3f}x" if t.get("wall", True) else "; walls of other sittings"
            out.append({**t, "label": label, "value": a, "needed": need, "met": met, "note": note})
        elif kind == "frontier":
            b, at = acc(t["reference"]), wall(t.get("wall_of", t["reference"]))
            if t["family"] not in fronts:
                raise DataError(f"target names family '{t['family']}', not among {', '.join(sorted(fronts))}")
            v = at_wall(fronts[t["family"]], at)
            need = b + t.get("margin", 0.0)
            past = fronts[t["family"]][-1]["wall"]
            note = (
                f"{t['family']} at {at:.0f} s"
                + (f" ({t['wall_of']}'s)" if "wall_of" in t else "")
                + ": "
                + (
                    "before its shortest budget ended"
                    if v is None
                    else f"{v:.2f} % ({v - b:+.2f} vs {b:.2f})"
                )
                + (f", its budgets all ended by {past:.0f} s" if v is not None and at > past else "")
            )
            out.append({**t, "label": label, "value": v, "needed": need, "met": v is not None and v >= need,
                        "note": note})  # fmt: skip
        else:
            falls = {c: 100 * summary[c]["max_drop"]["max"] for c in t["configs"] if c in summary}
            worst = max(falls, key=lambda c: falls[c]) if falls else None
            v = falls[worst] if worst else 0.0
            note = f"largest fall {v:.2f} points ({worst})" if worst else "no such configuration ran"
            out.append({**t, "label": label, "value": v, "needed": t.get("points", 5.0),
                        "met": bool(falls) and v <= t.get("points", 5.0), "note": note})  # fmt: skip
    return out


def targets_markdown(judged: list[dict[str, Any]]) -> str:
    lines = ["| target | kind | needed | result | met |", "|---|---|---|---|---|"]
    for t in judged:
        need = f"{t['needed']:.2f}" + (" points fall at most" if t["kind"] == "no_fall" else " %")
        lines.append(
            f"| {t['label']} | {t['kind']} | {need} | {t['note']} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out_png: str, baseline: str | None) -> None:
    """Final test accuracy vs wall seconds: one line per family through its budgets, error bars
    of one sample sd over seeds in both; the baseline's family dashed black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    base = family(baseline) if baseline else None
    others = [f for f in frontiers(summary) if f != base]
    for fam, pts in frontiers(summary).items():
        color, label = (
            ("black", fam + " (baseline)") if fam == base else (plt.cm.tab10(others.index(fam) % 10), fam)
        )
        ax.errorbar(
            [p["wall"] for p in pts], [p["acc"] for p in pts], xerr=[p["wall_sd"] for p in pts],
            yerr=[p["acc_sd"] for p in pts], color=color, ls="--" if fam == base else "-", marker="o",
            ms=4, lw=2.4 if fam == base else 1.4, capsize=2, label=label,
        )  # fmt: skip
    ax.set_xlabel("wall seconds of training (mean over seeds)")
    ax.set_ylabel("final test accuracy (%), mean over seeds")
    ax.set_title("accuracy vs wall time: one point per epoch budget, bars one sd", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
