"""`hpc-dualbatch report RUN_DIRS... --out DIR`: tables and plots from run folders.

Runs are grouped into configurations by folder name without its seed suffix
(`hybrid-ns2-s1` and `hybrid-ns2-s2` are two seeds of `hybrid-ns2`); runs of one
configuration must share their config.yaml apart from the seed and the operational keys,
and differ in seed (the config's `seed`), else the report names the two folders and stops.
The same folder given twice counts once. For each
configuration: mean and spread (sample standard deviation, and min..max) over
seeds of the final test accuracy, the best test accuracy and the wall time,
each against the baseline configuration as a difference and a ratio, and the
largest fall of test accuracy from one evaluation to the next after epoch 1
(a global model that collapses mid-run shows here). Every
number comes from the runs' metrics.jsonl; nothing is typed in.

Writes `<out>/report.md`, `<out>/summary.json` (`targets.json` with --targets) and PNG plots
(matplotlib): test accuracy vs wall time and vs epoch, one line per configuration (the mean over
seeds at each evaluation, a band from the lowest to the highest seed, the baseline dashed black;
more than six configurations are split into one panel per family, each with the baseline),
images/s per group, and final accuracy vs wall seconds with one line per configuration through
its epoch budgets (`frontier.py`; `--targets FILE` adds a table of targets met or not).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
from dataclasses import dataclass
from typing import Any

import yaml

from hpc_dualbatch.atomic import check_regular, file_kind, write_json, write_text
from hpc_dualbatch.commands import frontier
from hpc_dualbatch.errors import DataError, OutputError
from hpc_dualbatch.runtime.metrics import evaluations, read_metrics
from hpc_dualbatch.runtime.resume import OPERATIONAL, config_differences
from hpc_dualbatch.yaml_safe import load as load_yaml

SEED_SUFFIX = re.compile(r"-s(\d+)$")


@dataclass
class Run:
    path: str
    config: str  # configuration label
    seed: int  # the config's seed (else the folder's -s<seed> suffix)
    final_acc: float
    best_acc: float
    final_loss: float
    wall: float  # seconds of training (metrics end record)
    evals: list[dict[str, Any]]
    commits: list[dict[str, Any]]
    command: str
    settings: dict[str, Any] | None  # the run's config.yaml, where it has one

    @property
    def max_drop(self) -> float:
        """Largest fall of test accuracy between consecutive evaluations after epoch 1 (>= 0)."""
        accs = [e["test_acc"] for e in self.evals if e["epoch"] >= 1]
        return max([0.0] + [a - b for a, b in zip(accs, accs[1:])])


def load_run(path: str) -> Run:
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise DataError(f"{path} is not a run folder (no metrics.jsonl)")
    recs = read_metrics(metrics)
    gaps = [r for r in recs if r["type"] == "gap"]
    if gaps:
        print(
            f"warning: run {path} lost records ({len(gaps)} gap record(s) in {metrics}: "
            f"{'; '.join(sorted({str(g.get('reason')) for g in gaps}))}); its accuracies come from "
            "the evaluations that remain"
        )
    evals = evaluations(recs)
    ends = [r for r in recs if r["type"] == "end"]
    if not evals or not ends or ends[-1]["state"] != "done":
        raise DataError(f"run {path} has not finished (no final evaluation / end record with state done)")
    name = os.path.basename(os.path.normpath(path))
    m = SEED_SUFFIX.search(name)
    settings = _read_config(os.path.join(path, "config.yaml"))
    seed = (settings or {}).get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):  # no config.yaml: the folder's suffix
        seed = int(m.group(1)) if m else 0
    return Run(
        path,
        name[: m.start()] if m else name,
        seed,
        evals[-1]["test_acc"],
        max(e["test_acc"] for e in evals),
        evals[-1]["test_loss"],
        ends[-1]["wall"],
        evals,
        [r for r in recs if r["type"] == "commit"],
        (_read_text(os.path.join(path, "command.txt"), "command file") or "").strip(),
        settings,
    )


def _read_text(path: str, what: str) -> str | None:
    """A run folder's text file (None where there is none); bytes that are not UTF-8 are replaced."""
    if file_kind(path) == "missing":
        return None
    check_regular(path, what, DataError, "remove it, or give the run folder train wrote")
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _read_config(path: str) -> dict[str, Any] | None:
    text = _read_text(path, "run config")
    if text is None:
        return None
    try:
        raw = load_yaml(text, f"run config '{path}'")
    except yaml.YAMLError as e:
        raise DataError(
            f"run config '{path}' is not valid YAML ({e}); give the run folder train wrote"
        ) from None
    return raw if isinstance(raw, dict) else None


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Configuration label -> its runs (one per seed), in the order given. Refuses two runs of one
    label whose configs differ (beyond seed and operational keys) or that share a seed."""
    configs: dict[str, list[Run]] = {}
    for r in runs:
        for other in configs.setdefault(r.config, []):
            where = f"runs '{other.path}' and '{r.path}' are both configuration '{r.config}'"
            if other.settings is not None and r.settings is not None:
                diffs = config_differences(
                    other.settings, r.settings, ("first", "second"), OPERATIONAL | {"seed"}
                )
                if diffs:
                    raise DataError(
                        f"{where} (folder name without -s<seed>) but their configs differ ("
                        f"{'; '.join(diffs[:3])}); give them different folder names"
                    )
            if other.seed == r.seed:
                raise DataError(
                    f"{where} with seed {r.seed}: one configuration needs one run per seed (name "
                    "seeds as a -s<seed> suffix, or give each configuration its own folder name)"
                )
        configs[r.config].append(r)
    return configs


def _finite(x: Any) -> Any:
    """`x` with every non-finite float as None (null): summary.json stays strict JSON (a run whose
    test loss was NaN would otherwise write the token NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def summarize(runs: list[Run], baseline: str | None) -> dict[str, Any]:
    configs = group_runs(runs)
    out: dict[str, Any] = {}
    for name, rs in configs.items():
        out[name] = {
            "seeds": sorted(r.seed for r in rs),
            "final_acc": _stats([r.final_acc for r in rs]),
            "best_acc": _stats([r.best_acc for r in rs]),
            "final_loss": _stats([r.final_loss for r in rs]),
            "wall": _stats([r.wall for r in rs]),
            "max_drop": _stats([r.max_drop for r in rs]),
        }
    if baseline:
        if baseline not in out:
            raise DataError(
                f"baseline '{baseline}' is not among the configurations: {', '.join(sorted(out))}"
            )
        base = out[baseline]
        for s in out.values():
            s["vs_baseline"] = {
                "final_acc_diff": s["final_acc"]["mean"] - base["final_acc"]["mean"],
                "best_acc_diff": s["best_acc"]["mean"] - base["best_acc"]["mean"],
                "wall_ratio": s["wall"]["mean"] / base["wall"]["mean"],
            }
    return out


def markdown(summary: dict[str, Any], baseline: str | None, order: list[str]) -> str:
    def pct(s: dict[str, float]) -> str:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} ({100 * s['min']:.2f}..{100 * s['max']:.2f})"

    head = (
        "| configuration | seeds | final test acc % (mean ± sd, min..max) | best test acc % "
        "| wall s (mean ± sd) | largest fall after epoch 1 (points, worst seed) |"
    )
    sep = "|---|---|---|---|---|---|"
    if baseline:
        head += f" final acc vs {baseline} (points) | best acc vs {baseline} | wall time / {baseline} |"
        sep += "---|---|---|"
    lines = [head, sep]
    for name in order:
        s = summary[name]
        row = (
            f"| {name} | {len(s['seeds'])} | {pct(s['final_acc'])} | {pct(s['best_acc'])} | "
            f"{s['wall']['mean']:.1f} ± {s['wall']['std']:.1f} | {100 * s['max_drop']['max']:.2f} |"
        )
        if baseline:
            v = s["vs_baseline"]
            diffs = f" {100 * v['final_acc_diff']:+.2f} | {100 * v['best_acc_diff']:+.2f} |"
            row += f"{diffs} {v['wall_ratio']:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


