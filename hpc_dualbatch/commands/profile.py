"""`hpc-dualbatch profile`: measure the time model of timing.py on this machine.

The command: its arguments, the timing JSON it writes and what that file means for the
config's plan (the fit with its intervals, the B_S it gives). The measuring is elsewhere: in
one process runtime/steptime.py (the configured model's step on this device; B_L from GPU
memory or plan.large_batch), under mpirun profile_run.py (the way `train` runs).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.timing import TimeFit, per_sample_table, save_timing
from hpc_dualbatch.runtime.steptime import default_batches, profile


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(vals)) < 2 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"need two or more distinct batch sizes >= 1, got {text!r}")
    return sorted(set(vals))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure step time vs batch size per resolution and fit the time model",
        description="Times forward+backward+SGD step of the configured model at several batch sizes "
        "per resolution in schedule.resolutions, fits t(x) = a*x + b and writes a timing JSON for "
        "`hpc-dualbatch plan`.",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument(
        "--batches",
        type=_int_list,
        default=None,
        help="batch sizes (default: 16, 24, 32, 48, ... from plan.min_small_batch up to B_L, and B_L)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per batch size, reduced by --stat, with a bootstrap interval (default 15; "
        "under mpirun: timed rounds of --steps steps, default 3)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing each batch size")
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic kept per batch size (min: for a node shared with other jobs)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of the (single-threaded) process, which time slices "
        "lost to other jobs on a shared node do not inflate",
    )
    p.add_argument(
        "--inputs",
        choices=("random", "staged"),
        default="random",
        help="random tensors, or the first training images of the staged file at data.path",
    )
    p.add_argument("--channels", type=int, default=1, help="input channels when data.path does not exist")
    p.add_argument("--classes", type=int, default=10, help="classes when data.path does not exist")
    p.add_argument(
        "--steps",
        type=int,
        default=8,
        help="under mpirun: training steps per timed measurement of each batch size (default 8)",
    )
    p.add_argument("--out", required=True, help="timing JSON to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpc_dualbatch.config import load_config

    cfg = load_config(args.config, args.set)
    if os.path.isdir(args.out):  # before measuring: the measurement would be lost at the end
        raise PlanError(
            f"--out '{args.out}' is a directory; give the timing file's path, e.g. "
            f"{os.path.join(args.out, 'timing.json')}"
        )
    from mpi4py import MPI

    job = MPI.COMM_WORLD.Get_size() > 1  # launched by mpirun: profile the way `train` runs
    if args.repeats is None:
        args.repeats = 3 if job else 15
    if args.repeats < 1 or args.warmup < 0:
        raise PlanError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if job:
        return _run_job(cfg, args, MPI.COMM_WORLD)
    fits, large, meta = profile(
        cfg,
        args.batches,
        args.repeats,
        args.warmup,
        args.channels,
        args.classes,
        stat=args.stat,
        clock=args.clock,
        inputs=args.inputs,
    )
    _report(args.out, cfg, fits, {}, meta, large)  # one process: one fit for both roles
    return 0


def _run_job(cfg: Any, args: argparse.Namespace, world: Any) -> int:
    """`profile` under mpirun (profile_run.py): every rank runs this; rank 0 writes the file."""
    from hpc_dualbatch.commands.profile_run import profile_job
    from hpc_dualbatch.runtime.launch import agree
    from hpc_dualbatch.runtime.topology import check_world_size

    def check() -> dict[int, list[int]]:
        check_world_size(world.Get_size(), cfg.workers.groups, cfg.server.shards)  # train's ranks
        if not (cfg.data.path and file_kind(cfg.data.path) != "missing"):
            raise PlanError(
                f"profile as an MPI job trains on the staged data, but data.path = '{cfg.data.path}' "
                "does not exist; stage it with `hpc-dualbatch prepare`"
            )
        large = cfg.plan.large_batch
        sizes = {
            r: [b for b in args.batches if b <= large[r]] if args.batches else default_batches(cfg, large[r])
            for r in cfg.schedule.resolutions
        }
        short = [r for r, s in sizes.items() if len(s) < 2]
        if short:
            raise PlanError(f"--batches needs two or more sizes <= plan.large_batch at {short} px")
        return sizes

    sizes = agree(world, check)
    out = profile_job(cfg, sizes, max(1, args.steps), args.repeats)
    if out is not None:
        fits, small, meta = out
        _report(args.out, cfg, fits, small, meta, {r: cfg.plan.large_batch[r] for r in fits})
    world.Barrier()  # MPI: every rank leaves once the file is written
    return 0


def _report(
    path: str,
    cfg: Any,
    fits: dict[int, TimeFit],
    small: dict[int, TimeFit],
    meta: dict,
    large: dict[int, int],
) -> None:
    """Write the timing file, then say what it means for the plan: the fit with its intervals,
    where the fixed cost is not distinguishable from zero, and the B_S the config would get."""
    save_timing(path, fits, meta, large, small)
    print(f"wrote {path}")

    def ci(v: tuple[float, float] | None) -> str:
        return f"[{v[0]:.2e}, {v[1]:.2e}]" if v else "-"

    print(f"{'res px':>6} {'role':>5} {'a s/sample':>10} {'90 % interval':>20} {'b s/step':>10} "
          f"{'90 % interval':>20} {'R^2':>6} {'B_L':>5}")  # fmt: skip
    for role, table in (("", fits), ("small", small)):
        for r, f in table.items():
            print(f"{r:6d} {role or 'all':>5} {f.a:10.3e} {ci(f.a_ci):>20} {f.b:10.3e} {ci(f.b_ci):>20} "
                  f"{f.r2:6.3f} {large[r]:5d}")  # fmt: skip
    for r, f in [*fits.items(), *small.items()]:
        if f.fixed_cost_known:
            continue
        b_ci = f", 90 % interval [{f.b_ci[0]:.2g}, {f.b_ci[1]:.2g}]" if f.b_ci else ""
        print(f"{r} px: the straight line's fixed cost per step is not distinguishable from zero "
              f"(b = {f.b:.2g} s/step{b_ci})")  # fmt: skip
        p = per_sample_table(f, large[r])
        if not p:
            continue
        low = min(p, key=lambda xp: xp[1])
        print(f"  measured s/sample: {p[0][1] * 1e3:.3f} ms at {p[0][0]}, {low[1] * 1e3:.3f} at {low[0]} "
              f"(lowest), {p[-1][1] * 1e3:.3f} at {p[-1][0]}")  # fmt: skip
        if p[0][1] <= p[-1][1] * 1.02:  # the smallest batch within 2 % of the largest per sample
            print(
                "  on this hardware a smaller batch costs no more per sample: any B_S keeps the time promise"
            )
        else:
            shape = f" (lowest at {low[0]}, higher on both sides)" if p[0][0] < low[0] < p[-1][0] else ""
            print(f"  the per-sample time is not a + b/B here{shape}: the planner picks B_S from these "
                  "measured times, not from the line")  # fmt: skip
    curved = sorted({r for r, f in [*fits.items(), *small.items()] if f.r2 < 0.98})
    if curved:
        print(
            f"note: R^2 < 0.98 at {curved} px: the step time is not a straight line in the batch here (a "
            "CPU's per-sample time can rise again past its cache); the intervals above say how much "
            "that leaves B_S in doubt"
        )
    if cfg.workers.small == 0:
        return
    from hpc_dualbatch.method.plan import plan_dual_batch, samples_per_epoch, small_floor

    try:
        res = [r for r in cfg.schedule.resolutions if r in fits]
        plan = plan_dual_batch(
            fits, {r: large[r] for r in res}, cfg.n_groups, cfg.workers.small, cfg.plan.k,
            samples_per_epoch(cfg), small_fits=small, min_small=small_floor(cfg),
        )  # fmt: skip
    except PlanError as e:
        print(f"(no plan from this file with the config's groups and k: {e})")
        return
    print(f"the config's plan (k {cfg.plan.k:g}, n_S {cfg.workers.small} of {cfg.n_groups} groups):")
    for r, rp in sorted(plan.resolutions.items()):
        span = f", the intervals allow [{rp.B_S_range[0]}, {rp.B_S_range[1]}]" if rp.B_S_range else ""
        print(f"  {r} px: B_S = {rp.B_S} ({rp.small_source}{span})")
