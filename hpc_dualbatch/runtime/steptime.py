"""The step time of the configured model measured in one process: what `hpc-dualbatch profile`
runs when it is not under mpirun (commands/profile.py is the command, commands/profile_run.py
the measurement under mpirun, with the ranks and placement of `train`).

It times forward + backward + SGD step of the configured model on this device at
several batch sizes per resolution (warm-up steps excluded, the median of several
repeats kept) and fits a and b per resolution: the time model of method/timing.py, which
the planner (method/plan.py) reads from the timing file. It also finds B_L per
resolution: on a GPU the largest batch that fits in memory, on a CPU the configured
`plan.large_batch` (a cap: a CPU has no memory wall worth finding).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.timing import TimeFit, fit_robust


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
