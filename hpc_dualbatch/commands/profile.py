"""`hpc-dualbatch profile`: measure the time model of timing.py on this machine.

It times forward + backward + SGD step of the configured model on this device at
several batch sizes per resolution (warm-up steps excluded, the median of several
repeats kept), fits a and b per resolution and writes a timing JSON that the planner
(`hpc_dualbatch.plan`) reads. It also records B_L per resolution: on a GPU the
largest batch that fits in memory, on a CPU the configured `plan.large_batch` (a
cap: a CPU has no memory wall worth finding). Under mpirun it profiles the way
`train` runs instead (profile_run.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.timing import TimeFit, fit_robust, per_sample_table, save_timing


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """Largest x in [1, cap] with fits(x) True, assuming fits is monotone (True then False).

    Doubling from `start` until the first failure (or `cap`), then bisection
    between the last success and the first failure. Returns 0 when not even
    batch 1 fits.
    """
    start = max(1, min(start, cap))
    if fits(start):
        lo, hi = start, None
        while hi is None:
            nxt = min(lo * 2, cap)
            if nxt == lo:
                return lo
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        lo, hi = 0, start
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _make_trainer(
    cfg: Any, channels: int, classes: int, device: Any, staged: Any = None
) -> Callable[[int, int], Callable[[], None]]:
    """Returns make(batch, res) -> step(): one training step on one fixed batch.

    The batch is random tensors, or (with `staged`) the first `batch` training
    images of the staged file, normalised as the loader does (no augmentation):
    profile on the data you will train on where it is at hand.
    """
    import torch

    from hpc_dualbatch.runtime.engine import make_optimizer, train_step
    from hpc_dualbatch.runtime.model import build_model

    model = build_model(cfg.model.arch, classes, channels, cfg.model.width).to(device)
    model.train()
    opt = make_optimizer(model, cfg.optim, cfg.schedule.lr[0])
    gen = torch.Generator().manual_seed(cfg.seed)

    def make(batch: int, res: int) -> Callable[[], None]:
        if staged is not None:
            import numpy as np

            from hpc_dualbatch.data import TrainLoader

            idx = np.arange(batch) % staged.num_samples("train")
            loader = TrainLoader(staged, "train", res, idx, batch, augment=False, prefetch=0, device=device)
            x, y = next(iter(loader))
        else:
            x = torch.randn(batch, channels, res, res, generator=gen).to(device)
            y = torch.randint(0, classes, (batch,), generator=gen).to(device)

        def step() -> None:
            train_step(model, opt, x, y)  # float(loss) inside synchronises a GPU

        return step

    return make


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _gpu_largest_batch(make: Callable[[int, int], Callable[[], None]], res: int, start: int, cap: int) -> int:
    import torch

    def fits(batch: int) -> bool:
        try:
            make(batch, res)()
            return True
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not _is_oom(e):
                raise
            return False
        finally:
            torch.cuda.empty_cache()

    return largest_fitting(fits, start, cap)


def measure_step_times(
    steps: Mapping[int, Callable[[], None]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
    block: int = 1,
) -> dict[int, list[float]]:
    """Seconds of each of `repeats` timed steps per batch size, after `warmup` untimed ones.

    The sizes are interleaved: round r runs every batch size once, in a rotating
    order, so a burst of load from another process spreads over all sizes
    instead of bending the fit at one of them. A training run repeats one batch
    size, so inside a round each size first runs `block` untimed steps (caches
    and the allocator settle to that size again), then one timed step.
    """
    sizes = list(steps)
    for bsz in sizes:
        for _ in range(warmup):
            steps[bsz]()
    sync()
    times: dict[int, list[float]] = {bsz: [] for bsz in sizes}
    for r in range(repeats):
        order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
        for bsz in order:
            for _ in range(block):
                steps[bsz]()
            sync()
            t = clock()
            steps[bsz]()
            sync()
            times[bsz].append(clock() - t)
    return times


LADDER = (1, 1.5)  # batch sizes per power of two: 16, 24, 32, 48, 64, ...


def batch_ladder(lowest: int, largest: int) -> list[int]:
    """The batch sizes a profile measures by default: 2^i and 1.5 * 2^i from `lowest` up to
    `largest`, and `largest` itself (B_L: T0 is measured there). Where B_S can land (the floor
    plan.min_small_batch up to B_L) the fit is then anchored at five or more sizes per
    factor of four, not at the three of 16/32/64."""
    out = {largest}
    p = 1
    while p <= largest:
        out.update(int(p * m) for m in LADDER if lowest <= p * m <= largest and p * m == int(p * m))
        p *= 2
    return sorted(out)


def default_batches(cfg: Any, B_L: int) -> list[int]:
    """The batch sizes measured without --batches: the ladder from the floor of B_S
    (plan.min_small_batch, at most B_L / 4 so that a small B_L still gets a spread) to B_L."""
    return batch_ladder(max(1, min(cfg.plan.min_small_batch, B_L // 4)), B_L)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _model_shape(cfg: Any, channels: int, classes: int) -> tuple[int, int, str]:
    """(channels, classes, source): from the staged data file when it exists, else the flags."""
    if cfg.data.path and file_kind(cfg.data.path) != "missing":  # (open_staged names what else it is)
        from hpc_dualbatch.data import open_staged

        ds = open_staged(cfg.data.path)
        return int(ds.channels), int(ds.num_classes), f"staged file {cfg.data.path}"
    return channels, classes, "flags"


def profile(
    cfg: Any,
    batches: list[int] | None,
    repeats: int,
    warmup: int,
    channels: int,
    classes: int,
    stat: str = "median",
    clock: str = "wall",
    inputs: str = "random",
    gpu_cap: int = 1 << 16,
    log: Callable[[str], None] = print,
) -> tuple[dict[int, TimeFit], dict[int, int], dict[str, Any]]:
    """Measure and fit every resolution of `cfg.schedule`; returns (fits, B_L, meta).
    batches None: `default_batches`."""
    import torch

    from hpc_dualbatch.runtime.engine import pick_device

    if cfg.threads > 0:  # never more than this process's cores (as train: topology.threads_per_rank)
        from hpc_dualbatch.runtime.topology import cores

        torch.set_num_threads(min(cfg.threads, cores()))
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    if clock == "cpu" and (on_gpu or torch.get_num_threads() != 1):
        raise PlanError(
            "--clock cpu measures the CPU time of one thread: use it on a CPU with config key "
            f"'threads' = 1 (now: {device}, {torch.get_num_threads()} threads), else --clock wall"
        )
    timer = time.process_time if clock == "cpu" else time.perf_counter
    channels, classes, shape_src = _model_shape(cfg, channels, classes)
    staged = None
    if inputs == "staged":
        if not (cfg.data.path and file_kind(cfg.data.path) != "missing"):
            raise PlanError(
                f"--inputs staged needs the staged data file data.path = '{cfg.data.path}', which does not "
                "exist; stage it with `hpc-dualbatch prepare` or use --inputs random"
            )
        from hpc_dualbatch.data import open_staged

        staged = open_staged(cfg.data.path)
    make = _make_trainer(cfg, channels, classes, device, staged)
    fits: dict[int, TimeFit] = {}
    large: dict[int, int] = {}
    for res in cfg.schedule.resolutions:
        if on_gpu:
            large[res] = _gpu_largest_batch(make, res, max(batches or [256]), gpu_cap)
            if large[res] < 1:
                raise PlanError(
                    f"not even batch 1 fits in GPU memory at {res} px with model {cfg.model.arch}"
                )
            log(f"{res} px: largest batch that fits in GPU memory: {large[res]}")
        else:
            large[res] = cfg.plan.large_batch[res]
        # Only batches the plan can use (<= B_L) shape the fit: the linear model is an
        # approximation, best where it is applied.
        if batches is None:
            sizes = default_batches(cfg, large[res])
        else:
            sizes = [bsz for bsz in batches if bsz <= large[res]]
        if len(sizes) < 2:
            raise PlanError(
                f"at {res} px B_L is {large[res]} ({'GPU memory' if on_gpu else 'plan.large_batch'}); give "
                f"--batches with two or more sizes <= {large[res]}"
            )
        times = measure_step_times({bsz: make(bsz, res) for bsz in sizes}, warmup, repeats, sync, timer)
        fits[res] = f = fit_robust(times, stat)
        for bsz, t in f.points:
            lo, hi = min(times[bsz]), max(times[bsz])
            log(
                f"{res} px  batch {bsz:5d}: {t * 1e3:9.2f} ms/step ({lo * 1e3:.2f}-{hi * 1e3:.2f})  "
                f"{t / bsz * 1e3:7.3f} ms/sample"
            )
    meta = {
        "device": torch.cuda.get_device_name(device)
        if on_gpu
        else f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "channels": channels,
        "classes": classes,
        "shape_source": shape_src,
        "inputs": f"staged images from {cfg.data.path}" if staged is not None else "random tensors",
        "batches": list(batches) if batches is not None else "ladder from plan.min_small_batch to B_L",
        "repeats": repeats,
        "warmup": warmup,
        "stat": stat,
        "clock": "process CPU time" if clock == "cpu" else "wall",
        "large_batch_source": "largest batch that fits in GPU memory"
        if on_gpu
        else "config plan.large_batch (CPU cap)",
    }
    return fits, large, meta


# ---------------------------------------------------------------------------
# CLI


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
        check_world_size(world.Get_size(), cfg.workers.groups, True)
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
