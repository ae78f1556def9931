"""Benchmark: does a lower resolution make an epoch as much cheaper as its pixel count says?

    python -m hpc_dualbatch bench resolution [--file data/fashion-mnist.h5] [--samples 1536]
        [--repeats 3] [--out results/bench/resolution.json]

For every staged resolution r it trains `resnet18_cifar` (`engine.train_step`) on --samples
samples of the train split through the real `TrainLoader` (augmentation, prefetch thread), at
the demo config's B_L for r (hpc_dualbatch/configs/fashion_mnist.yaml: 128 / 96 / 64 at
20 / 24 / 28 px; --batch N uses N everywhere), and times it. The resolutions alternate inside
each repeat (the order rotated); time ratio = t(r) / t(R) per repeat, median over repeats, next
to the pixel ratio r^2 / R^2 (R = the highest staged resolution), the limit for a network whose
cost is all convolutions. Goal: time ratio <= 1.10 x pixel ratio.

Without --file it uses data/fashion-mnist.h5 when present, else stages Fashion-MNIST (or
synthetic data where Debian's copy is absent) into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "fashion_mnist.yaml")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpc-dualbatch bench resolution", description=__doc__.split("\n")[0])
    p.add_argument("--file", default="", help="staged HDF5 file (default: data/fashion-mnist.h5 or staged)")
    p.add_argument(
        "--source", default="", help="when staging: fashion-mnist (default where installed) or synthetic"
    )
    p.add_argument("--resolutions", default="20,24,28", help="px, when staging")
    p.add_argument("--samples", type=int, default=1536, help="samples timed per resolution per repeat")
    p.add_argument("--batch", type=int, default=0, help="samples per step; 0 = the demo config's B_L per px")
    p.add_argument("--width", type=int, default=16, help="resnet18_cifar width (the demo config's 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo config's 1 per rank)")
    p.add_argument("--repeats", type=int, default=3, help="passes over all resolutions")
    p.add_argument("--quick", action="store_true", help="toy sizes for a smoke test (synthetic 12/16 px)")
    p.add_argument("--out", default="results/bench/resolution.json")
    args = p.parse_args(argv)
    if args.quick:
        args.source, args.resolutions, args.samples = "synthetic", "12,16", 128
        args.width, args.repeats, args.batch = 8, 1, args.batch or 32
    return args


def _batches(resolutions: list[int], fixed: int) -> dict[int, int]:
    from ..config import load_config

    if fixed:
        return {r: fixed for r in resolutions}
    large = load_config(DEFAULT_CONFIG).plan.large_batch
    return {r: large.get(r, 64) for r in resolutions}


def _epoch_seconds(staged, r: int, batch: int, args: argparse.Namespace, model, opt, seed: int) -> float:
    """Seconds to train --samples samples at r px, loader start-up included (as in a mini-epoch)."""
    from ..data import TrainLoader, shard_indices
    from ..engine import train_step

    n = staged.num_samples("train")
    idx = shard_indices(n, [min(n, args.samples)], 0, 0, 1, seed, seed=0)
    t0 = time.perf_counter()
    loader = TrainLoader(
        staged, "train", r, idx, batch, augment=True, flip=True, pad=2, seed=seed, prefetch=2
    )
    for x, y in loader:
        train_step(model, opt, x, y)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    import torch

    from ..config import OptimConfig
    from ..data import TrainLoader, open_staged, prepare, shard_indices
    from ..data.sources import FASHION_MNIST_DIR
    from ..engine import make_optimizer, train_step
    from ..model import build_model
    from .all import DEFAULT_DATA, exit_on_sigterm, machine, write_result

    args = _parse(argv)
    exit_on_sigterm()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hdb-resolution-") as tmp:
        path = args.file or (str(DEFAULT_DATA) if DEFAULT_DATA.exists() and not args.source else "")
        if not path:
            source = args.source or ("fashion-mnist" if os.path.isdir(FASHION_MNIST_DIR) else "synthetic")
            path = os.path.join(tmp, f"{source}.h5")
            prepare(source, None, args.resolutions, path, log=lambda s: None)
        staged = open_staged(path)
        res = list(staged.resolutions)
        R = res[-1]
        batch = _batches(res, args.batch)
        torch.manual_seed(0)
        model = build_model("resnet18_cifar", staged.num_classes, staged.channels, args.width)
        model.train()
        opt = make_optimizer(model, OptimConfig(), lr=0.01)
        n = staged.num_samples("train")
        for r in res:  # warm-up: allocator, kernel choice, in-memory cache of every resolution
            idx = shard_indices(n, [min(n, 2 * batch[r])], 0, 0, 1, 0, seed=1)
            for x, y in TrainLoader(
                staged, "train", r, idx, batch[r], augment=True, flip=True, pad=2, seed=0
            ):
                train_step(model, opt, x, y)
        times: dict[int, list[float]] = {r: [] for r in res}
        for i in range(args.repeats):
            for j in range(len(res)):
                r = res[(i + j) % len(res)]
                times[r].append(_epoch_seconds(staged, r, batch[r], args, model, opt, seed=i))
        rows = []
        for r in res:
            time_ratio = statistics.median(a / b for a, b in zip(times[r], times[R]))
            pixel_ratio = r * r / (R * R)
            secs = statistics.median(times[r])
            rows.append({
                "resolution": r, "batch": batch[r], "seconds": secs, "img_s": min(n, args.samples) / secs,
                "time_ratio": time_ratio, "pixel_ratio": pixel_ratio, "excess": time_ratio / pixel_ratio,
                "seconds_all": times[r],
            })  # fmt: skip
        worst = max(row["excess"] for row in rows)
        result = {
            "bench": "resolution",
            "command": "python -m hpc_dualbatch bench resolution " + " ".join(argv),
            "params": vars(args),
            "machine": machine(),
            "file": args.file or (path if path == str(DEFAULT_DATA) else None),
            "source": staged.source,
            "train_samples": n,
            "rows": rows,
            "worst_excess": worst,
            "goal": "time_ratio <= 1.10 x pixel_ratio at every resolution",
        }
    print(
        f"resolution: {staged.source}, resnet18_cifar width {args.width}, "
        f"{torch.get_num_threads()} thread(s), "
        f"{min(n, args.samples)} samples per resolution through TrainLoader, "
        f"{args.repeats} alternated repeats, median"
    )
    print(f"{'px':>4} {'batch':>5} {'s':>7} {'img/s':>7} {'t/t(R)':>7} {'r2/R2':>7} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['resolution']:>4} {row['batch']:>5} {row['seconds']:7.2f} {row['img_s']:7.0f} "
            f"{row['time_ratio']:7.3f} {row['pixel_ratio']:7.3f} {row['excess']:5.2f}x"
        )
    print(f"worst (time ratio / pixel ratio): {worst:.2f}x (goal <= 1.10x)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