PANEL_LINES = 6  # configurations per panel before families get panels of their own


def mean_curve(rs: list[Run], xkey: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """A configuration's curve over its seeds: at the k-th evaluation (k up to the shortest
    run), the mean of x (`xkey`: epoch or wall seconds) and of test accuracy, and the lowest and
    highest accuracy of any seed (the band)."""
    n = min(len(r.evals) for r in rs)
    at = [[r.evals[k] for r in rs] for k in range(n)]
    xs = [statistics.fmean(e[xkey] for e in evs) for evs in at]
    accs = [[100 * e["test_acc"] for e in evs] for evs in at]
    return xs, [statistics.fmean(a) for a in accs], [min(a) for a in accs], [max(a) for a in accs]


def panels(order: list[str], baseline: str | None) -> list[list[str]]:
    """Configurations per panel, each panel with the baseline: all in one up to PANEL_LINES,
    else families (the label up to its first '-': sync, ps, dual, hybrid, ...) packed in order
    into panels of up to PANEL_LINES; a larger family is split, its first configuration in each
    part."""
    rest = [c for c in order if c != baseline]
    families: dict[str, list[str]] = {}
    for c in rest:
        families.setdefault(c.split("-")[0], []).append(c)
    packed: list[list[str]] = []
    for fam in families.values():
        if packed and len(packed[-1]) + len(fam) <= PANEL_LINES:
            packed[-1] += fam
        elif len(fam) <= PANEL_LINES:
            packed.append(list(fam))
        else:  # a family too large for one panel: even parts, each led by the family's first
            head, tail = fam[0], fam[1:]
            k = math.ceil(len(tail) / (PANEL_LINES - 1))
            packed += [[head, *tail[i::k]] for i in range(k)]
    return [([baseline] if baseline else []) + p for p in packed] or [order]


def plots(runs: list[Run], order: list[str], out: str, baseline: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(order, baseline)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(c for c in order if c != baseline)}
    written = []
    for xkey, fname, xlabel in (
        ("wall", "acc_vs_time.png", "wall time (s), mean over seeds"),
        ("epoch", "acc_vs_epoch.png", "epoch"),
    ):
        fig, axes = plt.subplots(
            len(groups), 1, figsize=(8, 3.6 * len(groups)), squeeze=False, sharex=True, sharey=True
        )
        for ax, names in zip(axes[:, 0], groups):
            for name in names:
                rs = [x for x in runs if x.config == name]
                xs, mean, low, high = mean_curve(rs, xkey)
                base = name == baseline
                color = "black" if base else colors[name]
                label = f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''}){' baseline' if base else ''}"
                ax.plot(xs, mean, color=color, lw=2.6 if base else 1.6, ls="--" if base else "-", label=label)
                if len(rs) > 1:
                    ax.fill_between(xs, low, high, color=color, alpha=0.12 if base else 0.18, lw=0)
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        axes[-1, 0].set_xlabel(xlabel)
        axes[0, 0].set_title("mean test accuracy over seeds; band: lowest to highest seed", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        written.append(fname)
    fig, ax = plt.subplots(figsize=(9, 5))
    labels, values = [], []
    for name in order:
        rs = [x for x in runs if x.config == name]
        for g in sorted({c["group"] for r in rs for c in r.commits}):
            rates = [
                c["samples"] / c["seconds"]
                for r in rs
                for c in r.commits
                if c["group"] == g and c["seconds"] > 0
            ]
            small = any(c["small"] for r in rs for c in r.commits if c["group"] == g)
            labels.append(f"{name} g{g}{' (small)' if small else ''}")
            values.append(statistics.fmean(rates) if rates else 0.0)
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("training images/s per group (mean over mini-epochs and seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "group_throughput.png"), dpi=110)
    plt.close(fig)
    written.append("group_throughput.png")
    return written


def run(args: argparse.Namespace) -> int:
    paths = list(dict.fromkeys(os.path.realpath(p) for p in args.runs))  # a folder given twice: once
    if len(paths) < len(args.runs):
        print(f"report: {len(args.runs) - len(paths)} run folder(s) given more than once; each counted once")
    runs = [load_run(p) for p in paths]
    order = list(dict.fromkeys(r.config for r in runs))
    summary = summarize(runs, args.baseline)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise OutputError(f"--out {args.out} is a file; report needs a folder for report.md and plots")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    md = markdown(summary, args.baseline, order)
    judged = frontier.judge(frontier.load_targets(args.targets), summary) if args.targets else None
    if judged is not None:
        md += "\n" + frontier.targets_markdown(judged)
    try:
        figs = plots(runs, order, args.out, args.baseline)
        frontier.plot(summary, os.path.join(args.out, "frontier.png"), args.baseline)
        figs.append("frontier.png")
        text = f"# Results\n\n{md}\n" + "".join(f"![{f}]({f})\n" for f in figs)
        write_text(os.path.join(args.out, "report.md"), text)
        write_json(os.path.join(args.out, "summary.json"), _finite(summary), allow_nan=False)
        if judged is not None:
            write_json(os.path.join(args.out, "targets.json"), _finite(judged), allow_nan=False)
    except OSError as e:
        raise OutputError(f"--out {args.out}: cannot write the report ({e.strerror or e})") from None
    print(md)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="Markdown table + PNG plots from run folders (mean and spread over seeds)"
    )
    p.add_argument("runs", nargs="+", help="run folders (seeds as a -s<seed> suffix of the folder name)")
    p.add_argument("--baseline", help="configuration to compare against (difference and ratio)")
    p.add_argument("--out", required=True, help="folder for report.md, summary.json and plots")
    p.add_argument(
        "--targets",
        help="JSON list of targets to judge: kinds above, frontier, no_fall (commands/frontier.py)",
    )
    p.set_defaults(func=run)
