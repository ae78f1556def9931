"""Benchmark: can the loader feed one training process at every staged resolution?

    python -m hpc_dualbatch.bench.loader [--file data/fashion-mnist.h5] [--out results/bench/loader.json]

Per resolution, on the same batches: numpy indexing of the in-memory array (the ceiling),
`TrainLoader` from memory and streamed from the file, and the images/s one `resnet18_cifar`
process trains. Goal: loader / trainer >= 5, so that loading never stalls training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from hpc_dualbatch.bench import _harness as H
from hpc_dualbatch.data import TrainLoader, open_staged, shard_indices
from hpc_dualbatch.runtime.engine import pick_device


def _seconds(start: float, device: torch.device) -> float:
    """Seconds since `start`, once the GPU (if any) has finished what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(time.perf_counter() - start, 1e-9)


def _measure(staged, resolution: int, args: argparse.Namespace, device: torch.device) -> dict:
    n = staged.num_samples("train")
    idx = shard_indices(n, [n], 0, 0, 1, 0, seed=0)[: args.batch * args.batches]
    numpy_rate = None
    if staged.encoding == "raw":
        array = staged.images("train", resolution)[()]
        batches = [idx[i : i + args.batch] for i in range(0, len(idx), args.batch)]
        for b in batches[:2]:
            _ = array[b]  # first touch of the pages is not part of the steady state
        start = time.perf_counter()
        for b in batches:
            _ = array[b]
        numpy_rate = len(idx) / _seconds(start, device)
    common = dict(augment=True, flip=True, pad=args.pad, seed=0, device=device, prefetch=2)
    rates, loaders = {}, {}
    for mode in ("always", "never"):  # in memory, streamed from the file
        loaders[mode] = TrainLoader(staged, "train", resolution, idx, args.batch, in_memory=mode, **common)
        start = time.perf_counter()  # one full pass, the background thread's start-up included
        rates[mode] = sum(len(y) for _, y in loaders[mode]) / _seconds(start, device)
    model, opt = H.resnet(args.width, staged.num_classes, staged.channels, lr=0.05, device=device)
    steps = iter(loaders["always"])
    H.train_seconds(model, opt, [next(steps)])  # warm-up: allocator and kernel selection
    timed = [next(steps) for _ in range(min(args.steps, len(loaders["always"]) - 1))]
    seconds, samples = H.train_seconds(model, opt, timed)
    consumer_rate = samples / seconds  # each step's loss.item() waits for the step
    steps.close()
    return {
        "resolution": resolution, "stored_bytes": staged.stored_bytes("train", resolution),
        "numpy_img_s": numpy_rate, "loader_img_s": rates["always"], "loader_stream_img_s": rates["never"],
        "consumer_img_s": consumer_rate, "ratio": rates["always"] / consumer_rate,
        "ratio_stream": rates["never"] / consumer_rate,
    }  # fmt: skip


def main(argv: list[str]) -> int:
    p = H.parser(
        "loader", __doc__, file=("", "staged HDF5 file (default: data/fashion-mnist.h5, else staged)"),
        source=("", "when staging: fashion-mnist (default where installed) or synthetic"),
        resolutions=("20,24,28", "px, when staging"), batch=(128, "samples per batch"),
        batches=(100, "loader batches timed per resolution"),
        steps=(4, "training steps timed per resolution (after 1 warm-up)"),
        width=(16, "resnet18_cifar width (64 = the standard ResNet-18)"),
        pad=(2, "crop padding in px at the largest resolution"), threads=(0, "torch threads; 0 = default"),
        device=("auto", "where training runs", ("auto", "cpu", "cuda")),
    )  # fmt: skip
    args = H.start(p, argv, source="synthetic", resolutions="12,16", batches=4, steps=1, width=8, batch=32)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="hdb-loader-") as tmp:
        path = H.staged_file(args.file, args.source, args.resolutions, tmp)
        staged = open_staged(path)
        rows = [_measure(staged, r, args, device) for r in staged.resolutions]
        file_bytes = os.path.getsize(path)
        print(
            f"{staged.source}, {file_bytes / 2**20:.1f} MiB file, batch {args.batch}, device {device}, "
            f"{torch.get_num_threads()} torch threads, resnet18_cifar width {args.width}"
        )
        keys = "numpy_img_s loader_img_s loader_stream_img_s consumer_img_s ratio ratio_stream".split()
        cells = [[r["resolution"], r["stored_bytes"] / 2**20, *(r[k] for k in keys)] for r in rows]
        cols = "res|MiB:.1f|numpy img/s:,.0f|loader img/s:,.0f|stream img/s:,.0f|train img/s:,.0f"
        print(H.table(cols + "|loader/train:.1f|stream/train:.1f", cells))
        H.write_result(
            args.out, "loader", args, argv, device=str(device), source=staged.source,
            file=None if path.startswith(tmp) else path, file_bytes=file_bytes, encoding=staged.encoding,
            train_samples=staged.num_samples("train"), batch=args.batch, width=args.width, rows=rows,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    H.module_main(main)
