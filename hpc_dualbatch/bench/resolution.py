"""Benchmark: does a lower resolution make an epoch as much cheaper as its pixel count says?

    hpc-dualbatch bench resolution [--file data/fashion-mnist.h5] [--samples 1536] [--repeats 3]

Time ratio t(r) / t(R) of --samples samples through `TrainLoader` and `resnet18_cifar` at the
demo config's B_L, resolutions alternated, next to the pixel ratio r^2 / R^2 (the limit when all
cost is convolutions). Goal: time ratio <= 1.10 x pixel ratio. Method: docs/bench.md.
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.config import load_config
from hpc_dualbatch.data import TrainLoader, open_staged, shard_indices


def main(argv: list[str]) -> int:
    p = H.parser(
        "resolution", __doc__, file=("", "staged HDF5 file (default: data/fashion-mnist.h5, else staged)"),
        source=("", "when staging: fashion-mnist (default where installed) or synthetic"),
        resolutions=("20,24,28", "px, when staging"), samples=(1536, "samples per resolution and repeat"),
        batch=(0, "samples per step; 0 = the demo config's B_L per px"),
        width=(16, "resnet18_cifar width (the demo config's 16)"),
        threads=(1, "torch threads (the demo's 1 per rank)"), repeats=(3, "passes over all resolutions"),
    )  # fmt: skip
    args = H.start(
        p, argv, source="synthetic", resolutions="12,16", samples=128, width=8, repeats=1, batch=32
    )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hdb-resolution-") as tmp:
        path = H.staged_file(args.file, args.source, args.resolutions, tmp)
        staged = open_staged(path)
        res = list(staged.resolutions)
        R = res[-1]
        large = load_config(H.CONFIG).plan.large_batch
        batch = {r: args.batch or large.get(r, 64) for r in res}
        model, opt = H.resnet(args.width, staged.num_classes, staged.channels)
        n = staged.num_samples("train")

        def loader(r: int, samples: int, seed: int) -> TrainLoader:
            idx = shard_indices(n, [min(n, samples)], 0, 0, 1, seed, seed=0)
            return TrainLoader(staged, "train", r, idx, batch[r], augment=True, flip=True, pad=2, seed=seed)

        for r in res:  # warm-up: allocator, kernel choice, in-memory cache of every resolution
            H.train_seconds(model, opt, loader(r, 2 * batch[r], 1))
        times: dict[int, list[float]] = {r: [] for r in res}
        for i in range(args.repeats):
            for j in range(len(res)):  # the order rotated each repeat
                r = res[(i + j) % len(res)]
                seconds, _ = H.train_seconds(model, opt, loader(r, args.samples, i))  # with its start-up
                times[r].append(seconds)
        rows = []
        for r in res:
            time_ratio, pixel_ratio = H.median_ratio(times[r], times[R]), r * r / (R * R)
            secs = statistics.median(times[r])
            rows.append({
                "resolution": r, "batch": batch[r], "seconds": secs, "img_s": min(n, args.samples) / secs,
                "time_ratio": time_ratio, "pixel_ratio": pixel_ratio, "excess": time_ratio / pixel_ratio,
                "seconds_all": times[r],
            })  # fmt: skip
        print(
            f"resolution: {staged.source}, resnet18_cifar width {args.width}, {torch.get_num_threads()} "
            f"thread(s), {min(n, args.samples)} samples per resolution through TrainLoader, "
            f"{args.repeats} alternated repeats, median"
        )
        keys = "resolution batch seconds img_s time_ratio pixel_ratio excess".split()
        cells = [[row[k] for k in keys] for row in rows]
        print(H.table("px|batch|s:.2f|img/s:.0f|t/t(R):.3f|r2/R2:.3f|ratio:.2f", cells))
        worst = max(row["excess"] for row in rows)
        print(f"worst (time ratio / pixel ratio): {worst:.2f}x (goal <= 1.10x)")
        H.write_result(
            args.out, "resolution", args, argv, file=None if path.startswith(tmp) else path,
            source=staged.source, train_samples=n, rows=rows, worst_excess=worst,
            goal="time_ratio <= 1.10 x pixel_ratio at every resolution",
        )  # fmt: skip
    return 0
